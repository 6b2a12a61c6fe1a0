"""Will it fit? Peak GPU memory of a finetuning plan, and the fastest micro-batch + checkpointing that fits.

    python -m finetune.memory_plan --model_name Mistral-7B-v0.1 --quantize bnb.nf4   # or --checkpoint_dir

prints the plan for each track's GPU (RTX 4090 24 GB, A100 40/80 GB), so a plan that can't work is
known before a model is downloaded to the wrong machine. Training uses the same estimate to choose
``micro_batch_size`` and activation checkpointing (``finetune.run``), then confirms it with one
real step (``probe_plan``), stepping down if that step runs out of memory.

The estimate counts weights (by storage type), the trainable parameters with their gradients and
AdamW states, the activations a block keeps per token (calibrated on an H100, see BENCHMARKS.md), the
logits the loss holds, and a fixed allowance for workspaces and allocator slack. On several devices it
is one device's memory: DDP replicates everything and adds its gradient buckets (a copy of the trainable
gradients); FSDP shards weights, gradients and AdamW states over the devices and holds the unsharded
weights of two blocks at a time (the one computing, the one prefetched). It is compared with
what a card leaves the allocator (``Budget``: the card less the CUDA context, less a margin of 1 GiB
or 5%), and a rehearsal on a bigger GPU is capped at that usable memory for real.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from core.gpu_memory import margin_gib, usable_gib

GIB = 2**30
TRACKS = {"rtx4090": 24.0, "a100-40gb": 40.0, "a100-80gb": 80.0}
QUANTIZED_BYTES = {
    "bnb.nf4": 0.5 + 4 / 64,
    "bnb.fp4": 0.5 + 4 / 64,
    "bnb.nf4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),
    "bnb.fp4-dq": 0.5 + 1 / 64 + 4 / (64 * 256),
    "bnb.int8-training": 1.0 + 4 / 4096,
}
# Activation elements a transformer block keeps per token for its backward, in units of
# (9 * n_embd + 3 * kv_size + 4 * intermediate). Fitted to Mistral-7B LoRA on an H100 (BENCHMARKS.md,
# "memory planner calibration"): every estimate there came out 0.2-2.3 GiB above the measured peak.
ACTIVATION_FACTOR = {"eager": 1.15, "compiled": 0.92}
OVERHEAD_GIB = 1.5  # CUDA context, cuBLAS workspaces, allocator fragmentation
MAX_MICRO_TOKENS = 16384  # beyond this, bigger micro-batches don't make steps faster


@dataclass(frozen=True)
class Plan:
    micro_batch_size: int  # packed (or padded) rows of max_seq_length tokens
    checkpoint_blocks: bool
    peak_gib: float  # estimated
    budget_gib: float

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.budget_gib

    def describe(self) -> str:
        ckpt = "activation checkpointing" if self.checkpoint_blocks else "no checkpointing"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return f"micro_batch_size {self.micro_batch_size}, {ckpt}: ~{self.peak_gib:.1f} GiB of {self.budget_gib:.1f} GiB ({verdict})"


@dataclass(frozen=True)
class Budget:
    """A card's memory as a plan sees it: the allocator's cap (the card less the CUDA context) and, a
    margin under that, what estimates and measured peaks must stay within."""

    card_gib: float

    @property
    def usable_gib(self) -> float:
        return usable_gib(self.card_gib)

    @property
    def plan_gib(self) -> float:
        return self.usable_gib - margin_gib(self.card_gib)

    def describe(self) -> str:
        return f"{self.card_gib:.1f} GiB card: {self.usable_gib:.1f} usable, plans within {self.plan_gib:.1f}"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model: parameter counts by storage and the block's sizes."""

    linear_params: int  # frozen weights of Linear layers (quantizable)
    other_params: int  # frozen embeddings, norms, biases
    trainable_params: int  # LoRA/adapter weights, or every weight for a full finetune
    n_layer: int
    n_embd: int
    kv_size: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        config = model.config
        linear = other = trainable = 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                trainable += p.numel()
            elif name.endswith("weight") and p.dim() == 2 and "wte" not in name:
                linear += p.numel()
            else:
                other += p.numel()
        return cls(
            linear,
            other,
            trainable,
            config.n_layer,
            config.n_embd,
            config.n_query_groups * config.head_size,
            config.intermediate_size,
            config.padded_vocab_size,
        )


def estimate_gib(
    shape: ModelShape,
    tokens: int,
    checkpoint_blocks: bool,
    quantize: str | None,
    full: bool,
    compiled: bool = False,
    bytes_per_value: int = 2,
    devices: int = 1,
    strategy: str = "ddp",
) -> dict[str, float]:
    """Peak memory by part, in GiB, on one device running a micro-batch of ``tokens`` tokens.

    ``devices`` > 1: ``strategy`` "ddp" (replicated, plus gradient buckets) or "fsdp" (sharded, plus two blocks gathered).
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy: 'ddp' or 'fsdp', got {strategy!r}")
    if full:  # every weight trains: weight + grad + two AdamW states
        weights = shape.trainable_params * bytes_per_value * 4
        trainable = 0.0
        unsharded = shape.trainable_params * bytes_per_value  # the weights alone
    else:
        per_linear = QUANTIZED_BYTES[quantize] if quantize else bytes_per_value
        weights = shape.linear_params * per_linear + shape.other_params * bytes_per_value
        trainable = shape.trainable_params * 4 * bytes_per_value  # weight, grad, two AdamW states
        unsharded = weights + shape.trainable_params * bytes_per_value
    parallel = {}
    if devices > 1 and strategy == "ddp":
        parallel["ddp buckets"] = shape.trainable_params * bytes_per_value  # the all-reduce's copy of the gradients
    elif devices > 1:
        weights, trainable = weights / devices, trainable / devices
        parallel["fsdp gathered"] = 2 * unsharded / shape.n_layer * (2 if full else 1)  # two blocks' weights (and, full, their gradients)
    factor = ACTIVATION_FACTOR["compiled" if compiled else "eager"]
    per_block_token = factor * (9 * shape.n_embd + 3 * shape.kv_size + 4 * shape.intermediate) * bytes_per_value
    if checkpoint_blocks:  # each block keeps its input; one block at a time recomputes the rest
        activations = tokens * (shape.n_layer * shape.n_embd * bytes_per_value + per_block_token)
    else:
        activations = tokens * shape.n_layer * per_block_token
    rows = tokens if tokens * shape.vocab <= 2**27 else 2048  # finetune.forward's head chunks
    logits = rows * shape.vocab * (bytes_per_value + 4 + 4)  # logits, fp32 copy, its gradient
    parts = {"weights": weights, "trainable+optimizer": trainable, "activations": activations, "logits": logits, **parallel}
    out = {k: v / GIB for k, v in parts.items()}
    out["overhead"] = OVERHEAD_GIB
    out["total"] = sum(out.values())
    return out


def candidates(global_batch_size: int, max_seq_length: int) -> list[tuple[int, bool]]:
    """(micro_batch_size, checkpoint_blocks), fastest first: no checkpointing beats any micro-batch size."""
    sizes = [m for m in range(global_batch_size, 0, -1) if global_batch_size % m == 0 and (m == 1 or m * max_seq_length <= MAX_MICRO_TOKENS)]
    return [(m, False) for m in sizes] + [(m, True) for m in sizes]


def choose(
    shape: ModelShape,
    budget_gib: float,
    max_seq_length: int,
    global_batch_size: int,
    quantize: str | None,
    full: bool,
    compiled: bool = False,
    checkpoint_blocks: bool | None = None,
    devices: int = 1,
    strategy: str = "ddp",
) -> Plan:
    """The fastest candidate estimated to fit; if none does, the smallest (its ``fits`` is False).

    On ``devices`` devices each takes ``global_batch_size / devices`` rows a step: its micro-batch divides that.
    """
    if global_batch_size % devices:
        raise ValueError(f"global_batch_size: {global_batch_size} rows do not split over {devices} devices")
    options = [c for c in candidates(global_batch_size // devices, max_seq_length) if checkpoint_blocks is None or c[1] == checkpoint_blocks]
    plans = [
        Plan(
            m,
            ckpt,
            round(estimate_gib(shape, m * max_seq_length, ckpt, quantize, full, compiled, devices=devices, strategy=strategy)["total"], 2),
            budget_gib,
        )
        for m, ckpt in options
    ]
    return next((p for p in plans if p.fits), min(plans, key=lambda p: p.peak_gib))


def gpu_budget(device: torch.device, override_gib: float | None) -> Budget | None:
    """The card to plan for: one of ``override_gib`` (no bigger than the GPU), the GPU itself, or None off-GPU."""
    if device.type != "cuda":
        return Budget(override_gib) if override_gib else None
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    return Budget(min(total, override_gib) if override_gib else total)


def probe_plan(step, plans: list[Plan], log=print, limit_gib: float | None = None) -> Plan:
    """Run ``step(plan)`` (one forward+backward on a full-size batch) for each plan in turn until one fits.

    The estimate picks where to start; this makes the choice a measurement. Returns the first plan
    whose step neither ran out of memory nor peaked above ``limit_gib`` (the budget's margin under the
    cap: a real run's later steps, fragmentation and validation take more than one probe step).
    """
    cuda = torch.cuda.is_available()
    for plan in plans:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step(plan)
        except torch.OutOfMemoryError:
            log(f"memory plan: {plan.describe()} ran out of memory; trying the next")
            if cuda:
                torch.cuda.empty_cache()
            continue
        peak_gib = torch.cuda.max_memory_reserved() / GIB if cuda else None
        peak = f"{peak_gib:.1f} GiB" if peak_gib is not None else "?"
        said = f"memory plan: micro_batch_size {plan.micro_batch_size}, checkpointing {plan.checkpoint_blocks}: one step peaked at {peak} (estimated {plan.peak_gib:.1f})"
        if limit_gib is not None and peak_gib is not None and peak_gib > limit_gib:
            log(f"{said}, over the {limit_gib:.1f} GiB the plan keeps under the cap; trying the next")
            continue
        log(said)
        return plan
    raise RuntimeError(
        "memory plan: even micro_batch_size 1 with activation checkpointing ran out of memory; use --quantize bnb.nf4 or a shorter data.max_seq_length"
    )


LORA_R = 16  # main's --lora_r default


def refuse_unplanned(method: str, quantize: str | None, lora_r: int, devices: int, strategy: str) -> None:
    """Options the plan would not read for this method or device count: refused naming them, not planned without."""
    if quantize is not None and quantize not in QUANTIZED_BYTES:
        raise ValueError(f"quantize: choose one of {', '.join(QUANTIZED_BYTES)}, got {quantize!r}")
    if quantize is not None and method == "full":
        raise ValueError(f"quantize: full finetuning trains every weight and cannot train {quantize} ones (finetune refuses it); plan lora")
    if lora_r != LORA_R and method != "lora":
        raise ValueError(f"lora_r: {method} has no LoRA layers, so the rank changes nothing in its plan; drop it or plan --method lora")
    if strategy == "fsdp" and devices == 1:
        raise ValueError("strategy: fsdp shards over several GPUs and one device plans alone; give --devices N (N > 1) or drop it")


def main(
    checkpoint_dir: Path | None = None,
    model_name: str | None = None,
    method: str = "lora",
    quantize: str | None = None,
    max_seq_length: int = 2048,
    global_batch_size: int = 16,
    lora_r: int = LORA_R,
    gpu_memory_gib: float | None = None,
    devices: int = 1,
    strategy: Literal["ddp", "fsdp"] = "ddp",
) -> dict[str, Plan]:
    """Print the plan for each track (or for ``gpu_memory_gib``) of finetuning ``checkpoint_dir`` with ``method``.

    Args:
        checkpoint_dir: a converted checkpoint (only its model_config.yaml is read: no weights needed).
        model_name: or a litgpt config name (e.g. Mistral-7B-v0.1), before anything is downloaded.
        method: lora, adapter, adapter_v2 or full.
        quantize: e.g. bnb.nf4 (QLoRA); not with method full, whose weights all train.
        max_seq_length: tokens per (packed) row.
        global_batch_size: rows per optimizer step; micro-batch sizes are its divisors.
        lora_r: LoRA rank on every linear layer and the head (our default targets); method lora only.
        gpu_memory_gib: plan for this much memory instead of the three tracks.
        devices: GPUs the run shares (finetune's --devices); the plan is one GPU's memory.
        strategy: with devices > 1: ddp (replicated) or fsdp (weights, gradients and optimizer sharded); fsdp needs devices > 1.
    """
    from core.checkpoints import load_config
    from core.configs import config_from_name
    from core.methods import METHODS

    if (checkpoint_dir is None) == (model_name is None):
        raise ValueError("give --checkpoint_dir (a converted checkpoint) or --model_name (a litgpt config name)")
    if method not in METHODS:
        raise ValueError(f"method: choose one of {sorted(METHODS)}, got {method!r}")
    if devices < 1:
        raise ValueError(f"devices: a number of GPUs >= 1, got {devices}")
    if global_batch_size % devices:
        raise ValueError(f"global_batch_size: {global_batch_size} rows do not split over --devices {devices}")
    if devices > 1 and quantize is not None:
        raise ValueError(f"quantize: {quantize} (QLoRA) trains on one device (finetune refuses it with --devices > 1); plan it with --devices 1")
    refuse_unplanned(method, quantize, lora_r, devices, strategy)
    chosen = METHODS[method]
    config = load_config(Path(checkpoint_dir)) if checkpoint_dir is not None else config_from_name(model_name)
    extra = (
        {"lora_r": lora_r, "lora_alpha": 2 * lora_r, **{f"lora_{k}": True for k in ("query", "key", "value", "projection", "mlp", "head")}}
        if method == "lora"
        else {}
    )
    with torch.device("meta"):
        model = chosen.litgpt.GPT(chosen.litgpt.Config(**{**dataclasses.asdict(config), **extra}))
    chosen.freeze_all_but_trainable(model)
    shape = ModelShape.of(model)
    budgets = {"this GPU": gpu_memory_gib} if gpu_memory_gib else TRACKS
    plans = {}
    for track, gib in budgets.items():
        budget = Budget(gib)
        plans[track] = choose(
            shape,
            budget.plan_gib,
            max_seq_length,
            global_batch_size,
            quantize,
            chosen.trains_everything,
            compiled=True,
            devices=devices,
            strategy=strategy,
        )  # finetune compiles on GPUs
        where = f" x {devices} ({strategy}, per GPU)" if devices > 1 else ""
        print(f"{track:>10}{where} ({budget.describe()}): {plans[track].describe()}")
    if not any(p.fits for p in plans.values()):
        print(
            f"no track fits {config.name} with {method}{' + ' + quantize if quantize else ''} at {max_seq_length} tokens: try --quantize bnb.nf4 or a shorter max_seq_length"
        )
    return plans


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
