"""How much GPU memory the server may use: all of it, or what a smaller card would have (``--gpu_memory_gib``).

The cap is real, not arithmetic: ``torch.cuda.set_per_process_memory_fraction`` makes the caching
allocator refuse to grow past it (as ``--speed.gpu_memory_gib`` does for finetuning), so a server
rehearsed under 24 GiB on a larger GPU runs out of memory where a 24 GiB card would.
"""

from __future__ import annotations

import torch

from core.gpu_memory import CUDA_CONTEXT_GIB

GIB = 2**30


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: torch's memory-fraction call needs an index."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def cap(device: torch.device, gpu_memory_gib: float | None) -> None:
    """Limit this process to ``gpu_memory_gib`` on ``device`` (before the weights are loaded)."""
    if gpu_memory_gib is None:
        return
    if gpu_memory_gib <= CUDA_CONTEXT_GIB:
        raise ValueError(f"gpu_memory_gib: must exceed the CUDA context's {CUDA_CONTEXT_GIB} GiB, got {gpu_memory_gib}")
    if device.type != "cuda":
        raise ValueError(f"gpu_memory_gib: caps GPU memory and needs a CUDA device; this server runs on {device.type}")
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    allocator_gib = gpu_memory_gib - CUDA_CONTEXT_GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, allocator_gib * GIB / total), device)


def allowed_bytes(device: torch.device, gpu_memory_gib: float | None) -> int:
    """The most bytes this process's allocator may hold on ``device``: what it holds plus what is free,
    and never more than the cap gives it."""
    device = _indexed(device)
    allowed = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    if gpu_memory_gib is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        allowed = min(allowed, total, int((gpu_memory_gib - CUDA_CONTEXT_GIB) * GIB))
    return allowed
