"""Decode-step cost of the paged KV cache's block gather: element-wise (the first layout) against whole blocks.

    python -m bench.decode_gather --out_dir $OUT          (GPU: Mistral-7B architecture, random bf16)

At c=30 the paged engine's decode steps ran ~14 ms slower than the dense rows before it. Its first
layout, (layer, K/V, head, block, position, head_size), gathered a batch's blocks with an
element-wise ``index`` of 2-byte values; the layout now, (layer, block, position, K/V, head,
head_size), copies whole blocks with ``index_select`` in 8-byte words. Per (batch, length) case this
prints: both gathers alone (one layer's pool of ``num_blocks`` blocks, times the layer count), and the
whole decode step of ``server.paged_model`` as the engine replays it (CUDA graph), in milliseconds;
with ``--compile_decode true`` also the step with ``server.compiled_decode`` (and the compile's seconds).
"""

from __future__ import annotations

import functools
import gc
import json
import random
import time
from pathlib import Path

import torch
from litgpt import GPT, Config

from server.paged_model import PagedModel


def _ms(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main(out_dir: Path = Path("out/bench"), model: str = "Mistral-7B-v0.1", num_blocks: int = 40_000, block_size: int = 16,
         cases: list[tuple[int, int]] = [(1, 256), (16, 1792), (32, 2048)], repeat: int = 20, compile_decode: bool = False) -> dict:  # fmt: skip
    """``cases``: (padded batch, positions read); ``num_blocks``: the pool's blocks (61,333 on an uncapped H200);
    ``compile_decode``: time the compiled step too, one runner after the other (two pools would not fit)."""
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.decode_gather needs a CUDA GPU")
    config = Config.from_name(model, block_size=2048)
    c, dev, rng = config, torch.device("cuda"), random.Random(0)
    shape = (2, c.n_query_groups, num_blocks, block_size, c.head_size)  # one layer, the first layout
    old = torch.zeros(shape, device=dev, dtype=torch.bfloat16)
    new = torch.zeros((num_blocks, block_size, 2, c.n_query_groups, c.head_size), device=dev, dtype=torch.bfloat16)
    words = new.view(num_blocks, -1).view(torch.int64)
    report = {"model": model, "num_blocks": num_blocks, "gpu": torch.cuda.get_device_name(), "cases": []}
    for B, length in cases:
        M = -(-length // block_size)
        flat = torch.tensor(rng.sample(range(1, num_blocks), B * M), device=dev)
        elementwise = _ms(functools.partial(old.__getitem__, (slice(None), slice(None), flat)), repeat) * c.n_layer
        whole = _ms(functools.partial(words.index_select, 0, flat), repeat) * c.n_layer
        report["cases"].append({"batch": B, "length": length, "gather_elementwise_ms": round(elementwise, 2), "gather_blocks_ms": round(whole, 2)})
    old = new = words = None  # give the pools back before the model loads
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        gpt = GPT(config).eval()
    torch.set_default_dtype(torch.float32)
    for compiled in (False, True) if compile_decode else (False,):
        paged = PagedModel(gpt, num_blocks, block_size, max_batch=max(b for b, _ in cases), max_len=2048, compile_decode=compiled)
        suffix = "_compiled" if compiled else ""
        for case in report["cases"]:
            B, M = case["batch"], -(-case["length"] // block_size)
            tables = [rng.sample(range(1, num_blocks), M) for _ in range(B)]
            positions = [case["length"] - 1] * B
            step = functools.partial(paged.decode, [1] * B, positions, tables)
            start = time.perf_counter()
            step()  # compiles (with compile_decode) and captures this bucket's graph
            torch.cuda.synchronize()
            case[f"first_step{suffix}_s"] = round(time.perf_counter() - start, 1)
            case[f"decode_step{suffix}_ms"] = round(_ms(step, repeat), 2)
            if compiled:
                case["compiled_speedup"] = round(case["decode_step_ms"] / case["decode_step_compiled_ms"], 3)
        step = paged = None  # the partial holds paged.decode: both go, or the first pool (78 GiB here) stays beside the next
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=1), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode_gather.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
