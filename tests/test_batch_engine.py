"""The batched engine against references: litgpt's own forward, and the serial engine one at a time.

- ``PagedModel`` (paged KV cache, packed prefill, batched decode) gives litgpt's ``GPT`` logits on
  architectures that exercise every branch: grouped queries, multi-query with parallel residual
  and partial RoPE, q/k norms, and a sliding window shorter than the sequence.
- Many requests at once through the HTTP app (30 in flight, as HELM sends them) return what each
  returns alone on the serial engine: same tokens and texts, logprobs within float tolerance;
  seeded samples included. Small engine settings force chunked prefill, prefix sharing, a full
  pool (requests wait for blocks), and forks with copied partial blocks.
"""

from __future__ import annotations

import asyncio
import inspect

import httpx
import pytest
import torch
from litgpt import GPT, Config
from torch.utils._python_dispatch import TorchDispatchMode

from server.app import create_app
from server.batch_engine import BatchEngine
from server.engine import SerialEngine, make_engine
from server.kv_pool import KVPool
from server.loading import load_generator
from server.paged_model import PagedModel, Segment, unsupported_reason
from server.schemas import ProcessRequest

ARCHITECTURES = {
    "gqa": dict(n_head=8, n_query_groups=4),
    "mqa_parallel_partial_rope": dict(
        n_head=4, n_query_groups=1, parallel_residual=True, shared_attention_norm=True, rotary_percentage=0.5,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
    ),
    "qk_norm": dict(n_head=4, n_query_groups=2, norm_qk=True),
    "sliding_window": dict(n_head=4, n_query_groups=4, sliding_window_size=7, sliding_window_indices=[1, 0]),
}  # fmt: skip


def _model(arch: str) -> GPT:
    defaults = dict(
        n_layer=2, n_embd=64, block_size=64, vocab_size=97, padded_vocab_size=97,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=96, bias=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(Config(**{**defaults, **ARCHITECTURES[arch]})).eval()
    return model


def _tables(pool: KVPool, lengths: list[int]) -> list[list[int]]:
    """Block tables for sequences of these lengths, their blocks interleaved through the pool (so
    that position order and block order differ)."""
    blocks = iter(pool.allocate(sum(pool.blocks_for(n) for n in lengths)))
    tables: list[list[int]] = [[] for _ in lengths]
    while any(len(t) < pool.blocks_for(n) for t, n in zip(tables, lengths)):
        for t, n in zip(tables, lengths):
            if len(t) < pool.blocks_for(n):
                t.append(next(blocks))
    return tables


@pytest.mark.parametrize("short_segment", [256, 12], ids=["short-segments-batched", "mixed"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_paged_forward_matches_litgpt(arch: str, short_segment: int, monkeypatch) -> None:
    """``short_segment`` 12: segments longer than 12 are attended one by one, shorter ones together."""
    monkeypatch.setattr("server.paged_model.SHORT_SEGMENT", short_segment)
    model = _model(arch)
    assert unsupported_reason(model) is None
    pool = KVPool(num_blocks=40, block_size=4)
    paged = PagedModel(model, pool.num_blocks, pool.block_size, max_batch=16)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (23, 9, 30)]
    with torch.inference_mode():
        refs = [model(torch.tensor([s]))[0] for s in seqs]
    t0, t1, t2, t3 = _tables(pool, [len(s) for s in seqs] + [len(seqs[1])])
    # prompts: all but their last 4 tokens, packed in one pass; sequence 0's in two chunks
    prompt = [s[:-4] for s in seqs]
    first = paged.prefill([Segment(t0, 0, prompt[0][:10]), Segment(t1, 0, prompt[1], all_logits=True)])
    torch.testing.assert_close(first[1], refs[1][: len(prompt[1])], atol=1e-5, rtol=1e-5)
    # two short segments and a long one in the same pass (with short_segment 12: batched + alone)
    out = paged.prefill([Segment(t0, 10, prompt[0][10:]), Segment(t2, 0, prompt[2][:20]), Segment(t3, 0, seqs[1][:3], all_logits=True)])
    torch.testing.assert_close(out[0][0], refs[0][len(prompt[0]) - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1][0], refs[2][19], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], refs[1][:3], atol=1e-5, rtol=1e-5)
    out = paged.prefill([Segment(t2, 20, prompt[2][20:])])
    torch.testing.assert_close(out[0][0], refs[2][len(prompt[2]) - 1], atol=1e-5, rtol=1e-5)
    # then the remaining tokens one decode step at a time, all sequences together
    tables = [t0, t1, t2]
    for step in range(4):
        positions = [len(p) + step for p in prompt]
        logits = paged.decode([s[p] for s, p in zip(seqs, positions)], positions, tables)
        for b, p in enumerate(positions):
            torch.testing.assert_close(logits[b], refs[b][p], atol=1e-5, rtol=1e-5)
    # a shared prefix (by reference) with a copied partial block continues like the original
    fork = t2[:3] + pool.allocate(3)  # positions 0..11 shared, 12..15 copied, then its own
    paged.copy_block(t2[3], fork[3])
    tail = paged.prefill([Segment(fork, 14, seqs[2][14:20])])[0]
    torch.testing.assert_close(tail[0], refs[2][19], atol=1e-5, rtol=1e-5)
    logits = paged.decode([seqs[2][20]], [20], [fork])
    torch.testing.assert_close(logits[0], refs[2][20], atol=1e-5, rtol=1e-5)


def test_paged_forward_scales_attention_as_litgpt_with_yarn_mscale() -> None:
    """YaRN ``rope_adjustments`` with ``mscale_all_dim`` scale litgpt's attention by ``mscale**2``; the paged
    prefill and decode must too (they used ``1/sqrt(head_size)`` alone)."""
    yarn = {"factor": 4.0, "beta_fast": 32, "beta_slow": 1, "original_max_seq_len": 16, "mscale_all_dim": 1.0}
    torch.manual_seed(0)
    config = Config(n_layer=2, n_embd=64, block_size=64, vocab_size=97, padded_vocab_size=97, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", intermediate_size=96, bias=False, n_head=4, n_query_groups=2, rope_adjustments=yarn)  # fmt: skip
    model = GPT(config).eval()
    assert model.transformer.h[0].attn.mscale != 1.0 and unsupported_reason(model) is None
    pool = KVPool(num_blocks=20, block_size=4)
    paged = PagedModel(model, pool.num_blocks, pool.block_size, max_batch=4)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0]
    table = pool.allocate(pool.blocks_for(len(ids)))
    out = paged.prefill([Segment(table, 0, ids[:20], all_logits=True)])[0]  # flash path (starts empty)
    torch.testing.assert_close(out, ref[:20], atol=1e-5, rtol=1e-5)
    out = paged.prefill([Segment(table, 20, ids[20:29])])[0]  # masked path (continues)
    torch.testing.assert_close(out[0], ref[28], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged.decode([ids[29]], [29], [table])[0], ref[29], atol=1e-5, rtol=1e-5)


class _PoolReads(TorchDispatchMode):
    """The ops of a step that take the KV pool (a view of its storage) as an input."""

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__()
        self.storage, self.reads = pool.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() == self.storage for t in inputs) and func.overloadpacket not in _VIEWS:
            self.reads.append((func.overloadpacket, inputs[0]))
        return func(*args, **(kwargs or {}))


_VIEWS = {
    torch.ops.aten.view,
    torch.ops.aten.detach,
    torch.ops.aten.select,
    torch.ops.aten.slice,
    torch.ops.aten.transpose,
    torch.ops.aten._unsafe_view,
}


def test_decode_reads_whole_blocks_not_elements() -> None:
    """A decode step copies each sequence's K/V blocks as whole contiguous chunks of 8-byte words (one
    ``index_select`` per layer), never element by element: the element-wise ``index`` gather of 2-byte
    values made an H200 decode step at c=30 ~14 ms slower than the dense rows before the paged cache."""
    model = _model("gqa").to(torch.bfloat16)
    pool = KVPool(num_blocks=40, block_size=4)
    paged = PagedModel(model, pool.num_blocks, pool.block_size, max_batch=16)
    tables = _tables(pool, [9, 14, 5])
    with torch.inference_mode():
        paged.prefill([Segment(t, 0, list(range(1, n + 1))) for t, n in zip(tables, (9, 14, 5))])
        with _PoolReads(paged.kv) as seen:
            paged.decode([1, 2, 3], [9, 14, 5], tables)
    gathers = [src for op, src in seen.reads if op is not torch.ops.aten.index_put_]
    assert [op for op, _ in seen.reads if op is not torch.ops.aten.index_put_] == [torch.ops.aten.index_select] * model.config.n_layer
    chunk = pool.block_size * 2 * model.config.n_query_groups * model.config.head_size * 2  # bytes of one layer's block
    for src in gathers:
        assert src.is_contiguous() and src.dtype == torch.int64 and src.shape == (pool.num_blocks, chunk // 8)


def _requests() -> list[dict]:
    """A mix in the shape HELM sends, plus every contract feature."""
    shots = "".join(f"Is {n} even or odd?\nAnswer: {'odd' if n % 2 else 'even'}\n\n" for n in range(11, 40, 3))
    questions = [f"Is {n} even or odd?\nAnswer:" for n in (4821, 77, 1024, 5, 390)]
    bodies = []
    for i, q in enumerate(questions * 3):  # shared few-shot prefix, 1 token, 5 alternatives
        bodies.append({"prompt": shots + q + " x" * i, "temperature": 1e-7, "max_new_tokens": 1, "top_k_per_token": 5, "stop_sequences": ["\n"]})
    for i, q in enumerate(questions):  # generations of different lengths, some stopping
        bodies.append({"prompt": shots[: 40 * i] + q, "temperature": 1e-7, "max_new_tokens": 6 + 7 * i, "stop_sequences": ["\n\n"] if i % 2 else []})
    bodies += [
        {"prompt": questions[0], "echo_prompt": True, "max_new_tokens": 4, "temperature": 0, "top_k_per_token": 3},
        {"prompt": questions[1], "echo_prompt": True, "max_new_tokens": 0, "temperature": 0, "top_k_per_token": 2},
        {"prompt": questions[2], "num_return_sequences": 3, "max_new_tokens": 9, "temperature": 0.8, "seed": 5, "top_k_per_token": 2},
        {"prompt": questions[3], "num_samples": 2, "max_new_tokens": 7, "temperature": 0.5, "top_k": 20, "top_p": 0.9, "seed": 9},
        {"prompt": shots * 12 + questions[4], "max_new_tokens": 5, "temperature": 0},  # left-truncated to fit
        {"prompt": questions[0], "max_new_tokens": 4000, "temperature": 0},  # no room: 422
    ]
    return bodies


def _same(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    assert a["text"] == b["text"], where
    assert a["truncated_prompt_tokens"] == b["truncated_prompt_tokens"], where
    for ca, cb in zip(a["completions"], b["completions"], strict=True):
        assert [t["text"] for t in ca["tokens"]] == [t["text"] for t in cb["tokens"]], where
        for ta, tb in zip(ca["tokens"], cb["tokens"]):
            assert ta["logprob"] == pytest.approx(tb["logprob"], abs=1e-4), where
            assert ta["top_logprob"].keys() == tb["top_logprob"].keys(), where
        assert ca["logprob"] == pytest.approx(cb["logprob"], abs=1e-3), where


async def _send_all(app, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:

        async def send(body):
            async with sem:
                return await client.post("/process", json=body)

        return await asyncio.gather(*(send(b) for b in bodies))


def assert_same_answers(batched: list, serial: list, bodies: list[dict]) -> None:
    """Each batched response is the serial engine's: the same status, a 200's body by ``_same``, an error's exactly."""
    for i, (a, b) in enumerate(zip(batched, serial, strict=True)):
        assert a.status_code == b.status_code, (i, a.text)
        if b.status_code == 200:
            _same(a.json(), b.json(), f"request {i}: {bodies[i]['prompt'][-30:]!r}")
        else:
            assert a.json() == b.json()


@pytest.mark.parametrize("backend", ["huggingface", "sentencepiece"])
def test_thirty_in_flight_equal_one_at_a_time(make_tiny_checkpoint, backend: str) -> None:
    generator = load_generator(make_tiny_checkpoint(backend), device="cpu")
    bodies = _requests()
    serial = asyncio.run(_send_all(create_app(SerialEngine(generator), generator.codec), bodies, concurrency=1))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, kv_tokens=2048)
    try:
        batched = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=30))
        stats = dict(engine.stats)
    finally:
        engine.close()
    assert_same_answers(batched, serial, bodies)
    # the shared few-shot prefix was computed once, not per request
    assert stats["computed_prompt_tokens"] < 0.6 * stats["prompt_tokens"], stats
    assert stats["decode_steps"] < sum(b["max_new_tokens"] for b in bodies[:-1]), stats


def test_greedy_batch_equals_one_at_a_time_many_generations(make_tiny_checkpoint) -> None:
    """Greedy generations that run together for many steps (rows join, leave, move) match solo runs."""
    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    bodies = [{"prompt": f"Which number is larger, {a} or {a * 7 % 97}?\nAnswer:", "temperature": 0, "max_new_tokens": 5 + a % 23}
              for a in range(3, 40)]  # fmt: skip
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=128, kv_block_size=4, kv_tokens=2048)
    try:
        batched = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=30))
    finally:
        engine.close()
    for body, response in zip(bodies, batched):
        alone = generator.run(ProcessRequest(**body))[0][0]
        got = response.json()
        assert got["text"] == alone.text
        assert [t["logprob"] for t in got["tokens"]] == pytest.approx([t.logprob for t in alone.tokens], abs=1e-4)


def test_adapter_models_fall_back_to_the_serial_engine(make_tiny_checkpoint) -> None:
    from litgpt.adapter import GPT as AdapterGPT
    from litgpt.adapter import Config as AdapterConfig

    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    config = AdapterConfig.from_file(make_tiny_checkpoint() / "model_config.yaml", adapter_prompt_length=4, adapter_start_layer=1)
    generator.model = AdapterGPT(config)
    assert "adapter" in unsupported_reason(generator.model)
    assert isinstance(make_engine(generator), SerialEngine)
    with pytest.raises(ValueError, match="--engine serial"):
        make_engine(generator, "batched")


def test_the_serial_engine_refuses_the_batched_engines_options(make_tiny_checkpoint, monkeypatch) -> None:
    """--engine serial has no pool, batch or queue: a value given for one of them is refused naming it, and the
    server's own defaults (which must be BatchEngine's) pass, through the CLI as a user runs it."""
    from core.cli import run_cli
    from server import __main__ as main
    from server.engine import BATCH_ONLY

    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    for name, value in (("max_batch", 64), ("kv_tokens", 4096), ("kv_reservation", "up_front"), ("attention_tokens", 0), ("max_queue", 8)):
        with pytest.raises(ValueError, match=f"^{name}: only the batched engine uses it \\(--engine serial\\)"):
            make_engine(generator, "serial", **{name: value})
    served = {}

    def stop_at_the_app(engine, *args, **kwargs):
        served["engine"] = engine
        raise SystemExit("stop here")

    monkeypatch.setattr(main, "create_app", stop_at_the_app)

    ckpt = ["--checkpoint_dir", str(make_tiny_checkpoint()), "--device", "cpu", "--engine", "serial", "--warmup", "false"]
    with pytest.raises(SystemExit, match="stop here"):
        run_cli(main.serve, args=ckpt)
    assert isinstance(served["engine"], SerialEngine)
    with pytest.raises(SystemExit, match="error: prefill_tokens: only the batched engine uses it"):
        run_cli(main.serve, args=[*ckpt, "--prefill_tokens", "512"])
    assert set(BATCH_ONLY) <= set(inspect.signature(main.serve).parameters)


def test_health_reports_engine_counters(make_tiny_checkpoint, serve) -> None:
    client = serve(make_tiny_checkpoint())
    assert client.post("/process", json={"prompt": "Is 4 even or odd?\nAnswer:", "max_new_tokens": 3}).status_code == 200
    stats = client.get("/health").json()["engine"]
    assert stats["requests"] == 1 and stats["prompt_tokens"] > 0 and stats["decode_steps"] == 2


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_engine_equals_serial_on_every_architecture(make_tiny_checkpoint, arch: str) -> None:
    """The whole engine (paged cache, shared prefixes, forks, chunked prefill) against the serial
    engine on litgpt's forward, for each attention variant; the tiny tokenizer over a random model."""
    from core.configs import TINY
    from server.generate import Generator

    codec = load_generator(make_tiny_checkpoint(), device="cpu").codec
    defaults = dict(
        n_layer=2, n_embd=64, block_size=256, vocab_size=TINY["vocab_size"], padded_vocab_size=TINY["vocab_size"],
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=96, bias=False,
    )  # fmt: skip
    torch.manual_seed(0)
    generator = Generator(GPT(Config(**{**defaults, **ARCHITECTURES[arch]})).eval(), codec)
    shots = "".join(f"Is {n} even?\nAnswer: {'no' if n % 2 else 'yes'}\n" for n in range(3, 9))
    bodies = [{"prompt": shots + f"Is {n} even?\nAnswer:", "temperature": 0, "max_new_tokens": 3 + n % 4, "top_k_per_token": 2} for n in range(6)]
    bodies += [
        {"prompt": shots + "Is 11 even?", "num_return_sequences": 3, "max_new_tokens": 6, "temperature": 0.9, "seed": 3},
        {"prompt": shots[:30], "echo_prompt": True, "max_new_tokens": 2, "temperature": 0, "top_k_per_token": 3},
    ]
    if arch == "sliding_window":  # litgpt's KV cache refuses prefills longer than the window: full forwards instead
        bodies = [b for b in bodies if b["temperature"] == 0 and not b.get("echo_prompt")]
    else:
        serial = asyncio.run(_send_all(create_app(SerialEngine(generator), codec), bodies, concurrency=1))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=40, kv_block_size=4, kv_tokens=1024)
    try:
        batched = asyncio.run(_send_all(create_app(engine, codec), bodies, concurrency=8))
        stats = engine.stats
    finally:
        engine.close()
    for i, a in enumerate(batched):
        assert a.status_code == 200, (i, a.text)
        if arch == "sliding_window":
            got = [t["logprob"] for t in a.json()["tokens"]]
            assert got == pytest.approx(_greedy_logprobs(generator, bodies[i], len(got)), abs=1e-4), i
        else:
            _same(a.json(), serial[i].json(), f"{arch} request {i}")
    assert stats["computed_prompt_tokens"] < stats["prompt_tokens"] and stats["kv_blocks_held"] == 0, stats


def _greedy_logprobs(generator, body: dict, steps: int) -> list[float]:
    """Greedy continuation by litgpt's full forward (no KV cache): logprob of each chosen token."""
    ids = generator.prompt(ProcessRequest(**body)).ids
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logprobs = torch.log_softmax(generator.model(torch.tensor([ids]))[0, -1].float(), dim=-1)
            ids = ids + [int(logprobs.argmax())]
            out.append(float(logprobs.max()))
    return out


def test_shared_prefixes_never_leak_between_sequences(make_tiny_checkpoint) -> None:
    """Prompts that are prefixes of each other, or part ways inside a block, before and after the
    blocks they share are cached: each answer is its prompt's own (serial engine), token by token."""
    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    base = "".join(f"Which number is larger, {a} or {a + 5}?\nAnswer: {a + 5}\n" for a in range(20, 26))
    prompts = [base, base[:-7], base + "Which", base[:50], base[:50] + "x" * 9, base[:53] + "yz", base + base[:40]]
    bodies = [{"prompt": p, "temperature": 0, "max_new_tokens": 6, "top_k_per_token": 3} for p in prompts]
    bodies.append({"prompt": base[:61], "num_return_sequences": 4, "max_new_tokens": 5, "temperature": 1.0, "seed": 1})
    serial = asyncio.run(_send_all(create_app(SerialEngine(generator), generator.codec), bodies, concurrency=1))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=64, kv_block_size=8, kv_tokens=2048)
    try:
        app = create_app(engine, generator.codec)
        together = asyncio.run(_send_all(app, bodies, concurrency=len(bodies)))
        again = asyncio.run(_send_all(app, bodies[::-1], concurrency=len(bodies)))[::-1]  # now from cached blocks
        stats = engine.stats
    finally:
        engine.close()
    for i, b in enumerate(serial):
        _same(together[i].json(), b.json(), f"together {i}")
        _same(again[i].json(), b.json(), f"again {i}")
    assert stats["computed_prompt_tokens"] < 0.7 * stats["prompt_tokens"], stats
