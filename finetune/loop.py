"""The training-loop core shared by every method: accumulate, clip, step, validate, log, save, stop on time.

``run.py`` builds the model, optimizer and data and calls ``fit``. Everything the loop needs to
continue exactly after an interruption lives in ``Progress`` (saved with each checkpoint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from litgpt.args import EvalArgs, TrainArgs
from tqdm import tqdm

from finetune.budget import BudgetPlanner, Schedule
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


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], checkpoint_blocks: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (response) positions of a padded or packed batch.

    ``model`` is a litgpt GPT, or Fabric's wrapper of one (run it under ``fabric.autocast()``).
    """
    clear_prefix_caches(model)
    return training_loss(getattr(model, "module", model), batch, checkpoint_blocks)


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    with fabric.autocast():
        losses = [batch_loss(model, b).item() for b in batches]
    model.train()
    return sum(losses) / max(len(losses), 1)


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
    """Optimizer steps until ``schedule.total_steps`` or the budget, whichever comes first."""
    accumulate = train.gradient_accumulation_iters(devices=fabric.world_size, num_nodes=1)
    started = time.perf_counter() - progress.elapsed_s
    elapsed = lambda: time.perf_counter() - started  # noqa: E731
    bar = tqdm(total=schedule.total_steps, initial=progress.step, unit="step", dynamic_ncols=True, disable=None)
    model.train()
    while progress.step < schedule.total_steps:
        if planner.out_of_time(elapsed()):
            progress.stopped_by_time = True
            fabric.print(f"\nStopping at step {progress.step}: the time budget of {planner.max_seconds:.0f}s is (nearly) spent.")
            break
        for group in optimizer.param_groups:
            group["lr"] = base_lr * schedule.factor(progress.step)
        step_tokens = 0
        for micro in range(accumulate):
            batch = next_batch()
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                with fabric.autocast():
                    loss = batch_loss(model, batch, checkpoint_blocks)
                fabric.backward(loss / accumulate)
            step_tokens += int(batch["mask"].sum())  # a CPU tensor: no device sync
        if train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.tokens += step_tokens
        progress.last_loss = loss.item()
        progress.elapsed_s = elapsed()
        if not math.isfinite(progress.last_loss):
            raise FloatingPointError(f"training loss is {progress.last_loss} at step {progress.step}; lower the learning rate")
        if (new_total := planner.observe(progress.step, progress.elapsed_s, step_tokens)) is not None:
            schedule.total_steps = progress.total_steps = new_total
            bar.total = new_total
        bar.update(1)
        rate = progress.tokens / max(progress.elapsed_s, 1e-9)
        bar.set_postfix(loss=f"{progress.last_loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)

        row = {"step": progress.step, "loss": progress.last_loss, "lr": optimizer.param_groups[0]["lr"], "tokens": progress.tokens, "elapsed_s": progress.elapsed_s}
        if val_batches and eval.interval and progress.step % eval.interval == 0:
            row["val_loss"] = validate(fabric, model, val_batches)
            progress.val_losses.append((progress.step, row["val_loss"]))
        log(row)
        if progress.step % train.log_interval == 0 or progress.step == schedule.total_steps or "val_loss" in row:
            eta = f"{planner.sec_per_step * (schedule.total_steps - progress.step):.0f}s" if planner.sec_per_step else "?"
            val = f" | val loss {row['val_loss']:.4f}" if "val_loss" in row else ""
            fabric.print(
                f"step {progress.step:6d}/{schedule.total_steps} | loss {progress.last_loss:.4f}{val} | lr {row['lr']:.2e} | "
                f"{rate:,.0f} tok/s | elapsed {progress.elapsed_s:.0f}s | eta {eta}"
            )
        if on_save is not None and train.save_interval and progress.step % train.save_interval == 0:
            on_save(progress)
    bar.close()
    return progress
