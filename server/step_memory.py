"""The GPU KV pool gets what a measured worst-case step leaves under the memory limit (vLLM v1's profile run).

An arithmetic estimate of what serving needs beside the weights and the KV cache was too small:
Llama-2-7B under a 24 GiB cap ran out of memory at start (its decode graphs alone took 1.92 GiB).
So, as vLLM's ``determine_available_memory`` does, the engine measures instead, after the weights
are loaded and before the real pool exists:

1. the allocator is settled (cache emptied, peak reset); what it holds then is the weights;
2. a runner with a provisional pool of one window captures every CUDA graph the engine will replay
   and runs the worst steps the engine can take (``worst_steps``), the allocator settled after each;
3. the largest peak less the weights and the provisional pool is what the steps and graphs take;
4. the runner is dropped and the allocator settled again; the pool gets the limit less the weights,
   the steps and a small margin (fragmentation, kernels loaded later).

The arithmetic is behind ``MemoryProbe`` so that CPU tests can check it, and its order, with a fake.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from server.generate import echo_scores, new_generator, pick
from server.gpu_memory import GIB, allowed_bytes
from server.paged_model import SHORT_SEGMENT, PagedModel, Segment
from server.schemas import MAX_TOP_LOGPROBS, ProcessRequest

MARGIN_GIB = 0.5  # the margin is this or MARGIN_FRACTION of the limit, whichever is larger
MARGIN_FRACTION = 0.02

Runner = TypeVar("Runner")


class MemoryProbe(Protocol):
    def settle(self) -> None:
        """Free what nothing holds (cached blocks, dead graphs) and start a new peak."""

    def reserved(self) -> int:
        """Bytes the allocator holds now."""

    def peak(self) -> int:
        """The most bytes the allocator held since ``settle``."""

    def limit(self) -> int:
        """The most bytes the allocator may hold: the cap, or the device's free memory."""


class CudaProbe:
    def __init__(self, device: torch.device, gpu_memory_gib: float | None) -> None:
        self.device, self.gpu_memory_gib = device, gpu_memory_gib

    def settle(self) -> None:
        gc.collect()  # graphs and runners held only by reference cycles
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def limit(self) -> int:
        return allowed_bytes(self.device, self.gpu_memory_gib)


@dataclass(frozen=True)
class Measured:
    limit: int  # bytes the allocator may hold in all
    weights: int  # held before the profile
    peak: int  # held at most during the profile
    provisional: int  # the provisional pool's bytes (part of the peak)
    worst: str = ""  # the stage that reached the peak

    @property
    def steps(self) -> int:
        """Activations, logits, sampling and CUDA graph pools of the worst steps."""
        return max(self.peak - self.weights - self.provisional, 0)

    @property
    def margin(self) -> int:
        return max(int(MARGIN_GIB * GIB), int(MARGIN_FRACTION * self.limit))

    @property
    def kv_room(self) -> int:
        """Bytes the KV pool may take."""
        return max(self.limit - self.weights - self.steps - self.margin, 0)

    def breakdown(self, pool_bytes: int, pool_tokens: int) -> str:
        """One line: where the limit goes."""
        parts = [("weights", self.weights), (f"steps and graphs (measured; worst: {self.worst or '-'})", self.steps), (f"KV pool {pool_tokens:,} tokens", pool_bytes),
                 ("margin", self.margin), ("unused", max(self.limit - self.weights - self.steps - pool_bytes - self.margin, 0))]  # fmt: skip
        return f"memory: {self.limit / GIB:.2f} GiB allowed = " + " + ".join(f"{name} {b / GIB:.2f}" for name, b in parts) + " GiB"


def measure(
    probe: MemoryProbe, build: Callable[[int], Runner], profile: Callable[[Runner], Iterator[str]], provisional_blocks: int, block_bytes: int
) -> Measured:
    """Run the stages of ``profile`` on ``build(provisional_blocks)`` and read the allocator around them.

    The allocator is settled after each stage (what a stage leaves cached is given back, as the allocator
    does at the cap before it fails), so the peak is the largest stage's, not their cached sum."""
    probe.settle()
    weights = probe.reserved()
    runner = build(provisional_blocks)
    peak, worst = weights, ""
    try:
        for stage in profile(runner):
            if (top := probe.peak()) > peak:
                peak, worst = top, stage
            probe.settle()
    except torch.OutOfMemoryError as e:
        raise ValueError(
            f"the worst step does not fit in {probe.limit() / GIB:.2f} GiB beside {weights / GIB:.2f} GiB of weights and a "
            f"{provisional_blocks - 1}-block KV pool ({str(e).splitlines()[0]}); lower --max_batch, --prefill_tokens, "
            "--attention_tokens or --max_seq_length, raise --gpu_memory_gib, or serve quantized (--quantize bnb.nf4)"
        ) from None
    del runner
    probe.settle()
    return Measured(limit=probe.limit(), weights=weights, peak=peak, provisional=provisional_blocks * block_bytes, worst=worst)


def measured_blocks(m: Measured, block_size: int, block_bytes: int, window: int, kv_tokens: int | None) -> int:
    """Blocks in the pool (block 0, the padding block, included): ``kv_tokens`` if it fits, else all that fit."""
    room = m.kv_room // block_bytes
    if kv_tokens is not None:
        blocks = math.ceil(kv_tokens / block_size) + 1
        if blocks > room:
            raise ValueError(
                f"kv_tokens: {kv_tokens} tokens need {blocks * block_bytes / GIB:.2f} GiB of KV cache but only "
                f"{m.kv_room / GIB:.2f} GiB are left ({m.breakdown(0, 0)}); ask for at most {max(room - 1, 0) * block_size} "
                "or leave --kv_tokens unset"
            )
        return blocks
    if (room - 1) * block_size < window:
        raise ValueError(
            f"the KV cache needs {window * block_bytes / block_size / 2**20:.0f} MiB for one {window}-token sequence but only "
            f"{m.kv_room / 2**20:.0f} MiB are left ({m.breakdown(0, 0)}); lower --max_seq_length, --max_batch or "
            "--prefill_tokens, serve quantized (--quantize bnb.nf4) or a smaller model"
        )
    return room


def worst_prefills(max_len: int, max_batch: int, prefill_tokens: int, echo_tokens: int) -> list[list[tuple[int, int, bool]]]:
    """Prefill chunks (start, tokens, echo) per segment that the scheduler may form and that take the most
    memory: full-budget chunks from position 0 and at the window's end (a continued prompt: masked
    attention over the whole window), each with an echo segment (logits for all its positions), and the
    most short segments at the window's end (one batched attention over ``max_batch`` gathered windows)."""
    chunks = []
    for at_end in (False, True):
        longest = max_len - int(at_end)  # a continued prompt starts at position 1 or later
        if longest < 1:
            continue
        echo = min(echo_tokens, longest, prefill_tokens)
        chunk, budget = [(max_len - echo if at_end else 0, echo, True)], prefill_tokens - echo
        while budget > 0 and len(chunk) < max_batch:
            take = min(budget, longest)
            chunk.append((max_len - take if at_end else 0, take, False))
            budget -= take
        chunks.append(chunk)
    n = min(max_batch, prefill_tokens)
    if n >= 2 and max_len >= 2:
        take = max(1, min(SHORT_SEGMENT, prefill_tokens // n, max_len - 1))
        chunks.append([(max_len - take, take, False)] * n)
    return chunks


def worst_steps(runner: PagedModel, max_batch: int, prefill_tokens: int, echo_tokens: int) -> Iterator[str]:
    """Stages, each named when done: every decode graph (first, as the server's warm-up captures them),
    the chunks of ``worst_prefills`` with their echo scoring, and the largest decode batch at the longest
    length with sampling and top logprobs (on a runner whose pool holds one window)."""
    if runner.warmup(max_batch, runner.max_len):
        yield "decode graphs"
    table = list(range(1, runner.max_blocks + 1))  # every segment writes the same blocks: only the sizes matter
    for chunk in worst_prefills(runner.max_len, max_batch, prefill_tokens, echo_tokens):
        segments = [Segment(table, start, [0] * take, all_logits=echo) for start, take, echo in chunk]
        _prefill_and_score(runner, segments)
        yield f"prefill of {len(chunk)} segments from position {chunk[-1][0]}"
    req = ProcessRequest(prompt="x", temperature=1.0, top_k=200, top_p=0.9, top_k_per_token=MAX_TOP_LOGPROBS)
    with torch.inference_mode():
        logits = runner.decode([0] * max_batch, [runner.max_len - 1] * max_batch, [table] * max_batch)
        _ = pick(logits, [(slice(0, max_batch), req, new_generator(req, runner.device))]).ids  # read back, as the engine does
    del logits
    yield f"decode of {max_batch} sequences with sampling"


@torch.inference_mode()
def _prefill_and_score(runner: PagedModel, segments: list[Segment]) -> None:
    """One prefill and the engine's echo scoring of its all-logits segments (nothing outlives the call)."""
    for s, logits in zip(segments, runner.prefill(segments)):
        if s.all_logits:
            echo_scores(logits, [0] * len(s.ids), MAX_TOP_LOGPROBS)
