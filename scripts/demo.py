"""`make demo`: the whole pipeline on the embedded tiny model, on a CPU, in a few minutes.

build tiny checkpoint -> held-out accuracy before -> LoRA finetune -> merge -> accuracy after ->
start the real server on 127.0.0.1 -> /tokenize and /process (greedy, echo with logprobs, stop
sequence) -> stop the server. Accuracy is measured with the server's own generation code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from core.checkpoints import WEIGHTS
from core.paths import CHECKPOINTS_DIR, OUT_DIR
from core.prompts import get_style
from core.synthetic_tasks import exact_match
from core.tiny import TEMPLATE, TINY_DATA_DIR, TINY_DIR, build_tiny
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.data import load_rows
from finetune.lora import setup as finetune_lora
from finetune.merge import merge
from server.loading import load_generator
from server.schemas import ProcessRequest

WARMUP_STEPS = 40


def accuracy(checkpoint_dir: Path, rows: list[dict]) -> dict[str, float]:
    """Greedy held-out exact match per task (and overall), prompts rendered with the training template."""
    generator = load_generator(checkpoint_dir, device="cpu")
    style = get_style(TEMPLATE)
    hits, counts = Counter(), Counter()
    for row in rows:
        prompt = style.apply(row["instruction"], input=row["input"])
        req = ProcessRequest(prompt=prompt, temperature=0.0, max_new_tokens=16, stop_sequences=["\n"], top_k_per_token=0)
        text = generator.run(req)[0][0].text
        counts[row["task"]] += 1
        hits[row["task"]] += exact_match(text, row["output"])
    result = {task: hits[task] / counts[task] for task in sorted(counts)}
    result["overall"] = sum(hits.values()) / sum(counts.values())
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def show(title: str, payload: dict, response: httpx.Response) -> None:
    body = response.json()
    body.pop("completions", None)  # the first completion is already at top level
    print(
        f"\n--- {title}\nPOST {response.request.url.path} {json.dumps(payload)}\n-> {response.status_code} {json.dumps(body, ensure_ascii=False)[:1200]}"
    )


def query_server(checkpoint_dir: Path, example: dict) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--checkpoint_dir", str(checkpoint_dir), "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode} before answering")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not answer /health within 120 s")
            time.sleep(0.3)
        prompt = get_style(TEMPLATE).apply(example["instruction"], input=example["input"])
        calls = [
            ("tokenize", "/tokenize", {"text": prompt, "truncation": False, "max_length": 2048}),
            (
                "greedy generation",
                "/process",
                {"prompt": prompt, "temperature": 1e-7, "max_new_tokens": 8, "top_k_per_token": 1, "stop_sequences": []},
            ),
            ("echo: score the prompt, no new tokens", "/process", {"prompt": prompt, "echo_prompt": True, "max_new_tokens": 0, "top_k_per_token": 2}),
            (
                "stop sequence '\\n' (HELM's multiple-choice setting)",
                "/process",
                {"prompt": prompt, "temperature": 1e-7, "max_new_tokens": 8, "stop_sequences": ["\n"]},
            ),
        ]
        with httpx.Client(base_url=base, timeout=60) as client:
            for title, path, payload in calls:
                show(title, payload, client.post(path, json=payload))
    finally:
        server.terminate()
        server.wait(timeout=30)
        print("\nserver stopped")


def main(steps: int = 800, lr: float = 1e-3, out_dir: Path = OUT_DIR / "demo") -> None:
    """Run the demo.

    Args:
        steps: LoRA optimizer steps (one packed row of 512 tokens each), all of them: no time budget cuts the
            run short, so the result is the same on a busy machine (more than the 40 warmup steps).
        lr: peak learning rate.
        out_dir: where the LoRA run writes its logs and adapter.
    """
    if steps <= WARMUP_STEPS:
        raise SystemExit(f"error: --steps must be more than the demo's {WARMUP_STEPS} warmup steps, got {steps}")
    t0 = time.time()
    if not (TINY_DIR / WEIGHTS).is_file() or not (TINY_DATA_DIR / "test.jsonl").is_file():
        print(f"building the tiny checkpoint: {TINY_DIR}")
        build_tiny()
    test_rows = [json.loads(line) for line in (TINY_DATA_DIR / "test.jsonl").read_text().splitlines()]
    n_train = len(load_rows(TINY_DATA_DIR / "train.jsonl"))
    print(f"task: {', '.join(sorted({r['task'] for r in test_rows}))}; {n_train} training rows, {len(test_rows)} held-out rows")

    before = accuracy(TINY_DIR, test_rows)
    print(f"held-out exact match BEFORE finetuning: {before['overall']:.1%}  {before}")

    adapter_dir = finetune_lora(
        checkpoint_dir=TINY_DIR,
        out_dir=out_dir,
        lr=lr,
        **demo_settings(steps),
    )
    merged_dir = merge(adapter_dir, out_dir=CHECKPOINTS_DIR / "tiny-lora")

    after = accuracy(merged_dir, test_rows)
    print(f"held-out exact match AFTER finetuning:  {after['overall']:.1%}  {after}")

    query_server(merged_dir, test_rows[0])
    print("\n=== summary")
    for task in after:
        print(f"  {task:8s} before {before[task]:6.1%}   after {after[task]:6.1%}")
    print(f"  merged checkpoint: {merged_dir}   total time {time.time() - t0:.0f}s")
    if after["overall"] <= before["overall"]:
        raise SystemExit("finetuning did not improve held-out accuracy")


def demo_settings(steps: int) -> dict:
    """The tiny demo's own settings (the defaults are for real runs: epochs, warmup as a fraction, a cosine floor).

    One packed row of 512 tokens a step (~36 of the short tiny rows), a fixed 40-step warmup, cosine to 0,
    validation every 200 steps and none after the last.
    """
    return {
        "data": DataArgs(train_file=TINY_DATA_DIR / "train.jsonl", prompt_style=TEMPLATE, max_seq_length=512),
        "train": TrainArgs(
            save_interval=None,
            log_interval=100,
            global_batch_size=1,
            micro_batch_size=1,
            lr_warmup_steps=WARMUP_STEPS,
            max_steps=steps,
            max_norm=1.0,
            min_lr=0.0,
        ),
        "eval": EvalArgs(interval=200, max_iters=10, final_validation=False),
    }


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
