"""The budget stop with several ranks: a vote every few steps (not a collective and host sync every step) that still
stops every rank at the same step, before the budget, at the step one process stops at; also after a resume."""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
from litgpt import Tokenizer

from core.methods import METHODS
from core.prompts import get_style
from finetune import distributed
from finetune.budget import STOP_VOTE_EVERY, BudgetPlanner, BudgetStop, Schedule
from finetune.config import EvalArgs, TrainArgs
from finetune.data import Collate, encode_row, load_rows
from finetune.loop import Progress, fit
from finetune.lora import LoRAArgs
from finetune.run import build_model, build_optimizer

BUDGET_S = 100.0


def step_seconds(step: int) -> float:
    """A step's duration (``step`` 1-based): steady at 1 s, then slower than the budget plan measured."""
    return 1.0 if step <= 10 else 1.5


def test_steps_that_fit_is_the_most_steps_that_end_before_the_reserve():
    planner = BudgetPlanner(BUDGET_S, 1000, log=lambda line: None)
    for last_step_s in (0.3, 1.0, 1.5, 7.0):
        planner._last_step_s = last_step_s
        for elapsed in (0.0, 50.0, 90.0, 96.5, 97.9, 98.0, 120.0):
            for horizon in (1, 3, 8):
                fits = max([n for n in range(horizon + 1) if elapsed + n * last_step_s + planner.reserve_s < BUDGET_S], default=0)
                assert planner.steps_that_fit(elapsed, horizon) == fits, (last_step_s, elapsed, horizon)
                assert planner.out_of_time(elapsed) == (planner.steps_that_fit(elapsed, 1) == 0)


def simulate(clocks: list[float], start_step: int = 0, start_elapsed: float = 0.0) -> list[tuple[int, float, int]]:
    """Ranks (threads) with their own step times (``clocks[rank]`` x ``step_seconds``) and a real min-reduce between
    them, stepping until their ``BudgetStop`` says stop: each rank's (stop step, elapsed then, votes)."""
    barrier, shared, results = threading.Barrier(len(clocks)), [0] * len(clocks), [None] * len(clocks)

    def rank(r: int) -> None:
        def least(n: int) -> int:
            shared[r] = n
            barrier.wait()
            out = min(shared)
            barrier.wait()  # every rank has read before the next vote writes
            return out

        planner = BudgetPlanner(BUDGET_S, 1000, log=lambda line: None)
        planner.start(start_elapsed)
        stop, step, elapsed = BudgetStop(planner, len(clocks), least), start_step, start_elapsed
        while not stop(step, elapsed):
            step += 1
            elapsed += clocks[r] * step_seconds(step)
            planner.observe(step, elapsed, 1)
        results[r] = (step, elapsed, stop.votes)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(clocks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.parametrize("start", [(0, 0.0), (30, 40.0)], ids=["fresh", "resumed"])
def test_ranks_vote_every_few_steps_and_stop_together_before_the_budget(start):
    one = simulate([1.1], *start)[0]  # one process: asks the planner every step, no votes
    assert one[2] == 0
    ranks = simulate([1.0, 1.1], *start)  # rank 1 is the slower: its budget decides
    steps = {step for step, _, _ in ranks}
    assert steps == {one[0]}  # the same step on every rank, and the one a process alone with the slow clock stops at
    assert max(elapsed for _, elapsed, _ in ranks) + BudgetPlanner(BUDGET_S, 1).reserve_s < BUDGET_S
    votes = ranks[0][2]
    session = one[0] - start[0]
    assert votes == ranks[1][2] and session // STOP_VOTE_EVERY <= votes <= session // STOP_VOTE_EVERY + 4, (votes, session)


class TwoRanks:
    """A real 1-process Fabric that reports a world of two: collectives return this rank's value, and are counted."""

    world_size = 2

    def __init__(self, fabric: L.Fabric) -> None:
        self._fabric, self.reduced = fabric, []

    def __getattr__(self, name: str):
        return getattr(self._fabric, name)

    def all_reduce(self, data, group=None, reduce_op="mean"):
        self.reduced.append(reduce_op)
        return data

    def broadcast(self, obj, src: int = 0):
        return obj


@pytest.fixture(scope="module")
def tiny_run(make_tiny_checkpoint):
    base = make_tiny_checkpoint()
    batch = Collate()([encode_row(r, Tokenizer(base), get_style("qa"), 32) for r in load_rows(base.parent / "data" / "train.jsonl")[:4]])
    return base, batch


def run_fit(tiny_run, monkeypatch, world: str, progress: Progress) -> tuple[Progress, list[str]]:
    """``fit`` on the tiny model under a fake clock (``step_seconds`` per step), on one process or as one of two."""
    base, batch = tiny_run
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    fabric.seed_everything(0, verbose=False)
    model = build_model(fabric, METHODS["lora"], LoRAArgs(r=2, alpha=4).as_config(), base, quantize=None)
    optimizer = build_optimizer(fabric, model, 1e-3, 0.0)
    if world == "two":
        fabric = TwoRanks(fabric)
        monkeypatch.setattr(distributed, "mean_over_ranks", lambda value, world_size: fabric.all_reduce(value, reduce_op="mean"))  # counted
    now, step = [progress.elapsed_s], [progress.step]

    def next_batch():  # one micro-batch a step on either world (global batch = micro-batch x world)
        step[0] += 1
        now[0] += step_seconds(step[0])
        return batch

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    train = TrainArgs(log_interval=1000, global_batch_size=4 * fabric.world_size, micro_batch_size=4, max_steps=1000, save_interval=None)
    planner = BudgetPlanner(BUDGET_S, progress.total_steps, log=lambda line: None)
    done = fit(fabric, model, optimizer, next_batch, Schedule(progress.total_steps, 1), 1e-3, planner, progress, train, EvalArgs(interval=0))
    monkeypatch.undo()
    return done, getattr(fabric, "reduced", [])


def test_fit_on_two_ranks_votes_every_few_steps_and_stops_where_one_process_does(tiny_run, monkeypatch):
    one, none = run_fit(tiny_run, monkeypatch, "one", Progress(total_steps=1000))
    assert none == [] and one.stopped_by_time  # the clock stopped it, before the plan's shortened schedule ended
    assert one.step < one.total_steps < 1000 and one.elapsed_s + BudgetPlanner(BUDGET_S, 1).reserve_s < BUDGET_S
    two, reduced = run_fit(tiny_run, monkeypatch, "two", Progress(total_steps=1000))
    assert (two.step, two.stopped_by_time, two.total_steps) == (one.step, True, one.total_steps)
    assert reduced.count("mean") == two.step  # each step's loss over the ranks
    assert two.step // STOP_VOTE_EVERY <= reduced.count("min") <= two.step // STOP_VOTE_EVERY + 4  # not one vote a step

    # Resumed mid-run (a fresh planner, the budget partly spent): the same stop, timed from the resume, not from 0.
    at = 50  # past half the budget: timed from 0, its first step would look longer than the time left
    spent = sum(step_seconds(s) for s in range(1, at + 1))
    resumed_one, _ = run_fit(tiny_run, monkeypatch, "one", Progress(step=at, elapsed_s=spent, total_steps=one.total_steps))
    resumed_two, reduced = run_fit(tiny_run, monkeypatch, "two", Progress(step=at, elapsed_s=spent, total_steps=one.total_steps))
    assert resumed_one.step == resumed_two.step == one.step and resumed_two.stopped_by_time
    assert reduced.count("min") <= (one.step - at) // STOP_VOTE_EVERY + 4
