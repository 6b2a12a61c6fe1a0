"""GPU check: QLoRA (and LoRA) on a 7B architecture at 2048 tokens, peak memory and tokens/s.

    python -m bench.finetune_memory --out_dir $OUT

Random bf16 Mistral-7B weights; every training row is longer than 2048 tokens, so each micro-batch of
1 is exactly 2048 tokens. Runs our real finetune script (``finetune.lora.setup``) for a few steps per
configuration and prints one JSON object (also written to ``out_dir/finetune_memory.json``).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from finetune.config import EvalArgs, TrainArgs


def long_rows(n: int, words: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": "Summarize the text.", "input": "", "output": " ".join(rng.choices(words, k=4000))} for _ in range(n)]


def measure(base: Path, data: Path, out: Path, quantize: str | None, steps: int) -> dict:
    from finetune.config import DataArgs
    from finetune.lora import LoRAArgs, setup

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    final = setup(
        checkpoint_dir=base,
        out_dir=out,
        quantize=quantize,
        lr=2e-4,
        lora=LoRAArgs(r=16, alpha=32),  # all linear layers and the head
        data=DataArgs(train_file=data, max_seq_length=2048, val_fraction=0.01),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=1, micro_batch_size=1, lr_warmup_steps=1, max_steps=steps),
        eval=EvalArgs(interval=0, final_validation=False),
    )
    wall = time.perf_counter() - t0
    trained = json.loads((final / "trained.json").read_text())
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    # steady state: the second half of the steps
    half = [r.split(",") for r in rows[len(rows) // 2 :]]
    tok = int(half[-1][3]) - int(rows[len(rows) // 2 - 1].split(",")[3])
    sec = float(half[-1][4]) - float(rows[len(rows) // 2 - 1].split(",")[4])
    return {
        "quantize": quantize or "none (bf16)",
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "steps": trained["steps"],
        "tokens_per_s_steady": round(tok / sec, 1),
        "wall_s_incl_load": round(wall, 1),
    }


def main(out_dir: Path = Path("out/bench"), work_dir: Path = Path("/tmp/finetune_memory"), steps: int = 8, window_baseline: bool = True) -> None:
    """Run QLoRA nf4 and bf16 LoRA at 1 x 2048 tokens on a random Mistral-7B and write finetune_memory.json.

    ``window_baseline`` also runs bf16 LoRA the way litgpt does, with Mistral's sliding-window mask
    (which the finetune script drops when the data fit the window), for the ratio in the same run.
    """
    from bench.random_checkpoint import write_random_checkpoint
    from core.synthetic_tasks import WORDS, write_jsonl
    from core.tiny import build_tiny

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny(work_dir / "tiny", work_dir / "tiny-data")
    base = write_random_checkpoint("Mistral-7B-v0.1", work_dir / "mistral-7b-random", tokenizer_dir=work_dir / "tiny")
    data = work_dir / "long.jsonl"
    write_jsonl(long_rows(64, WORDS), data)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "Mistral-7B-v0.1 (random bf16)",
        "lora": "r16 alpha32, all linear layers + head",
        "tokens_per_step": 2048,
    }
    result["qlora_nf4"] = measure(base, data, work_dir / "run-nf4", "bnb.nf4", steps)
    result["lora_bf16"] = measure(base, data, work_dir / "run-bf16", None, steps)
    result["qlora_nf4_fits_22gib"] = result["qlora_nf4"]["peak_reserved_gib"] <= 22
    if window_baseline:
        import finetune.run

        dropped_window = finetune.run.attention_overrides
        finetune.run.attention_overrides = lambda config, max_seq_length: {}  # keep the mask, as upstream litgpt
        try:
            result["lora_bf16_with_window_mask"] = measure(base, data, work_dir / "run-bf16-window", None, steps)
        finally:
            finetune.run.attention_overrides = dropped_window
        result["speedup_without_window_mask"] = round(
            result["lora_bf16"]["tokens_per_s_steady"] / result["lora_bf16_with_window_mask"]["tokens_per_s_steady"], 2
        )
    text = json.dumps(result, indent=2)
    (out_dir / "finetune_memory.json").write_text(text)
    print(text)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
