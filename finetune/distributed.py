"""Several processes, one run: ``--devices N`` and ``--strategy`` through Lightning Fabric (DDP, FSDP).

A run on N devices must be the run on one with the same global batch, only faster. So:

- Every rank draws the same seeded batch order and keeps its own share of each micro-step's N
  micro-batches (``RankBatches``): a global step trains on exactly the rows the 1-process run's
  step does (accumulation over ranks instead of over micro-steps), and the data position is one
  number that every rank holds alike, which is what resume restores.
- The step's loss is the mean over every labelled token of all micro-batches and ranks, and its token count is the world's.
- Decisions a rank makes from its own clock (the time budget, the budget plan) are made once for
  all: the stop is voted every few steps (``finetune.budget.BudgetStop``: the least steps that fit
  any rank's budget), the plan is rank 0's.
- Nothing in a step waits for the device (the loss is read a step later, ``finetune.loop``): the
  step's loss is averaged over ranks without Fabric's barrier (``mean_over_ranks``).
- Rank 0 writes (checkpoints, metrics, final/); the others wait at a barrier. Under FSDP every rank first takes
  part in gathering the whole state dicts (``full_state``), so a checkpoint is the same file as on one device.

Launching follows litgpt 0.5.13 (``litgpt/finetune/lora.py``): ``fabric.launch()`` re-runs the
command line once per extra device (Lightning's subprocess launcher) and the script continues on
every rank. On the CPU the processes talk over gloo; Lightning's FSDP is GPU-only, so
``--strategy fsdp`` is refused without CUDA (and, untested on the CPU, is the part still to verify on GPUs).
"""

from __future__ import annotations

import os
import random
from typing import Literal

import torch

Strategy = Literal["auto", "ddp", "fsdp"]
STRATEGIES = ("auto", "ddp", "fsdp")


def check(
    devices: int,
    strategy: str,
    quantize: str | None,
    global_batch_size: int,
    micro_batch_size: int,
    score_interval: int | None,
    cuda_devices: int | None = None,
    cpus: int | None = None,
) -> None:
    """Refuse, naming the option, a device count or strategy that cannot work here (before anything loads)."""
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: choose one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"devices: a number of devices (processes) >= 1, got {devices!r}")
    if cuda_devices and devices > cuda_devices:
        raise ValueError(f"devices: {devices} asked for, this machine has {cuda_devices} CUDA device(s)")
    if not cuda_devices and devices > cpus:
        raise ValueError(f"devices: {devices} CPU processes asked for, this machine has {cpus} CPU core(s)")
    if strategy == "fsdp" and not cuda_devices:
        raise ValueError("strategy: fsdp shards over CUDA GPUs (Lightning's FSDP is GPU-only); on the CPU use --strategy ddp")
    if devices > 1 and quantize is not None:
        raise ValueError(
            f"quantize: {quantize} (QLoRA) runs on one device (as in litgpt 0.5.13: 4-bit weights are neither replicated nor "
            "sharded by Fabric's DDP/FSDP); drop --quantize or use --devices 1"
        )
    if devices > 1 and score_interval:
        raise ValueError(
            "eval.score_interval: scoring checkpoints while training runs on one device; with --devices > 1 score them after with make eval"
        )
    per_step = devices * micro_batch_size
    if global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size: {global_batch_size} rows per step do not split into --devices {devices} x "
            f"train.micro_batch_size {micro_batch_size} ({per_step}) x a whole number of accumulation steps; "
            f"give a global batch that is a multiple of {per_step}"
        )


def fabric_strategy(strategy: str, devices: int, trains_everything: bool):
    """What ``L.Fabric(strategy=...)`` gets. FSDP wraps each transformer block (litgpt's policy): the frozen base
    is sharded with the trainable parameters beside it (``use_orig_params``), and a full finetune's
    AdamW state follows its sharded parameters."""
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy
        from litgpt.model import Block

        del trains_everything  # the same wrapping shards weights, gradients and optimizer state for every method
        return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", limit_all_gathers=True, use_orig_params=True, cpu_offload=False)
    if strategy == "ddp" or (strategy == "auto" and devices > 1):
        from lightning.fabric.strategies import DDPStrategy

        # The model's buffers (RoPE cos/sin, masks) are computed alike on every rank: no broadcast before each forward.
        return DDPStrategy(broadcast_buffers=False)
    return strategy


class RankBatches:
    """One rank's share of a seeded batch order (``EpochBatches`` or ``PackedBatches``), identical on every rank.

    Each ``next`` draws ``world_size`` micro-batches from the shared order and returns the ``rank``-th;
    the 1-process run takes the same ``world_size`` micro-batches one after the other in its
    accumulation. ``tokens`` is what all of them hold (the world's tokens of that micro-step), ``targets`` their
    labelled targets (per row: ``targets[i]``) and ``rank_targets`` this rank's, which weight each micro-batch's loss (``finetune.loop.loss_weights``).
    """

    def __init__(self, batches, rank: int, world_size: int, lengths: list[int], targets: list[int] | None = None) -> None:
        self.batches, self.rank, self.world_size, self.lengths = batches, rank, world_size, lengths
        self.row_targets = targets
        self.tokens = self.targets = self.rank_targets = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.batches.batches_per_epoch

    def next(self):
        drawn = [self.batches.next() for _ in range(self.world_size)]
        self.tokens = sum(self.lengths[i] for batch in drawn for i in _flat(batch))
        if self.row_targets is not None:
            per_rank = [sum(self.row_targets[i] for i in _flat(batch)) for batch in drawn]
            self.targets, self.rank_targets = sum(per_rank), per_rank[self.rank]
        return drawn[self.rank]

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def _flat(batch: list) -> list[int]:
    """Row indices of a batch: a list of rows, or (packed) a list of packed rows of row indices."""
    return [i for item in batch for i in (item if isinstance(item, list) else [item])]


def is_fsdp(fabric) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def full_state(fabric, model, optimizer=None) -> tuple[dict, dict | None]:
    """The model's (and optimizer's) whole state dicts, keyed as on one device. Every rank must call it: under FSDP
    the shards are gathered (torch.distributed.checkpoint's full state dicts, on the CPU); otherwise these are
    the module's and optimizer's own ``state_dict()``."""
    if not is_fsdp(fabric):
        return model.state_dict(), None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model._forward_module, options=options), None
    return get_state_dict(model._forward_module, getattr(optimizer, "optimizer", optimizer), options=options)


def state_loader(fabric, model, optimizer):
    """For ``finetune.state.load_state``: under FSDP, load whole state dicts into the shards (every rank reads the
    file); None elsewhere (the plain ``load_state_dict``)."""
    if not is_fsdp(fabric):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    def load(model_state: dict, optimizer_state: dict) -> tuple[list[str], list[str]]:
        options = StateDictOptions(full_state_dict=True, strict=False)
        result = set_state_dict(
            model._forward_module,
            getattr(optimizer, "optimizer", optimizer),
            model_state_dict=model_state,
            optim_state_dict=optimizer_state,
            options=options,
        )
        return list(result.missing_keys), list(result.unexpected_keys)

    return load


def rank_rng_states(fabric) -> list[dict] | None:
    """Every rank's RNG state (rank order), for a checkpoint that resumes dropout and NEFTune exactly; None on one process."""
    from finetune.state import rng_state

    if fabric.world_size == 1:
        return None
    states: list = [None] * fabric.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def mean_over_ranks(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """``value`` (this rank's, summed in place) averaged over every rank, queued on the device behind the step.

    Not ``fabric.all_reduce``: Lightning calls a barrier before each reduce, and NCCL's barrier blocks the host
    until the GPU has run everything queued (torch's note on ``barrier``), once a step. A plain NCCL all-reduce
    only orders the device's streams. Gloo sums and divides as Lightning does there (no AVG on gloo)."""
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value / world_size


def seed_rank(seed: int, rank: int) -> None:
    """Ranks > 0 draw their own dropout and NEFTune noise (rank 0 keeps the 1-process stream)."""
    if rank:
        random.seed(seed + rank)
        torch.manual_seed(seed + rank)
