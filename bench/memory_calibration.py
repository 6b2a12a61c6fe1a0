"""GPU check of the memory planner: measured peak memory and step time of our training step, per plan.

    python -m bench.memory_calibration --out_dir $OUT --precisions '[bf16]'
    python -m bench.memory_calibration --out_dir $OUT --precisions '[nf4]'   # in a process of its own

Loads a random Mistral-7B once per precision (bf16, nf4) through the finetune script's own
``build_model`` and ``finetune.speed.prepare``, then times full-length steps (forward, backward,
AdamW) for several (micro-batch, checkpointing) plans, first eager and then with torch.compile.
Prints the measured peaks next to ``finetune.memory_plan``'s estimates, and the activation factor
the measurements imply (what ``ACTIVATION_FACTOR`` should be).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from finetune.config import TrainArgs
from finetune.memory_plan import GIB, ModelShape, Plan, estimate_gib


def time_steps(fabric, model, optimizer, plan: Plan, max_seq_length: int, steps: int) -> dict:
    from finetune.speed import probe_step

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        probe_step(fabric, model, plan, max_seq_length, packing=True)  # warm-up (and compile)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            probe_step(fabric, model, plan, max_seq_length, packing=True)
            optimizer.step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"oom": True}
    seconds = (time.perf_counter() - t0) / steps
    tokens = plan.micro_batch_size * max_seq_length
    return {
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def calibrate(base: Path, quantize: str | None, plans: list[tuple[int, bool]], max_seq_length: int, steps: int) -> dict:
    from core.methods import METHODS
    from finetune.lora import LoRAArgs
    from finetune.run import build_model, build_optimizer, make_fabric
    from finetune.speed import SpeedArgs, prepare

    method = METHODS["lora"]
    fabric = make_fabric("bf16-true", quantize, method)
    model = build_model(fabric, method, LoRAArgs(r=16, alpha=32).as_config(), base, quantize, max_seq_length)
    optimizer = build_optimizer(fabric, model, 1e-4, 0.0)
    shape = ModelShape.of(model.module)
    out = {}
    for compiled in (False, True):
        prepare(fabric, model, "lora", SpeedArgs(compile=compiled, micro_batch="fixed"), TrainArgs(micro_batch_size=1), max_seq_length, quantize)
        for mb, ckpt in plans:
            estimate = estimate_gib(shape, mb * max_seq_length, ckpt, quantize, False, compiled)
            measured = time_steps(fabric, model, optimizer, Plan(mb, ckpt, estimate["total"], 80), max_seq_length, steps)
            if "peak_allocated_gib" in measured:  # what the activation term would have to be
                rest = estimate["total"] - estimate["activations"] - estimate["overhead"]
                measured["implied_activation_factor"] = round((measured["peak_reserved_gib"] - rest) / estimate["activations"], 3)
            out[f"{'compiled' if compiled else 'eager'} mb{mb}{' ckpt' if ckpt else ''}"] = {"estimate_gib": round(estimate["total"], 2), **measured}
            print(json.dumps({quantize or "bf16": out}), flush=True)
    del model, optimizer
    torch.cuda.empty_cache()
    return out


def main(
    out_dir: Path = Path("out/bench"),
    work_dir: Path = Path("/tmp/finetune_memory"),
    steps: int = 4,
    max_seq_length: int = 2048,
    precisions: list[str] = ["bf16", "nf4"],
) -> None:
    """Calibrate each of ``precisions`` ("bf16", "nf4"). For clean peaks run one a process: torch.compile's
    caches keep an earlier model alive (``--precisions '[nf4]'`` in a command of its own)."""
    if unknown := [p for p in precisions if p not in ("bf16", "nf4")]:
        raise ValueError(f"precisions: unknown {unknown}; choose from ['bf16', 'nf4']")
    from bench.random_checkpoint import write_random_checkpoint
    from core.tiny import build_tiny

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny(work_dir / "tiny", work_dir / "tiny-data")
    base = write_random_checkpoint("Mistral-7B-v0.1", work_dir / "mistral-7b-random", tokenizer_dir=work_dir / "tiny")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "Mistral-7B-v0.1 (random bf16)",
        "max_seq_length": max_seq_length,
    }
    if "bf16" in precisions:
        result["bf16"] = calibrate(base, None, [(1, False), (2, False), (1, True), (4, True)], max_seq_length, steps)
    if "nf4" in precisions:
        result["nf4"] = calibrate(base, "bnb.nf4", [(1, False), (2, False), (2, True)], max_seq_length, steps)
    text = json.dumps(result, indent=2)
    (out_dir / "memory_calibration.json").write_text(text)
    print(text)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
