"""Finetuning speed on identical work: our script vs upstream ``litgpt finetune_lora`` vs HF + PEFT, in one run.

    python -m bench.finetune --out_dir $OUT --cases '[mistral-2048-r16]' --quantize '[null, bnb.nf4]'

Every trainer gets the same ``bench.baseline_trainers.Work`` (architecture with random bf16 weights
saved as a converted checkpoint, the same synthetic Alpaca-format rows tokenized identically, the same
LoRA rank and targets, the same effective batch) and runs in its own subprocess, so its peak memory
is its own. Cases:

- ``*-2048-*``: every row is 2048 tokens (the issue's target setting); micro-batch 1 for all three.
- ``*-mixed-*``: Alpaca/LIMA-like lengths. The baselines pad micro-batches of 4 rows, 16 rows a step;
  ours packs, with as many packed rows a step as hold the same number of tokens on average.

``OUR_VARIANTS`` are ours again with one ``--speed.*`` option changed (for QLoRA cases, each form of
``--speed.dequantize_4bit``: bitsandbytes' layers, in-block, auto; the LoRA term added inside its
GEMM), so each lever is measured against ours (the defaults) in the same run, with ratios.

Printed JSON per case: each trainer's useful (non-padding) tokens/s, peak memory and MFU, which counts
4N FLOPs per token (forward 2N plus the backward's input gradients 2N; frozen weights need no weight
gradients) at the GPU's dense bf16 peak (989 TFLOP/s on an H100), and ratios of ours to each baseline.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.baseline_trainers import REPO_ROOT, Work, peak_memory, run_hf_peft, run_upstream_litgpt

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 4090": 165.2}
CASES = {
    # name: (litgpt config, rows, lora targets, lora rank)
    "mistral-2048-r16": ("Mistral-7B-v0.1", "2048", "all", 16),
    "mistral-mixed-r16": ("Mistral-7B-v0.1", "mixed", "all", 16),
    "mistral-2048-r8qv": ("Mistral-7B-v0.1", "2048", "qv", 8),
    "llama2-2048-r16": ("Llama-2-7b-hf", "2048", "all", 16),
    "tiny-mixed-r8": ("tiny", "mixed", "all", 8),  # CPU smoke test of the bench itself
}
MIXED_ROWS_PER_STEP, MIXED_MICRO = 16, 4
# Ours again with one speed option changed, so each lever is measured against ours in the same run:
# name: (SpeedArgs overrides, QLoRA cases only)
OUR_VARIANTS = {
    "ours-bnb-dequant": ({"dequantize_4bit": "bitsandbytes"}, True),  # bitsandbytes' own 4-bit layers (the default until measured)
    "ours-in-block": ({"dequantize_4bit": "in-block"}, True),  # bitsandbytes' dequantization op traced inside each compiled block
    "ours-auto": ({"dequantize_4bit": "auto"}, True),  # in-block only if bit-identical and timed faster in the run's process
    "ours-lora-addmm": ({"lora_addmm": True}, False),  # the LoRA term added inside its GEMM
}
TRAINERS = ("ours", *OUR_VARIANTS, "hf-peft", "upstream-litgpt")


def synthetic_rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    """Alpaca-format rows. "2048": outputs far longer than 2048 tokens (truncated there). "mixed": 70%
    Alpaca-like (median ~120 words), 30% LIMA-like (median ~600 words), log-normal."""
    from core.synthetic_tasks import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if kind == "2048":
            prompt, output = 12, 4000
        else:
            prompt = max(4, int(rng.lognormvariate(3.0, 0.8)))
            output = max(4, int(rng.lognormvariate(4.6 if rng.random() < 0.7 else 6.3, 0.7)))
        rows.append({"instruction": " ".join(rng.choices(WORDS, k=prompt)), "input": "", "output": " ".join(rng.choices(WORDS, k=output))})
    return rows


def our_child(work: Path, out: Path, packed_rows_per_step: int = 0, speed: str = "{}") -> None:
    """Child process: our ``finetune.lora`` on the work (micro-batch 1 packed row, fixed), result to ``out``."""
    import yaml

    from finetune.config import DataArgs, EvalArgs, TrainArgs
    from finetune.lora import LoRAArgs, setup
    from finetune.speed import SpeedArgs

    t0 = time.perf_counter()
    job = Work.from_json(Path(work).read_text())
    targets = {"query": True, "key": True, "value": True, "projection": True, "mlp": True, "head": True}
    if job.lora_targets == "qv":
        targets = {**{k: False for k in targets}, "query": True, "value": True}
    run_dir = Path(out).parent / "ours-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.csv appends
    final = setup(
        checkpoint_dir=job.checkpoint_dir,
        out_dir=run_dir,
        quantize=job.quantize,
        precision="bf16-true" if torch.cuda.is_available() else "32-true",
        seed=job.seed,
        lr=2e-4,
        lora=LoRAArgs(r=job.lora_r, alpha=job.lora_alpha, **targets),
        data=DataArgs(train_file=job.data_file, prompt_style="alpaca", max_seq_length=job.max_seq_length, val_fraction=0.01),
        train=TrainArgs(
            save_interval=None,
            log_interval=1,
            global_batch_size=packed_rows_per_step or job.global_batch_size,
            micro_batch_size=job.micro_batch_size,
            lr_warmup_steps=1,
            max_steps=job.steps,
        ),
        eval=EvalArgs(interval=0, final_validation=False),
        speed=SpeedArgs(**{"micro_batch": "fixed", **json.loads(speed)}),
    )
    memory = peak_memory("cuda" if torch.cuda.is_available() else "cpu")
    rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    tokens, elapsed = [int(r[3]) for r in rows], [float(r[4]) for r in rows]
    half = len(rows) // 2
    steady_s = elapsed[-1] - elapsed[half - 1]
    hparams = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    result = {
        "trainer": "ours",
        "speed_overrides": json.loads(speed),
        "steps": len(rows),
        "useful_tokens_per_s": round((tokens[-1] - tokens[half - 1]) / steady_s, 1),
        "useful_tokens_per_step": tokens[-1] / len(rows),
        "steady_s": round(steady_s, 4),
        **memory,
        "wall_s": round(time.perf_counter() - t0, 1),
        "speed": {**hparams["speed"], "dequantize_4bit_used": json.loads((final / "trained.json").read_text())["dequantize_4bit"]},
        "rows_per_step": hparams["train"]["global_batch_size"],
    }
    Path(out).write_text(json.dumps(result, indent=2))


def run_ours(work: Work, out_dir: Path, packed_rows_per_step: int = 0, speed: dict | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "work.json").write_text(work.to_json())
    result, log = out_dir / "result.json", out_dir / "ours.log"
    cmd = [
        sys.executable,
        "-m",
        "bench.finetune",
        "child",
        "--work",
        str(out_dir / "work.json"),
        "--out",
        str(result),
        "--packed_rows_per_step",
        str(packed_rows_per_step),
        "--speed",
        json.dumps(speed or {}),
    ]
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not result.is_file():
        raise RuntimeError(f"ours failed (exit {rc}); last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return json.loads(result.read_text())


def model_params(config_name: str) -> int:
    from litgpt import GPT

    from core.configs import config_from_name

    with torch.device("meta"):
        return sum(p.numel() for p in GPT(config_from_name(config_name)).parameters())


def mfu(tokens_per_s: float, n_params: int) -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return round(tokens_per_s * 4 * n_params / (peak * 1e12), 4) if peak else None


def run_case(case: str, quantize: str | None, trainers: list[str], work_dir: Path, steps: int) -> dict:
    from bench.random_checkpoint import write_random_checkpoint
    from core.tiny import build_tiny

    config_name, rows_kind, targets, rank = CASES[case]
    build_tiny(work_dir / "tiny", work_dir / "tiny-data")
    base = write_random_checkpoint(config_name, work_dir / f"{config_name}-random", tokenizer_dir=work_dir / "tiny")
    data = work_dir / f"rows-{rows_kind}.json"
    if not data.is_file():
        data.write_text(json.dumps(synthetic_rows(rows_kind, 64 if rows_kind == "2048" else 1200)))
    mixed = rows_kind == "mixed"
    work = Work(
        checkpoint_dir=base,
        data_file=data,
        max_seq_length=2048,
        lora_r=rank,
        lora_alpha=2 * rank,
        lora_targets=targets,
        quantize=quantize,
        micro_batch_size=MIXED_MICRO if mixed else 1,
        global_batch_size=MIXED_ROWS_PER_STEP if mixed else 2,
        steps=steps,
    )
    packed_rows = 0
    if mixed:  # the same tokens per step on average: rows per step x mean row length / 2048
        from litgpt import Tokenizer

        from core.prompts import get_style
        from finetune.data import encode_row, load_rows

        tokenizer, style = Tokenizer(base), get_style("alpaca")
        lengths = [len(encode_row(r, tokenizer, style, 2048)["input_ids"]) for r in load_rows(data)]
        packed_rows = max(1, round(MIXED_ROWS_PER_STEP * sum(lengths) / len(lengths) / 2048))
    label = f"{case}-{quantize or 'bf16'}"
    results = {}
    runners = {
        "ours": lambda w, d: run_ours(w, d, packed_rows),
        **{name: (lambda w, d, o=overrides: run_ours(w, d, packed_rows, o)) for name, (overrides, _) in OUR_VARIANTS.items()},
        "upstream-litgpt": run_upstream_litgpt,
        "hf-peft": run_hf_peft,
    }
    for trainer in trainers:
        if trainer in OUR_VARIANTS and OUR_VARIANTS[trainer][1] and quantize is None:
            continue  # a QLoRA lever: without 4-bit layers the same run as "ours"
        print(f"--- {label}: {trainer}", flush=True)
        try:
            results[trainer] = runners[trainer](
                _ours_micro(work) if mixed and (trainer == "ours" or trainer in OUR_VARIANTS) else work, work_dir / "runs" / label / trainer
            )
        except RuntimeError as e:
            results[trainer] = {"error": str(e)[-2000:]}
        print(json.dumps(results[trainer])[:600], flush=True)
    n_params = model_params(config_name)
    for r in results.values():
        if "useful_tokens_per_s" in r:
            r["mfu_4n"] = mfu(r["useful_tokens_per_s"], n_params)
            r.pop("batches", None)
    out = {
        "case": case,
        "model": f"{config_name} (random bf16)",
        "quantize": quantize or "none (bf16)",
        "lora": f"r{rank} {targets}",
        "rows": rows_kind,
        "params": n_params,
        "results": results,
    }
    ours = results.get("ours", {}).get("useful_tokens_per_s")
    for name in ("hf-peft", "upstream-litgpt", *OUR_VARIANTS):
        theirs = results.get(name, {}).get("useful_tokens_per_s")
        if ours and theirs:
            out[f"ours_vs_{name}_tokens_per_s"] = round(ours / theirs, 2)
            if results["ours"]["peak_reserved_gib"] and results[name]["peak_reserved_gib"]:  # None on CPU
                out[f"ours_vs_{name}_peak_reserved"] = round(results["ours"]["peak_reserved_gib"] / results[name]["peak_reserved_gib"], 2)
    return out


def _ours_micro(work: Work) -> Work:
    """Ours on mixed rows: micro-batch 1 packed row of 2048 tokens (the baselines' 4 padded rows hold fewer tokens)."""
    import dataclasses

    return dataclasses.replace(work, micro_batch_size=1, global_batch_size=1)


def main(
    out_dir: Path = Path("out/bench"),
    work_dir: Path = Path("/tmp/bench_finetune"),
    cases: list[str] = ["mistral-2048-r16"],
    quantize: list[str | None] = [None, "bnb.nf4"],
    trainers: list[str] = list(TRAINERS),
    steps: int = 8,
) -> None:
    """Run each case x quantization with each trainer; print and write ``out_dir/finetune.json``.

    Args:
        cases: names from CASES.
        quantize: None (bf16 LoRA) and/or "bnb.nf4" (QLoRA).
        trainers: ours, the OUR_VARIANTS (ours with one speed option changed), hf-peft, upstream-litgpt.
        steps: optimizer steps per trainer; the second half is measured.
    """
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"cases: unknown {unknown}; choose from {sorted(CASES)}")
    if unknown := [t for t in trainers if t not in TRAINERS]:
        raise ValueError(f"trainers: unknown {unknown}; choose from {list(TRAINERS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "steps": steps, "runs": []}
    for case in cases:
        for q in quantize:
            result["runs"].append(run_case(case, q, trainers, work_dir, steps))
            (out_dir / "finetune.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from jsonargparse import CLI

    if len(sys.argv) > 1 and sys.argv[1] == "child":
        CLI(our_child, args=sys.argv[2:], as_positional=False)
    else:
        CLI(main, as_positional=False)
