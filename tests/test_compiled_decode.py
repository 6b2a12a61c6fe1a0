"""``--compile_decode`` (server.compiled_decode) against the eager decode, litgpt and the serial engine, in fp32 on the CPU.

Inductor's CPU kernels (C++) fuse the same way its GPU ones do, so the numbers are checked here;
the speed only on a GPU (bench.serve's "ours-compiled"). The graph counts check that the compile
stays bounded: one graph per part for batch 1 and one for every larger batch, shared by all layers.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.app import create_app
from server.batch_engine import BatchEngine
from server.compiled_decode import _BACKENDS, unavailable_reason
from server.engine import SerialEngine, make_engine
from server.kv_pool import KVPool
from server.loading import load_generator
from server.paged_model import PagedModel, Segment
from tests.test_batch_engine import ARCHITECTURES, _model, _requests, _send_all, _tables, assert_same_answers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's cache is per code object, shared by every PagedModel of the process: start each test empty
    (a server holds one model; this file builds several), so the recompile limit counts this test's graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> dict[str, int]:
    return {name: backend.graphs for name, backend in _BACKENDS.items()}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_compiled_decode_equals_eager_and_litgpt(arch: str) -> None:
    """Batches of 1, 3 and 2 (batch 1 static, the others one dynamic graph), grouped queries, a
    sliding window shorter than the sequences, partial RoPE with parallel residual, q/k norms."""
    model = _model(arch)
    pool = KVPool(num_blocks=40, block_size=4)
    eager = PagedModel(model, pool.num_blocks, pool.block_size, max_batch=16)
    compiled = PagedModel(model, pool.num_blocks, pool.block_size, max_batch=16, compile_decode=True)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (23, 9, 30)]
    with torch.inference_mode():
        refs = [model(torch.tensor([s]))[0] for s in seqs]
    tables = _tables(pool, [len(s) for s in seqs])
    steps = 4
    for runner in (eager, compiled):  # each writes its own pool: same prompts, all but the last `steps` tokens
        runner.prefill([Segment(t, 0, s[:-steps]) for t, s in zip(tables, seqs)])
    before = _graphs()
    for step in range(steps):
        for rows in ([0], [0, 1, 2], [1, 2]):  # a position decoded twice writes the same K/V again
            positions = [len(seqs[i]) - steps + step for i in rows]
            args = ([seqs[i][p] for i, p in zip(rows, positions)], positions, [tables[i] for i in rows])
            got, want = compiled.decode(*args), eager.decode(*args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for b, (i, p) in enumerate(zip(rows, positions)):
                torch.testing.assert_close(got[b], refs[i][p], atol=1e-5, rtol=1e-5)
    made = {name: n - before.get(name, 0) for name, n in _graphs().items()}
    assert made == {"decode_before": 2, "decode_after": 2}, made  # batch 1 and dynamic batch, both layers in one


def test_engine_with_compile_decode_equals_the_serial_engine(make_tiny_checkpoint) -> None:
    """The option through BatchEngine on the tiny checkpoint: prefix sharing, forks, samples, echo."""
    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    bodies = _requests()[::2]
    serial = asyncio.run(_send_all(create_app(SerialEngine(generator), generator.codec), bodies, concurrency=1))
    before = _graphs()
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, kv_tokens=2048, compile_decode=True)
    try:
        assert engine.model.compile_decode
        batched = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=30))
    finally:
        engine.close()
    assert_same_answers(batched, serial, bodies)
    made = {name: n - before.get(name, 0) for name, n in _graphs().items()}
    assert made == {"decode_before": 2, "decode_after": 2}, made  # the trial's graphs served every batch: none after it


def test_the_trial_compiles_every_graph_before_serving(make_tiny_checkpoint) -> None:
    """The engine's start-up trial builds batch 1's and the dynamic batch's graphs; decoding on the engine's own
    pool (another PagedModel) reuses them through dynamo's cache."""
    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    before = _graphs()
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, kv_tokens=2048, compile_decode=True)
    try:
        made = {name: n - before.get(name, 0) for name, n in _graphs().items()}
        assert made == {"decode_before": 2, "decode_after": 2}, made
    finally:
        engine.close()


def _failing_inductor(monkeypatch) -> None:
    """Every compile of a decode part raises, as a Triton build would where its toolchain is broken."""
    import server.compiled_decode as compiled_decode

    def fail(self, gm, example_inputs):
        raise RuntimeError("triton: the launcher did not build\n(the rest of its log)")

    monkeypatch.setattr(compiled_decode._Counted, "__call__", fail)


def test_a_decode_that_fails_to_compile_is_refused_when_asked_for(make_tiny_checkpoint, monkeypatch) -> None:
    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    _failing_inductor(monkeypatch)
    with pytest.raises(ValueError, match="compile_decode: compiling the decode failed: .*triton: the launcher did not build"):
        BatchEngine(generator, max_batch=16, kv_block_size=8, kv_tokens=2048, compile_decode=True)


def test_by_default_a_decode_that_fails_to_compile_serves_eager(make_tiny_checkpoint, monkeypatch, capsys) -> None:
    """The default on a platform where it would be on (CUDA, faked here) with a compile that fails: the reason is
    printed, the decode stays eager, and the answers are the serial engine's."""
    import server.compiled_decode as compiled_decode

    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    bodies = _requests()[:6]
    serial = asyncio.run(_send_all(create_app(SerialEngine(generator), generator.codec), bodies, concurrency=1))
    _failing_inductor(monkeypatch)
    monkeypatch.setattr(compiled_decode, "default_on", lambda model: True)
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, kv_tokens=2048)
    try:
        assert engine.model.compile_decode is False
        err = capsys.readouterr().err
        assert "compile_decode: off by default here: compiling the decode failed: " in err and "the launcher did not build" in err
        batched = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=6))
    finally:
        engine.close()
    assert_same_answers(batched, serial, bodies)


def test_compile_decode_is_refused_where_it_cannot_run(make_tiny_checkpoint, monkeypatch) -> None:
    from litgpt.adapter import GPT as AdapterGPT
    from litgpt.adapter import Config as AdapterConfig

    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    assert unavailable_reason(generator.model) is None
    with pytest.raises(ValueError, match="compile_decode: only the batched engine.*--engine serial"):
        make_engine(generator, "serial", compile_decode=True)
    adapter = load_generator(make_tiny_checkpoint(), device="cpu")
    config = AdapterConfig.from_file(make_tiny_checkpoint() / "model_config.yaml", adapter_prompt_length=4, adapter_start_layer=1)
    adapter.model = AdapterGPT(config)
    with pytest.raises(ValueError, match="compile_decode: only the batched engine.*adapter"):
        make_engine(adapter, "auto", compile_decode=True)
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler for inductor's CPU kernels
    with pytest.raises(ValueError, match="compile_decode: inductor needs a C\\+\\+ compiler"):
        PagedModel(generator.model, 8, 4, max_batch=2, compile_decode=True)


def test_the_cli_option_reaches_the_engine(make_tiny_checkpoint, monkeypatch) -> None:
    from core.cli import run_cli
    from server import __main__ as main

    seen = {}

    def fake_make_engine(generator, kind, **options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(main, "make_engine", fake_make_engine)
    for args, want in (([], None), (["--compile_decode", "true"], True), (["--compile_decode", "false"], False)):
        with pytest.raises(SystemExit, match="stop here"):
            run_cli(main.serve, args=["--checkpoint_dir", str(make_tiny_checkpoint()), "--device", "cpu", *args])
        assert seen["compile_decode"] is want


def test_the_default_compiles_on_cuda_where_it_can_and_never_on_the_cpu(make_tiny_checkpoint, monkeypatch, capsys) -> None:
    """--compile_decode unset (None): on for a CUDA model inductor can build, off (with the reason) where it cannot,
    off on the CPU; a value given is kept. The serial engine takes the default without refusing it."""
    import server.compiled_decode as compiled_decode
    from server.compiled_decode import resolve_compile_decode as resolve

    generator = load_generator(make_tiny_checkpoint(), device="cpu")
    assert resolve(None, generator.model) is False and resolve(True, generator.model) is True and resolve(False, generator.model) is False

    cuda_param = type("P", (), {"device": torch.device("cuda")})()  # only the parameters' device is read here
    model = type("M", (), {"parameters": lambda self: iter([cuda_param])})()
    monkeypatch.setattr(compiled_decode, "unavailable_reason", lambda m: None)
    assert resolve(None, model) is True
    monkeypatch.setattr(compiled_decode, "unavailable_reason", lambda m: "inductor needs Triton for CUDA kernels and it is not installed")
    assert resolve(None, model) is False and "compile_decode: off by default here: inductor needs Triton" in capsys.readouterr().err
    with pytest.raises(ValueError, match="compile_decode: inductor needs Triton"):
        resolve(True, model)  # asked for: refused with the reason

    monkeypatch.undo()
    assert type(make_engine(generator, "serial", compile_decode=None)).__name__ == "SerialEngine"
    engine = make_engine(generator, "batched", compile_decode=None, kv_tokens=2048)
    try:
        assert engine.model.compile_decode is False
    finally:
        engine.close()


def test_on_cuda_a_missing_triton_toolchain_is_a_reason_not_a_crash_at_warmup(monkeypatch, tmp_path) -> None:
    """Triton builds a launcher with a C compiler and Python's headers on first use (the CUDA runtime Docker image
    has neither): without them the default stays eager with that reason instead of failing at warmup."""
    import sysconfig

    import torch.utils._triton

    cuda_param = type("P", (), {"device": torch.device("cuda")})()
    model = type("M", (), {"parameters": lambda self: iter([cuda_param]), "modules": lambda self: iter([])})()
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "C compiler (CC, gcc or clang)" in unavailable_reason(model)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert "Python.h is missing" in unavailable_reason(model)
    (tmp_path / "Python.h").write_text("")
    assert unavailable_reason(model) is None
