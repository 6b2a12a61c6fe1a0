"""GPU check of the memory plan against a real run under a true cap (issue 13, item 6).

    python -m bench.plan_check --out_dir $OUT --case recipe4090     # README's 4090 recipe under 24 GiB
    python -m bench.plan_check --out_dir $OUT --case qwen14b-40     # the A100 winner's setup under 40 GiB

Random bf16 weights of the real architecture, every row longer than 2048 tokens. Runs our real
``finetune.lora.setup`` with ``--speed.micro_batch auto`` and ``--speed.gpu_memory_gib`` (the allocator
capped at what that card leaves it), for a few steps, and records the plan the script printed, the
chosen plan's estimate, the measured peak over the whole run, the headroom to the card and tokens/s.
Writes ``out_dir/plan_check-<case>.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from core.gpu_memory import CUDA_CONTEXT_GIB

# case: (litgpt config, quantize, LoRA rank, card GiB, global batch, speed overrides)
CASES = {
    "recipe4090": ("Mistral-7B-v0.1", "bnb.nf4", 64, 24.0, 8, {}),
    "qwen14b-40": ("Qwen2.5-14B", None, 8, 40.0, 16, {}),
}


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def check(case: str, work_dir: Path, steps: int, speed: dict | None = None) -> dict:
    import yaml
    from litgpt.lora import GPT as LoRAGPT
    from litgpt.lora import Config as LoRAConfig

    from bench.finetune_memory import long_rows
    from bench.random_checkpoint import write_random_checkpoint
    from core.configs import config_from_name
    from core.gpu_memory import margin_gib, usable_gib
    from core.methods import METHODS
    from core.synthetic_tasks import WORDS, write_jsonl
    from core.tiny import build_tiny
    from finetune.config import DataArgs, EvalArgs, TrainArgs
    from finetune.lora import LoRAArgs, setup
    from finetune.memory_plan import ModelShape, estimate_gib
    from finetune.speed import SpeedArgs

    config_name, quantize, rank, card, global_batch, overrides = CASES[case]
    build_tiny(work_dir / "tiny", work_dir / "tiny-data")
    base = write_random_checkpoint(config_name, work_dir / f"{config_name}-random", tokenizer_dir=work_dir / "tiny")
    data = work_dir / "long.jsonl"
    write_jsonl(long_rows(2 * global_batch * steps + 8, WORDS), data)  # every step sees new rows
    out = work_dir / f"run-{case}"
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        final = setup(
            checkpoint_dir=base,
            out_dir=out,
            quantize=quantize,
            lr=2e-4,
            lora=LoRAArgs(r=rank, alpha=2 * rank),
            data=DataArgs(train_file=data, max_seq_length=2048, val_fraction=0.01),
            train=TrainArgs(
                save_interval=None, log_interval=1, global_batch_size=global_batch, micro_batch_size=1, lr_warmup_steps=1, max_steps=steps
            ),
            eval=EvalArgs(interval=0, final_validation=False),
            speed=SpeedArgs(gpu_memory_gib=card, **{**overrides, **(speed or {})}),
        )
    wall = time.perf_counter() - t0
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    half = len(rows) // 2
    tokens = int(rows[-1][3]) - int(rows[half - 1][3])
    seconds = float(rows[-1][4]) - float(rows[half - 1][4])
    micro, ckpt = hparams["train"]["micro_batch_size"], hparams["speed"]["checkpoint_blocks"]
    with torch.device("meta"):  # the same model, shapes only, for the estimate of the plan that ran
        model = LoRAGPT(LoRAConfig(**{**dataclasses.asdict(config_from_name(config_name)), **LoRAArgs(r=rank, alpha=2 * rank).as_config()}))
        METHODS["lora"].freeze_all_but_trainable(model)
    estimate = estimate_gib(ModelShape.of(model), micro * 2048, ckpt, quantize, False, hparams["speed"]["compile"])
    peak = torch.cuda.max_memory_reserved() / 2**30
    cap = usable_gib(card)
    return {
        "case": case,
        "model": f"{config_name} (random bf16)",
        "quantize": quantize or "none (bf16)",
        "lora": f"r{rank} a{2 * rank} all linear + head",
        "card_gib": card,
        "allocator_cap_gib": cap,
        "plan_limit_gib": round(cap - margin_gib(card), 2),
        "plan_log": [line for line in log.getvalue().splitlines() if "memory plan" in line or "4-bit dequantization" in line],
        "micro_batch_size": micro,
        "checkpoint_blocks": ckpt,
        "dequantize_4bit_used": json.loads((final / "trained.json").read_text())["dequantize_4bit"],
        "estimate_gib": round(estimate["total"], 2),
        "estimate_parts_gib": {k: round(v, 2) for k, v in estimate.items()},
        "peak_reserved_gib": round(peak, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "headroom_to_card_gib": round(card - peak - CUDA_CONTEXT_GIB, 2),
        "headroom_to_cap_gib": round(cap - peak, 2),
        "estimate_vs_peak": round(estimate["total"] / peak, 3),
        "steps": len(rows),
        "tokens_per_step": tokens / max(len(rows) - half, 1),
        "tokens_per_s_steady": round(tokens / seconds, 1),
        "wall_s": round(wall, 1),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def main(
    out_dir: Path = Path("out/bench"), work_dir: Path = Path("/tmp/plan_check"), case: str = "recipe4090", steps: int = 6, speed: str = "{}"
) -> None:
    """Run ``case`` (see CASES) and write ``out_dir/plan_check-<case>.json``.

    Args:
        speed: JSON of extra ``SpeedArgs`` overrides, e.g. '{"dequantize_4bit": "in-block"}'.
    """
    if case not in CASES:
        raise ValueError(f"case: one of {sorted(CASES)}, got {case!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = check(case, work_dir, steps, json.loads(speed))
    text = json.dumps(result, indent=2)
    (out_dir / f"plan_check-{case}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
