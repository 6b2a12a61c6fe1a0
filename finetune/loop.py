"""The training-loop core shared by the finetune scripts: accumulate, clip, step, validate, stop on time.

Method scripts (``lora.py``, ...) build the model, optimizer and data, then call ``fit``; saving is a
callback so each method decides which weights to write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import lightning as L
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import CycleIterator, chunked_cross_entropy


@dataclass
class FitResult:
    steps: int
    tokens: int  # non-padding tokens seen
    seconds: float
    final_train_loss: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_by_time: bool = False


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (response) positions."""
    logits = model(batch["input_ids"])
    return chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:], chunk_size=0)


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, loader: Iterable, max_iters: int) -> float:
    model.eval()
    losses = [batch_loss(model, batch).item() for _, batch in zip(range(max_iters), loader)]
    model.train()
    return sum(losses) / max(len(losses), 1)


def fit(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: Iterable,
    val_loader: Iterable | None,
    train: TrainArgs,
    eval: EvalArgs,
    max_steps: int,
    max_seconds: float = math.inf,
    on_save: Callable[[int], None] | None = None,
) -> FitResult:
    """Run optimizer steps until ``max_steps`` or ``max_seconds``, whichever comes first."""
    accumulate = train.gradient_accumulation_iters(devices=fabric.world_size, num_nodes=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = CycleIterator(train_loader)
    result = FitResult(steps=0, tokens=0, seconds=0.0, final_train_loss=math.nan)
    start = last_log = time.perf_counter()
    tokens_since_log = 0
    model.train()
    while result.steps < max_steps:
        if time.perf_counter() - start >= max_seconds:
            result.stopped_by_time = True
            fabric.print(f"Stopping at step {result.steps}: the time budget of {max_seconds:.0f}s is spent.")
            break
        for micro in range(accumulate):
            batch = next(batches)
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                loss = batch_loss(model, batch)
                fabric.backward(loss / accumulate)
            n_tokens = int(batch["mask"].sum())
            result.tokens += n_tokens
            tokens_since_log += n_tokens
        if train.max_norm is not None:
            fabric.clip_gradients(model, optimizer, max_norm=train.max_norm, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        result.steps += 1
        result.final_train_loss = loss.item()
        if not math.isfinite(result.final_train_loss):
            raise FloatingPointError(f"training loss is {result.final_train_loss} at step {result.steps}; lower the learning rate")

        if result.steps % train.log_interval == 0 or result.steps == max_steps:
            now = time.perf_counter()
            rate = tokens_since_log / max(now - last_log, 1e-9)
            metrics = {"step": result.steps, "loss": result.final_train_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate}
            fabric.log_dict(metrics, step=result.steps)
            elapsed = now - start
            eta = elapsed / result.steps * (max_steps - result.steps)
            fabric.print(
                f"step {result.steps:5d}/{max_steps} | loss {result.final_train_loss:.4f} | lr {metrics['lr']:.2e} | "
                f"{rate:,.0f} tok/s | elapsed {elapsed:.0f}s | eta {eta:.0f}s"
            )
            last_log, tokens_since_log = now, 0
        if val_loader is not None and eval.interval and result.steps % eval.interval == 0:
            val = validate(fabric, model, val_loader, eval.max_iters)
            result.val_losses.append((result.steps, val))
            fabric.log_dict({"val_loss": val}, step=result.steps)
            fabric.print(f"step {result.steps:5d} | val loss {val:.4f}")
        if on_save is not None and train.save_interval and result.steps % train.save_interval == 0:
            on_save(result.steps)
    result.seconds = time.perf_counter() - start
    return result
