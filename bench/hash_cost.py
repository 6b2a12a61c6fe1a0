"""What recording and checking a weights file's sha256 costs, scaled to a 7B model's 14 GB.

    python -m bench.hash_cost --size_mib 1024 --out_dir out/bench

Times, on one state dict of ``size_mib`` of bf16 tensors written to ``out_dir``:
- ``torch.save`` to a path (what litgpt does; the page cache only), the same fsynced (what a save that
  survives a crash costs), and ``core.integrity.save_torch`` (atomic, fsynced, hashing the bytes as they
  are written): the last two differ by the hash alone;
- ``sha256_file`` on the saved file (what a check at load costs, and a separate hashing pass would):
  once from the page cache (the usual case right after a save or download) and hashlib's in-memory rate;
- ``torch.load(mmap=True)`` plus touching every tensor (what loading costs anyway), for comparison.
Prints and writes ``hash_cost.json`` with seconds, GB/s and the same scaled to 14 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from core.integrity import recorded_sha256, save_torch, sha256_file

GB = 1e9
SEVEN_B_BYTES = 14.5e9  # Mistral-7B's lit_model.pth in bf16


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _state(size_mib: int) -> dict[str, torch.Tensor]:
    n = size_mib << 20
    shape = (4096, 4096)  # a 7B attention projection, 32 MiB in bf16
    per = shape[0] * shape[1] * 2
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(shape, generator=g).to(torch.bfloat16) for i in range(max(1, n // per))}


def main(size_mib: int = 1024, out_dir: Path = Path("out/bench"), repeats: int = 2) -> dict:
    """Time plain and hashed saves, a hash of the file, and a load, on ``size_mib`` of weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _state(size_mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    plain, hashed = out_dir / "hash_cost_plain.pth", out_dir / "hash_cost_hashed.pth"

    def load_all() -> None:
        loaded = torch.load(hashed, mmap=True, weights_only=True, map_location="cpu")
        sum(float(t.view(-1).view(torch.int16)[::2048].sum()) for t in loaded.values())  # read every 4 KiB page

    def save_fsync() -> None:
        with open(plain, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    block = os.urandom(64 << 20)
    rows = {
        "torch_save_s": min(_timed(lambda: torch.save(state, plain)) for _ in range(repeats)),
        "torch_save_fsync_s": min(_timed(save_fsync) for _ in range(repeats)),
        "save_torch_hashed_atomic_s": min(_timed(lambda: save_torch(state, hashed)) for _ in range(repeats)),
        "sha256_file_cached_s": min(_timed(lambda: sha256_file(hashed)) for _ in range(repeats)),
        "torch_load_mmap_touch_s": min(_timed(load_all) for _ in range(repeats)),
        "sha256_in_memory_gbs": round(len(block) / min(_timed(lambda: hashlib.sha256(block).digest()) for _ in range(repeats)) / GB, 3),
    }
    assert sha256_file(hashed) == recorded_sha256(hashed)  # hashing while writing gives the file's own sha256
    scale = SEVEN_B_BYTES / nbytes
    result = {
        "bytes": nbytes,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        **{k: round(v, 3) for k, v in rows.items()},
        "hash_check_gbs": round(nbytes / rows["sha256_file_cached_s"] / GB, 3),
        "scaled_to_14.5GB": {k.removesuffix("_s"): round(v * scale, 1) for k, v in rows.items() if k.endswith("_s")},
        "hash_while_writing_overhead_pct": round(100 * (rows["save_torch_hashed_atomic_s"] / rows["torch_save_fsync_s"] - 1), 1),
    }
    for path in (plain, hashed, hashed.with_name(hashed.name + ".sha256")):
        path.unlink(missing_ok=True)
    (out_dir / "hash_cost.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
