"""Time budgets: the challenge allows 24 hours of finetuning on one GPU; runs must stop before that.

Also the learning-rate schedule, since the budget decides where it ends."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``"24h"``, ``"90m"``, ``"1h30m"``, ``"45s"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    compact = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        return float(compact)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"max_time: cannot read {text!r}; write e.g. '24h', '90m', '1h30m' or '45s'")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class Schedule:
    """Linear warmup then cosine decay to ``min_lr_ratio``; ``total_steps`` may shrink to fit the budget."""

    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.0

    def factor(self, step: int) -> float:
        """LR multiplier for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class BudgetPlanner:
    """Measures the first steps, says what fits in the budget, and stops the run before the budget ends.

    The first ``skip_steps`` (allocation, compilation, caches) are not measured. ``reserve_s`` is kept
    for the final save. After the plan, the stop test uses a running average of the step time.
    """

    max_seconds: float
    planned_steps: int
    measure_steps: int = 10
    skip_steps: int = 2
    sec_per_step: float | None = None
    log: Callable[[str], None] = field(default=print, repr=False)  # the plan's lines (rank 0's only: ``fabric.print``)
    _t_first: float | None = field(default=None, repr=False)
    _t_last: float = field(default=0.0, repr=False)
    _last_step_s: float = field(default=0.0, repr=False)
    timed: int = field(default=0, repr=False)  # steps observed in this process (deterministic: the same on every rank)

    @property
    def reserve_s(self) -> float:
        return min(60.0, 0.02 * self.max_seconds) if math.isfinite(self.max_seconds) else 0.0

    def start(self, elapsed: float) -> None:
        """Call when a run (or a resume) starts with ``elapsed`` seconds of budget spent: its first step is timed from here."""
        self._t_last = elapsed

    def observe(self, step: int, elapsed: float, tokens_per_step: float) -> int | None:
        """Call after each optimizer step; once measured, returns the number of steps the run will do."""
        self._last_step_s = elapsed - self._t_last
        self.timed += 1
        if step == self.skip_steps:
            self._t_first = elapsed
        if self.sec_per_step is not None:
            self.sec_per_step = 0.9 * self.sec_per_step + 0.1 * (elapsed - self._t_last)
        self._t_last = elapsed
        if self.sec_per_step is not None or self._t_first is None or step != self.skip_steps + self.measure_steps:
            return None
        self.sec_per_step = (elapsed - self._t_first) / self.measure_steps
        if not math.isfinite(self.max_seconds):
            return self.planned_steps
        fits = step + int((self.max_seconds - elapsed - self.reserve_s) / self.sec_per_step)
        self.log(
            f"budget plan: {self.sec_per_step:.3f} s/step ({tokens_per_step / self.sec_per_step:,.0f} tokens/s) -> "
            f"{fits:,} steps ({fits * tokens_per_step:,.0f} tokens) fit in {self.max_seconds / 3600:.2f} h; "
            f"planned {self.planned_steps:,} steps"
        )
        if fits >= self.planned_steps:
            return self.planned_steps
        self.log(
            f"WARNING: the plan does not fit the budget: {self.planned_steps:,} planned steps need about "
            f"{self.planned_steps * self.sec_per_step / 3600:.2f} h."
            f" The LR schedule now ends at step {fits:,}."
        )
        return max(step, fits)

    def steps_that_fit(self, elapsed: float, horizon: int) -> int:
        """How many more steps (at most ``horizon``) end before the reserve for the final save, at the step time so far."""
        step_s = max(self.sec_per_step or 0.0, self._last_step_s)  # before the plan, the last step's time
        room = self.max_seconds - self.reserve_s - elapsed
        if room <= 0:
            return 0
        if step_s <= 0 or not math.isfinite(room):
            return horizon
        return max(0, min(horizon, math.ceil(room / step_s) - 1))  # n fit when elapsed + n * step_s + reserve < max

    def out_of_time(self, elapsed: float) -> bool:
        """True when one more step would run into the reserve for the final save."""
        return self.steps_that_fit(elapsed, 1) == 0


STOP_VOTE_EVERY = 8  # steps between the ranks' budget votes: a vote is a collective and a host sync


@dataclass
class BudgetStop:
    """Says before each step whether the budget stops the run, the same on every rank.

    One process asks the planner every step (free). Ranks' clocks differ, yet all must stop at the same
    step (one left running would wait forever in the next all-reduce), so they vote: ``reduce_min`` is a
    collective, and reading its result syncs the host, which the loop never does per step. So a vote asks
    each rank how many of the next ``every`` steps fit its budget (``BudgetPlanner.steps_that_fit``), the
    least answer wins, and the next vote is that many steps on; at 0 every rank stops. The steps between
    votes were foreseen to fit on every rank, so the run still ends before the budget, at the step one
    process would have stopped at (for a steady step time), with about ``steps / every`` votes. Until a
    step of this process has been timed nothing is foreseen: a vote before each step. A vote's schedule
    counts from the process's first step, which every rank shares (also on resume).
    """

    planner: BudgetPlanner
    world_size: int
    reduce_min: Callable[[int], int]  # every rank's int -> the least; called on every rank at once
    every: int = STOP_VOTE_EVERY
    votes: int = 0
    _next_vote: int | None = field(default=None, repr=False)

    def __call__(self, step: int, elapsed: float) -> bool:
        if self.world_size == 1:
            return self.planner.out_of_time(elapsed)
        if self._next_vote is not None and step < self._next_vote:
            return False
        fit = self.reduce_min(self.planner.steps_that_fit(elapsed, self.every if self.planner.timed else 1))
        self.votes += 1
        self._next_vote = step + fit
        return fit == 0
