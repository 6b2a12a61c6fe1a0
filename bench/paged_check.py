"""On a GPU: the paged model runner (CUDA graphs on) against litgpt's own forward, per attention variant.

    python -m bench.paged_check --out_dir $OUT

The CPU tests (tests/test_batch_engine.py) check the same in fp32 without graphs. Here each tiny
architecture runs on CUDA in fp32 (TF32 off) through ``PagedModel``: packed prefill of two prompts in
chunks, then decode steps replayed from captured graphs with interleaved block tables, then a fork
that shares full blocks and copies a partial one. Every logit row is compared with the full forward
of litgpt's ``GPT``; the report is the largest difference per architecture and ``ok`` under 1e-4.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from litgpt import GPT, Config

from server.kv_pool import KVPool
from server.paged_model import PagedModel, Segment

ARCHITECTURES = {
    "gqa": dict(n_head=8, n_query_groups=4),
    "mqa_parallel_partial_rope": dict(
        n_head=4, n_query_groups=1, parallel_residual=True, shared_attention_norm=True, rotary_percentage=0.5,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
    ),
    "qk_norm": dict(n_head=4, n_query_groups=2, norm_qk=True),
    "sliding_window": dict(n_head=4, n_query_groups=4, sliding_window_size=37, sliding_window_indices=[1, 0]),
}  # fmt: skip
TOLERANCE = 1e-4


def check(arch: str, device: torch.device, compile_decode: bool = False) -> dict:
    defaults = dict(
        n_layer=2, n_embd=64, block_size=1024, vocab_size=97, padded_vocab_size=97,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=96, bias=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(Config(**{**defaults, **ARCHITECTURES[arch]})).to(device).eval()
    pool = KVPool(num_blocks=200, block_size=16)
    if compile_decode:  # dynamo's cache is per code object: each architecture's graphs count alone
        torch._dynamo.reset()
    paged = PagedModel(model, pool.num_blocks, pool.block_size, max_batch=16, max_len=1024, cuda_graphs=True, compile_decode=compile_decode)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (300, 90)]
    with torch.inference_mode():
        refs = [model(torch.tensor([s], device=device))[0].float() for s in seqs]
    # interleave the two sequences' blocks, so block order differs from position order
    blocks = pool.allocate(2 * pool.blocks_for(300))
    tables = [blocks[0::2], blocks[1::2]]
    worst = 0.0

    def compare(got: torch.Tensor, want: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, (got.float() - want).abs().max().item())

    prompt = [s[:-40] for s in seqs]
    out = paged.prefill([Segment(tables[0], 0, prompt[0][:200]), Segment(tables[1], 0, prompt[1], all_logits=True)])
    compare(out[1], refs[1][: len(prompt[1])])
    out = paged.prefill([Segment(tables[0], 200, prompt[0][200:])])
    compare(out[0][0], refs[0][len(prompt[0]) - 1])
    paged.warmup(16, 512)
    for step in range(40):  # across a length bucket (256) for the first sequence
        positions = [len(p) + step for p in prompt]
        logits = paged.decode([s[p] for s, p in zip(seqs, positions)], positions, tables)
        for b, p in enumerate(positions):
            compare(logits[b], refs[b][p])
    full = 250 // pool.block_size  # a fork at position 250: shared full blocks, a copied partial one
    fork = tables[0][:full] + pool.allocate(pool.blocks_for(300) - full)
    paged.copy_block(tables[0][full], fork[full])
    for p in range(250, 260):
        logits = paged.decode([seqs[0][p]], [p], [fork])
        compare(logits[0], refs[0][p])
    return {"max_abs_diff": worst, "ok": worst < TOLERANCE, "graphs": len(paged._graphs)}


def main(out_dir: Path = Path("out/bench"), compile_decode: bool = False) -> dict:
    """``compile_decode``: the runner with ``server.compiled_decode`` (compiled layers inside the captured graphs)."""
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.paged_check needs a CUDA GPU (the CPU path is tests/test_batch_engine.py)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "tolerance": TOLERANCE, "compile_decode": compile_decode,
              "architectures": {a: check(a, device, compile_decode) for a in ARCHITECTURES}}  # fmt: skip
    report["ok"] = all(r["ok"] for r in report["architectures"].values())
    report["seconds"] = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "paged_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
