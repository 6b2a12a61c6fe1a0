"""Sequence packing: several training rows share one fixed-length row, and none sees another.

Instruction data is mostly short (Alpaca rows average a few hundred tokens), so padded batches spend
most of their compute on padding. Packed rows are full, and every packed row has the same length,
which is what torch.compile and CUDA want. Correctness comes from three things done together:
attention restricted to each row's own tokens (``finetune.attention``), positions restarting at 0
for each row (RoPE sees what it would see alone), and no loss on a row's first token (unpacked, it is
never a target). The loss is then the same as the padded batch's (``tests/test_packing.py``).

Batch sizes count packed rows: ``micro_batch_size=2`` with ``max_seq_length=2048`` is 4096 tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from finetune.data import IGNORE_INDEX, target_index

PACK_WINDOW = 512  # rows packed together; keeps the epoch's shuffle, wastes a few tokens per window


def pack_rows(lengths: list[int], order: list[int], capacity: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Bins of row indices (each bin's lengths sum to at most ``capacity``), best-fit-decreasing per window.

    Rows are taken ``window`` at a time in ``order``, so the shuffle still decides which rows train
    together; within a window the longest rows are placed first, each in the fullest bin it fits.
    """
    bins: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted
        for i in chunk:
            n = lengths[i]
            if n > capacity:
                raise ValueError(f"row {i} has {n} tokens, more than a packed row's {capacity} (data.max_seq_length)")
            at = bisect.bisect_left(free, (n, -1))
            if at == len(free):
                bins.append([i])
                bisect.insort(free, (capacity - n, len(bins) - 1))
            else:
                room, b = free.pop(at)
                bins[b].append(i)
                bisect.insort(free, (room - n, b))
    return bins


class PackedBatches:
    """Like ``EpochBatches`` (seeded, resumable), but each batch is ``batch_size`` packed rows of row indices.

    Each epoch shuffles the rows (seed + epoch), packs them, and shuffles the packed rows, so long and
    short rows are spread over the epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, capacity: int, seed: int) -> None:
        self.lengths, self.batch_size, self.capacity, self.seed = list(lengths), batch_size, capacity, seed
        self.epoch, self.index = 0, 0
        self._bins = self._pack()
        if len(self._bins) < batch_size:
            raise ValueError(
                f"micro_batch_size: {batch_size} packed rows are more than the {len(self._bins)} that "
                f"{len(lengths)} training rows fill at max_seq_length {capacity}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self._bins) // self.batch_size

    @property
    def fill(self) -> float:
        """Share of packed-row tokens that are real tokens this epoch."""
        return sum(self.lengths) / (len(self._bins) * self.capacity)

    def _pack(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        bins = pack_rows(self.lengths, torch.randperm(len(self.lengths), generator=generator).tolist(), self.capacity)
        return [bins[i] for i in torch.randperm(len(bins), generator=generator).tolist()]

    def next(self) -> list[list[int]]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._bins = self._pack()
        start = self.index * self.batch_size
        self.index += 1
        return self._bins[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "n_rows": len(self.lengths),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "packed_length": self.capacity,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("n_rows", "batch_size", "seed", "packed_length"):
            if state.get(key) != mine[key]:
                raise ValueError(f"resume: the checkpoint was made with {key}={state.get(key)}, this run has {mine[key]}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._bins = self._pack()


@dataclass
class PackCollate:
    """Lay packed rows side by side into ``length``-token rows.

    Besides ``input_ids``/``labels``/``mask`` (real tokens) it returns ``positions`` (restarting at 0
    per row) and ``documents`` (which row each token belongs to; padding gets a number of its own),
    unless no packed row holds more than one row.
    """

    length: int
    pad_id: int = 0

    def __call__(self, packed: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        shape = (len(packed), self.length)
        x = torch.full(shape, self.pad_id, dtype=torch.long)
        y = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        documents = torch.zeros(shape, dtype=torch.int32)
        mask = torch.zeros(shape, dtype=torch.bool)
        for b, rows in enumerate(packed):
            at = 0
            for d, row in enumerate(rows):
                n = len(row["input_ids"])
                x[b, at : at + n], y[b, at : at + n] = row["input_ids"], row["labels"]
                y[b, at] = IGNORE_INDEX  # the token before it belongs to another row
                positions[b, at : at + n] = torch.arange(n)
                documents[b, at : at + n] = d
                mask[b, at : at + n] = True
                at += n
            documents[b, at:] = len(rows)
            positions[b, at:] = torch.arange(self.length - at)
        batch = {"input_ids": x, "labels": y, "mask": mask, "target_index": target_index(y)}
        if any(len(rows) > 1 for rows in packed):
            batch |= {"positions": positions, "documents": documents}
        # else: one row each, padding after it. Plain causal attention is exact then (padding sees the
        # row but no row token sees padding) and takes the flash kernels instead of a block mask.
        return batch
