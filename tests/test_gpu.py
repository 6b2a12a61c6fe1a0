"""The GPU lane (``make test-gpu``: ``pytest -m gpu``): what only a CUDA machine can check.

- QLoRA trains on CUDA, and its in-block 4-bit layers are bit-identical to bitsandbytes' CUDA layers
  (weights quantized from float16, Lightning's storage, and from bf16), forward and input gradient;
  with ``--speed.dequantize_4bit in-block`` the loss on a fixed batch falls as with bitsandbytes' layers.
- The batched server (paged KV cache, CUDA graphs; eager and compiled decode) returns what the serial engine returns, in fp32 on CUDA,
  and with ``--overlap_decode`` what it returns without.
- The finetune bench's tiny case runs every trainer on CUDA, QLoRA included.

Deselected by default (``addopts = -m 'not gpu'``); each test skips without CUDA.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the gpu lane: make test-gpu)"),
    pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning"),
]


def _cuda_layer(in_f: int, out_f: int, storage: torch.dtype, double: bool):
    import bitsandbytes as bnb

    torch.manual_seed(in_f + out_f)
    w = torch.randn(out_f, in_f) * 0.02
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=double)
    layer.weight = bnb.nn.Params4bit(w.to(storage), requires_grad=False, quant_type="nf4", compress_statistics=double)
    return layer.cuda()


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=["fp16-storage", "bf16-storage"])
@pytest.mark.parametrize("double", [False, True], ids=["nf4", "nf4-dq"])
def test_in_block_layer_is_bitsandbytes_on_cuda(storage: torch.dtype, double: bool) -> None:
    from finetune.linear4bit_op import check_in_block

    for in_f, out_f in [(4096, 1024), (96, 200), (14336, 512)]:  # rows that are not whole blocks included
        layer = _cuda_layer(in_f, out_f, storage, double)
        assert layer.weight.quant_state.dtype == storage
        assert check_in_block(layer, tokens=64) == "bit-identical to bitsandbytes"


@pytest.fixture(scope="module")
def tiny(make_tiny_checkpoint):
    base = make_tiny_checkpoint()
    return base, base.parent / "data" / "train.jsonl"


def _fixed_batch_losses(tiny, tmp_path: Path, form: str) -> list[float]:
    """QLoRA (nf4, bf16) of the tiny model through our real setup, 12 steps on one fixed batch: its loss must fall."""
    from litgpt import Tokenizer

    from core.methods import METHODS
    from core.prompts import get_style
    from finetune.batching import batch_to_device
    from finetune.budget import BudgetPlanner, Schedule
    from finetune.config import EvalArgs, TrainArgs
    from finetune.data import Collate, encode_row, load_rows
    from finetune.loop import Progress, fit
    from finetune.lora import LoRAArgs
    from finetune.run import build_model, build_optimizer, make_fabric
    from finetune.speed import SpeedArgs, prepare

    base_dir, train_file = tiny
    method, speed = METHODS["lora"], SpeedArgs(micro_batch="fixed", dequantize_4bit=form, packing=False)
    fabric = make_fabric("bf16-true", "bnb.nf4", method, speed.quantize_from_compute_dtype)
    fabric.seed_everything(0, verbose=False)
    model = build_model(fabric, method, LoRAArgs(r=8, alpha=16, dropout=0.0).as_config(), base_dir, "bnb.nf4")
    optimizer = build_optimizer(fabric, model, 3e-3, 0.0)
    train = TrainArgs(save_interval=None, log_interval=100, global_batch_size=8, micro_batch_size=8, lr_warmup_steps=2, max_steps=12, max_norm=1.0)
    setup = prepare(fabric, model, "lora", speed, train, 64, "bnb.nf4")
    assert setup.compiled and setup.dequantize_4bit == form
    tokenizer, style = Tokenizer(base_dir), get_style("qa")
    fixed = batch_to_device(Collate()([encode_row(r, tokenizer, style, 64) for r in load_rows(train_file)[:8]]), fabric.device)
    losses = []
    fit(
        fabric,
        model,
        optimizer,
        lambda: fixed,
        Schedule(12, 2),
        3e-3,
        BudgetPlanner(float("inf"), 12),
        Progress(total_steps=12),
        train,
        EvalArgs(interval=0),
        log=lambda row: losses.append(row["loss"]),
    )
    return losses


def test_qlora_trains_and_in_block_follows_bitsandbytes(tiny, tmp_path: Path) -> None:
    theirs = _fixed_batch_losses(tiny, tmp_path, "bitsandbytes")
    ours = _fixed_batch_losses(tiny, tmp_path, "in-block")
    for losses in (theirs, ours):
        assert losses[-1] < losses[0] - 0.3 and losses[-1] < losses[len(losses) // 2], losses
    # The same LoRA start (B = 0: the 4-bit base model's loss). in-block quantizes from bf16 and
    # bitsandbytes' layers here from float16 (Lightning's storage), so the runs agree closely, not bit for bit.
    assert ours[0] == pytest.approx(theirs[0], rel=2e-2)
    assert ours[-1] == pytest.approx(theirs[-1], rel=0.15, abs=0.05)


@pytest.mark.parametrize("compile_decode", [False, True], ids=["eager", "compiled"])
def test_batched_server_equals_serial_in_fp32_with_cuda_graphs(make_tiny_checkpoint, compile_decode: bool) -> None:
    """Both decodes in the CUDA graphs: eager, and compiled by inductor (the server's default on CUDA)."""
    from server.app import create_app
    from server.batch_engine import BatchEngine
    from server.engine import SerialEngine
    from server.loading import load_generator
    from tests.test_batch_engine import _requests, _send_all, assert_same_answers

    generator = load_generator(make_tiny_checkpoint(), device="cuda", dtype="fp32")
    bodies = _requests()
    serial = asyncio.run(_send_all(create_app(SerialEngine(generator), generator.codec), bodies, concurrency=1))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, kv_tokens=2048, cuda_graphs=True, compile_decode=compile_decode)
    try:
        assert engine.model.cuda_graphs and engine.model.compile_decode is compile_decode
        batched = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=30))
        graphs = len(engine.model._graphs)
    finally:
        engine.close()
    assert graphs > 0  # decode steps replayed captured graphs
    assert_same_answers(batched, serial, bodies)


@pytest.mark.parametrize(("concurrency", "kv_tokens"), [(1, 2560), (30, 160)], ids=["c1", "c30-small-pool"])
def test_overlapped_decode_answers_as_decode_in_order_with_cuda_graphs(make_tiny_checkpoint, monkeypatch, concurrency: int, kv_tokens: int) -> None:
    """--overlap_decode on CUDA (graphs replayed, ids fed on the device, readback to pinned memory waited on by its event,
    device generators put back): tests/test_overlap_decode.py's trace and checks, in fp32."""
    from server.loading import load_generator
    from tests.test_batch_engine import _same
    from tests.test_overlap_decode import WINDOW, check_overlap

    generator = load_generator(make_tiny_checkpoint(), device="cuda", dtype="fp32", max_seq_length=WINDOW)  # kv_tokens: 16 windows, 1
    check_overlap(generator, monkeypatch, concurrency, kv_tokens, _same)


@pytest.mark.parametrize("quantize", [None, "bnb.nf4"], ids=["bf16", "qlora"])
def test_finetune_bench_tiny_case_on_cuda(tmp_path: Path, quantize: str | None) -> None:
    from bench.finetune import run_case

    trainers = ["ours", "ours-in-block", "hf-peft"]
    out = run_case("tiny-mixed-r8", quantize, trainers, tmp_path, steps=4)
    for name, result in out["results"].items():
        assert "error" not in result, (name, result)
        assert result["useful_tokens_per_s"] > 0 and result["peak_reserved_gib"] > 0, (name, result)
    assert ("ours-in-block" in out["results"]) == (quantize is not None)
    if quantize:
        assert out["results"]["ours-in-block"]["speed"]["dequantize_4bit_used"] == "in-block"
    assert out["ours_vs_hf-peft_tokens_per_s"] > 0
