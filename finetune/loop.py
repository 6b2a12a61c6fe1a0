"""The training-loop core shared by every method: accumulate, clip, step, validate, log, save, stop on time.

``run.py`` builds the model, optimizer and data and calls ``fit``. Everything the loop needs to
continue exactly after an interruption lives in ``Progress`` (saved with each checkpoint).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from tqdm import tqdm

from finetune import distributed
from finetune.budget import BudgetPlanner, BudgetStop, Schedule
from finetune.config import EvalArgs, TrainArgs
from finetune.data import IGNORE_INDEX
from finetune.forward import training_loss


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # non-padding tokens trained on
    elapsed_s: float = 0.0  # training time spent, across resumes (the budget counts all of it)
    total_steps: int = 0  # where the LR schedule ends (may shrink to fit the budget)
    last_loss: float = math.nan
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_by_time: bool = False

    def state_dict(self) -> dict:
        return asdict(self)


def clear_prefix_caches(model: torch.nn.Module) -> None:
    """Drop litgpt adapter attention's cached prefix keys/values.

    litgpt computes them once and keeps them (meant for inference). In training the prefix changes
    every step, and a cache built under no_grad (validation) would silently stop its gradients.
    """
    for module in model.modules():
        if getattr(module, "adapter_kv_cache", None) is not None:
            module.adapter_kv_cache = None


HOST_COUNTS = ("mask", "tokens", "targets", "rank_targets")  # a batch's numbers counted on the host, not model inputs


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], checkpoint_blocks: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (response) positions of a padded or packed batch.

    ``model`` is a litgpt GPT, or Fabric's wrapper of one (run it under ``fabric.autocast()``). Under DDP/FSDP
    the loss goes through the strategy's forward (``finetune.run.build_model`` marks ``training_loss``), which
    DDP needs to sync gradients and FSDP to gather weights.
    """
    clear_prefix_caches(model)
    inputs = {k: v for k, v in batch.items() if k not in HOST_COUNTS}
    if "training_loss" in getattr(model, "_forward_methods", ()):
        return model.training_loss(inputs, checkpoint_blocks)
    return training_loss(getattr(model, "module", model), inputs, checkpoint_blocks)


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Labelled targets in a micro-batch (what its mean loss is over): the host's count where the batch carries it
    (``rank_targets``, from ``finetune.distributed.RankBatches``), so the step does not wait on the device to read it."""
    if "rank_targets" in batch:
        return batch["rank_targets"]
    if "target_index" in batch:
        return batch["target_index"].numel()
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_weights(batches: list[dict], world_size: int = 1) -> list[float]:
    """What each micro-batch's mean loss is multiplied by, so the step's gradient is the mean over every target
    of the global batch, however it is split into micro-batches and ranks (rows and packed rows hold unequal
    numbers of labelled tokens: a plain mean of micro-batch means would weight a token by its micro-batch's size).

    A batch's ``targets`` (from ``finetune.distributed.RankBatches``) is the world's count for that micro-step;
    DDP averages the ranks' gradients, hence ``world_size``. Without it every rank's share counts alike.
    """
    counts = [target_count(b) for b in batches]
    world = sum(b["targets"] for b in batches) if all("targets" in b for b in batches) else world_size * sum(counts)
    return [n * world_size / max(world, 1) for n in counts]


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    with fabric.autocast():
        losses = [batch_loss(model, b).item() for b in batches]
    model.train()
    return sum(losses) / max(len(losses), 1)


class LossReadout:
    """A step's loss and end time on their way to the host without stopping the GPU.

    ``loss.item()`` right after a step makes the CPU wait for the GPU to drain, so the next step's batch,
    kernel launches and logging start on an idle GPU. Instead the loss is copied into pinned memory
    behind the step's own kernels and read one step later, while the GPU runs the next step.

    The step's end is timed the same way: a CUDA timing event behind its kernels, measured against one
    origin event recorded on an idle GPU when the readout is made (the one sync of the loop). So a row's
    time is when its own step finished on the GPU, not when the host got round to reading it (a step
    later, or after the next step's queueing when the host is the bottleneck). On the CPU a step has
    finished when ``start`` is called, so the clock is read there.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
        self.origin_wall = time.perf_counter()

    def start(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | float]:
        if not self.cuda:
            return loss.detach(), time.perf_counter()
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss.detach(), non_blocking=True)
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return host, event

    def value(self, started: tuple[torch.Tensor, torch.cuda.Event | float]) -> tuple[float, float]:
        """The loss, and the ``time.perf_counter()`` at which its step finished."""
        host, done = started
        if isinstance(done, float):
            return host.item(), done
        done.synchronize()  # waits for that step only, not for the steps queued after it
        return host.item(), self.origin_wall + self.origin.elapsed_time(done) / 1000.0


@dataclass
class _Queued:
    """An optimizer step whose kernels are queued; its loss is read when ``fit`` finishes it."""

    step: int
    tokens: int  # this step's
    total_tokens: int  # all steps' so far
    lr: float
    loss: tuple


def progress_bar(total: int, done: int, main_process: bool = True) -> tqdm:
    """A tqdm bar of optimizer steps with its ETA, drawn only when stdout is a terminal (logs stay plain text)."""
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, disable=not (main_process and sys.stdout.isatty()))


def format_seconds(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h07m``: what an ETA or an elapsed time reads as in the log."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fit(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], dict[str, torch.Tensor]],
    schedule: Schedule,
    base_lr: float,
    planner: BudgetPlanner,
    progress: Progress,
    train: TrainArgs,
    eval: EvalArgs,
    val_batches: list[dict] | None = None,
    on_save: Callable[[Progress], None] | None = None,
    log: Callable[[dict], None] = lambda row: None,
    checkpoint_blocks: bool = False,
) -> Progress:
    """Optimizer steps until ``schedule.total_steps`` or the budget, whichever comes first.

    Each step's loss is read (logged, checked) while the next step runs (``LossReadout``); a step that
    validates, saves or ends the run is read before anything looks at the model. A row's ``elapsed_s``
    is when that step itself finished (validation and saving included in the step after them).
    """
    accumulate = train.gradient_accumulation_iters(devices=fabric.world_size, num_nodes=1)
    started = time.perf_counter() - progress.elapsed_s
    elapsed = lambda: time.perf_counter() - started  # noqa: E731
    bar = progress_bar(schedule.total_steps, progress.step, fabric.is_global_zero)
    say = bar.write if not bar.disable else fabric.print  # log lines above the bar, not through it
    readout = LossReadout(fabric.device)
    session = (progress.step, progress.elapsed_s)  # where this process started: its own pace sets the ETA
    planner.start(progress.elapsed_s)  # after a resume, the first step is timed from the resume, not from 0
    least = lambda n: int(fabric.all_reduce(torch.tensor(n, device=fabric.device), reduce_op="min").item())  # noqa: E731
    out_of_time = BudgetStop(planner, fabric.world_size, least)  # ranks vote every few steps, not every step

    def finish(queued: _Queued, validating: bool = False) -> None:
        progress.last_loss, done_at = readout.value(queued.loss)
        progress.elapsed_s = done_at - started  # when this step finished, not when it was read
        if not math.isfinite(progress.last_loss):
            raise FloatingPointError(f"training loss is {progress.last_loss} at step {queued.step}; lower the learning rate")
        new_total = planner.observe(queued.step, progress.elapsed_s, queued.tokens)
        if fabric.world_size > 1 and queued.step == planner.skip_steps + planner.measure_steps:
            new_total = fabric.broadcast(new_total, 0)  # one plan, rank 0's, so every rank keeps the same schedule
        if new_total is not None:
            schedule.total_steps = progress.total_steps = new_total
            bar.total = new_total
        bar.update(1)
        rate = queued.total_tokens / max(progress.elapsed_s, 1e-9)
        shown = {"loss": f"{progress.last_loss:.4f}", "tok_s": f"{rate:,.0f}"}
        if progress.val_losses:
            shown["val"] = f"{progress.val_losses[-1][1]:.4f}"
        bar.set_postfix(shown, refresh=False)
        row = {"step": queued.step, "loss": progress.last_loss, "lr": queued.lr, "tokens": queued.total_tokens, "elapsed_s": progress.elapsed_s}
        if validating:
            row["val_loss"] = validate(fabric, model, val_batches)
            progress.val_losses.append((queued.step, row["val_loss"]))
        log(row)
        if queued.step % train.log_interval == 0 or queued.step == schedule.total_steps or validating:
            per_step = planner.sec_per_step or (progress.elapsed_s - session[1]) / max(queued.step - session[0], 1)
            eta = format_seconds(per_step * (schedule.total_steps - queued.step))
            val = f" | val loss {row['val_loss']:.4f}" if validating else ""
            say(
                f"step {queued.step:6d}/{schedule.total_steps} | loss {progress.last_loss:.4f}{val} | lr {queued.lr:.2e} | "
                f"{rate:,.0f} tok/s | elapsed {format_seconds(progress.elapsed_s)} | eta {eta}"
            )

    pending: _Queued | None = None
    if eval.initial_validation and val_batches and progress.step == 0:
        progress.val_losses.append((0, validate(fabric, model, val_batches)))
        say(f"step      0/{schedule.total_steps} | val loss {progress.val_losses[-1][1]:.4f} (eval.initial_validation)")
    model.train()
    while progress.step < schedule.total_steps:
        if out_of_time(progress.step, elapsed()):  # on every rank at once
            progress.stopped_by_time = True
            say(f"Stopping at step {progress.step}: the time budget of {planner.max_seconds:.0f}s is (nearly) spent.")
            break
        for group in optimizer.param_groups:
            group["lr"] = base_lr * schedule.factor(progress.step)
        step_tokens, step_loss = 0, 0.0
        drawn = [next_batch() for _ in range(accumulate)]  # all of the step's micro-batches first: their target counts weight the losses
        for micro, (batch, weight) in enumerate(zip(drawn, loss_weights(drawn, fabric.world_size))):
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                with fabric.autocast():
                    loss = batch_loss(model, batch, checkpoint_blocks)
                fabric.backward(loss * weight)
            step_loss = step_loss + loss.detach() * weight
            step_tokens += batch["tokens"] if "tokens" in batch else int(batch["mask"].sum())  # host numbers: no device sync
        if fabric.world_size > 1:
            step_loss = distributed.mean_over_ranks(step_loss, fabric.world_size)  # over every rank's micro-batches
        if train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens += step_tokens
        queued = _Queued(progress.step, step_tokens, progress.tokens, optimizer.param_groups[0]["lr"], readout.start(step_loss))
        if pending is not None:
            finish(pending)  # the previous step, while the GPU runs this one
        pending = queued
        last = progress.step >= schedule.total_steps
        validating = bool(val_batches and ((eval.interval and progress.step % eval.interval == 0) or (last and eval.final_validation)))
        saving = bool(on_save is not None and train.save_interval and progress.step % train.save_interval == 0)
        if validating or saving or last:
            finish(pending, validating)
            pending = None
            if saving:
                on_save(progress)
    final = bool(val_batches and eval.final_validation)  # stopped by the budget: validate the last step all the same
    if pending is not None:
        finish(pending, validating=final)
    elif final and progress.step > 0 and (not progress.val_losses or progress.val_losses[-1][0] != progress.step):
        progress.val_losses.append((progress.step, validate(fabric, model, val_batches)))
        say(f"step {progress.step:6d}/{schedule.total_steps} | val loss {progress.val_losses[-1][1]:.4f} (eval.final_validation)")
    bar.close()
    return progress
