"""Seeded, resumable batch order: the same seed gives the same batches, and (epoch, index) says where we are.

A resumed run continues with exactly the batch the interrupted run would have taken next, which is
what makes "resume equals uninterrupted" hold.
"""

from __future__ import annotations

import torch


class EpochBatches:
    """Shuffles row indices each epoch (seed + epoch) and yields full batches; the last partial one is dropped."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        if n_rows < batch_size:
            raise ValueError(f"micro_batch_size: {batch_size} is more than the {n_rows} training rows")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    @property
    def batches_per_epoch(self) -> int:
        return self.n_rows // self.batch_size

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_rows, generator=generator).tolist()

    def next(self) -> list[int]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.index * self.batch_size
        self.index += 1
        return self._order[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n_rows": self.n_rows, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_rows", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"resume: the checkpoint was made with {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``, except ``mask``, which only counts tokens and stays on the CPU.

    On CUDA they go through pinned memory without blocking: a plain ``.to("cuda")`` from pageable
    memory waits until every kernel already queued has run, so the GPU would idle at each micro-batch
    while the CPU prepares the next one.
    """
    if device.type != "cuda":
        return {k: v if k == "mask" else v.to(device) for k, v in batch.items()}
    return {k: v if k == "mask" else v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
