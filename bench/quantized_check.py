"""GPU check of the server's bitsandbytes modes: correctness against bf16, memory, decode speed.

    python -m bench.quantized_check --out_dir $OUT        (on a CUDA machine with bitsandbytes)

1. The tiny model in every mode: echo logprobs and greedy text against the bf16 reference, and one
   real /process call through the app.
2. Mistral-7B architecture with random bf16 weights: peak GPU memory after loading and batch-1
   greedy decode tokens/s, for bf16 and each 4/8-bit mode (random weights: speed and memory do
   not depend on the values). Prints one JSON object and writes it to ``out_dir/quantized.json``.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch


def _request(prompt: str, n: int, echo: bool):
    from server.schemas import ProcessRequest

    return ProcessRequest(prompt=prompt, temperature=0.0, max_new_tokens=n, echo_prompt=echo, top_k_per_token=3)


def tiny_modes(work: Path) -> dict:
    from fastapi.testclient import TestClient

    from core.precision import SERVE_QUANTIZE
    from core.tiny import build_tiny
    from server.app import create_app
    from server.engine import SerialEngine
    from server.loading import load_generator

    build_tiny(work / "tiny", work / "tiny-data")
    prompt = "Is 4821 even or odd?\nAnswer: odd. Which number is larger, 37 or 52?\nAnswer:"
    ref = load_generator(work / "tiny", device="cuda", dtype="bf16").run(_request(prompt, 8, True))[0][0]
    out = {}
    for mode in SERVE_QUANTIZE:
        gen = load_generator(work / "tiny", device="cuda", quantize=mode)  # bf16 compute (int8: fp16)
        got = gen.run(_request(prompt, 8, True))[0][0]
        n_prompt = len(ref.tokens) - 8
        diffs = [abs(a.logprob - b.logprob) for a, b in zip(ref.tokens[:n_prompt], got.tokens[:n_prompt])]
        with TestClient(create_app(SerialEngine(gen), gen.codec)) as client:
            status = client.post("/process", json={"prompt": "The capital of France is "}).status_code
        out[mode] = {
            "echo_logprob_max_abs_diff_vs_bf16": round(max(diffs), 4),
            "echo_logprob_mean_abs_diff_vs_bf16": round(sum(diffs) / len(diffs), 4),
            "same_greedy_text_as_bf16": got.text == ref.text,
            "health_check_status": status,
        }
        del gen
    return out


def mistral_7b(work: Path, modes: list[str | None], new_tokens: int = 64) -> dict:
    from bench.random_checkpoint import write_random_checkpoint
    from server.loading import load_generator

    t0 = time.perf_counter()
    ckpt = write_random_checkpoint("Mistral-7B-v0.1", work / "mistral-7b-random", tokenizer_dir=work / "tiny")
    out = {"write_checkpoint_s": round(time.perf_counter() - t0, 1)}
    prompt = "The capital of France is " * 40
    for mode in modes:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gen = load_generator(ckpt, device="cuda", quantize=mode)
        load_s = time.perf_counter() - t0
        loaded_gib = torch.cuda.memory_allocated() / 2**30
        gen.run(_request(prompt, 4, False))  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.run(_request(prompt, new_tokens, False))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[mode or "bf16"] = {
            "load_s": round(load_s, 1),
            "weights_gib": round(loaded_gib, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "decode_tokens_per_s_batch1": round(new_tokens / seconds, 1),
        }
        del gen
        gc.collect()
        torch.cuda.empty_cache()
    return out


def main(out_dir: Path = Path("out/bench"), work_dir: Path = Path("/tmp/quantized_check"), skip_7b: bool = False) -> None:
    """Run the checks and write quantized.json."""
    import bitsandbytes

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "tiny": tiny_modes(work_dir),
    }
    if not skip_7b:
        result["mistral_7b_random_bf16"] = mistral_7b(work_dir, [None, "bnb.nf4", "bnb.nf4-dq", "bnb.int8"])
    text = json.dumps(result, indent=2)
    (out_dir / "quantized.json").write_text(text)
    print(text)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
