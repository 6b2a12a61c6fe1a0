"""Where a training step's time goes: our LoRA/QLoRA step under torch.profiler, by kind of kernel.

    python -m bench.profile_step --out_dir $OUT --quantize bnb.nf4

Builds a random-weight model through the finetune script's own ``build_model``, ``build_optimizer``
and ``finetune.speed.prepare`` (so every speed option applies), warms up (compiles), then profiles
full-length steps (forward, backward, AdamW) on random tokens. Printed JSON: the step's wall time,
device busy time by category (GEMMs, attention, 4-bit dequantization, optimizer, copies, the rest:
norms, RoPE, activations, adds), the time the device sat idle (launch gaps, host syncs), and the
longest kernels. On a CPU the categories are the CPU time of the aten ops instead.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from finetune.config import TrainArgs

CATEGORIES = {  # first match wins; kernel names (CUDA) and aten op names (CPU)
    "dequantize_4bit": r"dequantize|bitwise_and|kDequantize",
    "attention": r"flash|fmha|attention|flex",
    "gemm": r"gemm|cutlass|xmma|nvjet|cublas|^aten::(mm|addmm|bmm)$",
    "optimizer": r"adam|multi_tensor|_foreach",
    "copies": r"memcpy|memset|^aten::copy_$",
}


def category(name: str) -> str:
    return next((c for c, pattern in CATEGORIES.items() if re.search(pattern, name, re.IGNORECASE)), "other")


def summarize(prof, steps: int, wall_s: float, cuda: bool) -> dict:
    """Per-step busy milliseconds by category and the idle rest, from the profile's own events."""
    per_category: dict[str, float] = {c: 0.0 for c in (*CATEGORIES, "other")}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            if not event.key.startswith("aten::") or event.key in ("aten::empty", "aten::view", "aten::as_strided"):
                continue
            us = event.self_cpu_time_total
        per_category[category(event.key)] += us / 1e3 / steps
        kernels[event.key] = kernels.get(event.key, 0.0) + us / 1e3 / steps
    busy = sum(per_category.values())
    step_ms = wall_s * 1e3 / steps
    return {
        "step_ms": round(step_ms, 2),
        "busy_ms": {k: round(v, 2) for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])},
        "busy_share": {k: round(v / step_ms, 3) for k, v in per_category.items() if v},
        "idle_ms": round(max(step_ms - busy, 0.0), 2) if cuda else None,  # one stream: what no kernel filled
        "top": [{"name": k[:120], "ms": round(v, 3)} for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]],
    }


def main(
    out_dir: Path = Path("out/bench"),
    model_name: str = "Mistral-7B-v0.1",
    quantize: str | None = None,
    work_dir: Path = Path("/tmp/bench_profile"),
    steps: int = 3,
    max_seq_length: int = 2048,
    lora_r: int = 16,
    speed: dict | None = None,
) -> dict:
    """Profile ``steps`` micro-batch-1 steps of LoRA r``lora_r`` on every linear layer and the head.

    Args:
        model_name: a litgpt config name (random weights), or "tiny" (the embedded model; CPU smoke test).
        quantize: None (bf16 LoRA) or a QLoRA mode such as "bnb.nf4".
        speed: ``finetune.speed.SpeedArgs`` overrides, e.g. '{"dequantize_4bit": "bitsandbytes"}'.
    """
    from core.methods import METHODS
    from core.tiny import build_tiny
    from finetune.loop import batch_loss
    from finetune.lora import LoRAArgs
    from finetune.run import build_model, build_optimizer, make_fabric
    from finetune.speed import SpeedArgs, prepare, random_batch

    cuda = torch.cuda.is_available()
    build_tiny(work_dir / "tiny", work_dir / "tiny-data")  # the model for "tiny", else the tokenizer
    if model_name == "tiny":
        base = work_dir / "tiny"
    else:
        from bench.random_checkpoint import write_random_checkpoint

        base = write_random_checkpoint(model_name, work_dir / f"{model_name}-random", tokenizer_dir=work_dir / "tiny")
    method = METHODS["lora"]
    speed_args = SpeedArgs(**{"micro_batch": "fixed", **(speed or {})})
    fabric = make_fabric("bf16-true" if cuda else "32-true", quantize, method, speed_args.quantize_from_compute_dtype)
    model = build_model(fabric, method, LoRAArgs(r=lora_r, alpha=2 * lora_r).as_config(), base, quantize, max_seq_length)
    optimizer = build_optimizer(fabric, model, 1e-4, 0.0)
    setup = prepare(fabric, model, "lora", speed_args, TrainArgs(micro_batch_size=1), max_seq_length, quantize)
    # one sequence a row, as in bench.finetune's 2048 cases: plain causal attention
    batch = random_batch(model.module.config.vocab_size, 1, max_seq_length, False, fabric.device)

    def step() -> None:
        with fabric.autocast():
            loss = batch_loss(model, batch, setup.checkpoint_blocks)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # compile and warm the allocator
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "model": f"{model_name} (random)",
        "quantize": quantize,
        "lora": f"r{lora_r} all linear + head",
        "tokens_per_step": max_seq_length,
        "steps": steps,
        "speed": {k: v for k, v in dataclasses.asdict(setup).items() if k != "train"},
        **summarize(prof, steps, wall, cuda),
    }
    result["tokens_per_s_under_profiler"] = round(max_seq_length / (result["step_ms"] / 1e3), 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_step-{quantize or 'bf16'}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
