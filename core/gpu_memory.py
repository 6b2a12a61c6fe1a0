"""What a GPU of N GiB leaves a training or serving process: shared by finetune/ and server/.

The CUDA context and its kernels live outside torch's caching allocator, so a 24 GiB card's allocator gets about
``CUDA_CONTEXT_GIB`` less than 24 GiB. Measured on an H200 (torch 2.11, CUDA 13, 2026-12-03, BENCHMARKS.md issue 14):
nvidia-smi's process peak less torch's peak reserved was 0.95-0.96 GiB for three 7B servers; 0.75 let a
Mistral-7B server reach 24.16 GiB under a "24 GiB" cap.
A plan is then kept ``margin_gib`` under that, for fragmentation and what one probe step does not show.
"""

from __future__ import annotations

CUDA_CONTEXT_GIB = 1.0


def usable_gib(card_gib: float) -> float:
    """What the caching allocator can get on a card of ``card_gib``: the cap a rehearsal runs under."""
    return card_gib - CUDA_CONTEXT_GIB


def margin_gib(card_gib: float) -> float:
    """Room a plan leaves under the usable memory: 1 GiB or 5% of the card, whichever is more."""
    return max(1.0, 0.05 * card_gib)
