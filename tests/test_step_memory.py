"""The KV pool sized from a measured worst step (server.step_memory), checked with a fake allocator probe.

- the order: settle, weights read, provisional runner built, worst steps run, peak read, runner
  dropped before the allocator is settled again, limit read;
- the arithmetic: steps = peak - weights - provisional pool, and weights + steps + pool + margin never
  exceed the limit, over a grid of limits and block sizes;
- an explicit --kv_tokens that cannot fit is refused naming the flag (one that fits is taken as is),
  a limit that leaves less than one window is refused naming what to lower, and running out of
  memory inside the profile is a clear error too;
- the worst prefill chunks are ones the scheduler can form, and ``worst_steps`` runs on the real
  paged runner (CPU, each attention branch);
- the engine takes its GPU pool from the measurement (device faked; the runner runs on the CPU).
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

import server.batch_engine as batch_engine
from server.batch_engine import BatchEngine
from server.loading import load_generator
from server.paged_model import SHORT_SEGMENT, PagedModel, kv_bytes_per_token
from server.step_memory import GIB, Measured, measure, measured_blocks, worst_prefills, worst_steps
from tests.test_batch_engine import ARCHITECTURES, _model


class FakeProbe:
    """An allocator holding ``kept`` bytes that something uses (weights, a runner's pool, graph pools) and
    ``cached`` bytes that a step left behind; ``settle`` gives the cached ones back."""

    def __init__(self, limit: int, weights: int, steps: int) -> None:
        self._limit, self.steps = limit, steps
        self.events: list[str] = []
        self.kept, self.cached = weights, 0
        self.top = weights

    def use(self, nbytes: int, kept: bool) -> None:
        if kept:
            self.kept += nbytes
        else:
            self.cached += nbytes
        self.top = max(self.top, self.kept + self.cached)

    def settle(self) -> None:
        self.events.append("settle")
        self.cached = 0
        self.top = self.kept

    def reserved(self) -> int:
        self.events.append("reserved")
        return self.kept + self.cached

    def peak(self) -> int:
        self.events.append("peak")
        return self.top

    def limit(self) -> int:
        self.events.append("limit")
        return self._limit


class FakeRunner:
    def __init__(self, probe: FakeProbe, blocks: int, block_bytes: int) -> None:
        self.probe = probe
        probe.events.append(f"build {blocks}")
        probe.use(blocks * block_bytes, kept=True)
        weakref.finalize(self, _drop, probe, blocks * block_bytes)


def _drop(probe: FakeProbe, nbytes: int) -> None:
    probe.events.append("dropped")
    probe.kept -= nbytes


def _profile(runner: FakeRunner):
    """Three stages: graph pools that stay (a third of the steps), then two steps whose blocks stay cached."""
    probe, graphs = runner.probe, runner.probe.steps // 3
    probe.use(graphs, kept=True)
    yield "graphs"
    probe.use(probe.steps - graphs, kept=False)
    yield "big step"
    probe.use(probe.steps // 4, kept=False)
    yield "small step"


def test_measure_reads_the_allocator_around_the_worst_steps_in_order() -> None:
    block_bytes = 2**20
    probe = FakeProbe(limit=20 * GIB, weights=12 * GIB, steps=3 * GIB)
    m = measure(probe, lambda blocks: FakeRunner(probe, blocks, block_bytes), _profile, provisional_blocks=129, block_bytes=block_bytes)
    stages = ["peak", "settle"] * 3
    assert probe.events == ["settle", "reserved", "build 129", *stages, "dropped", "settle", "limit"]
    assert (m.weights, m.provisional, m.steps, m.limit, m.worst) == (12 * GIB, 129 * block_bytes, 3 * GIB, 20 * GIB, "big step")
    assert m.margin == max(GIB // 2, int(0.02 * 20 * GIB))
    assert m.kv_room == 20 * GIB - 12 * GIB - 3 * GIB - m.margin


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_the_pool_never_exceeds_the_limit(block_size: int) -> None:
    per_token = 512 * 1024  # Llama-2-7B bf16
    block_bytes = block_size * per_token
    for limit_gib in (14.0, 15.5, 17.25, 23.25, 39.25, 139.0):
        m = Measured(
            limit=int(limit_gib * GIB),
            weights=int(12.55 * GIB),
            peak=int(12.55 * GIB) + 7 * block_bytes + int(1.9 * GIB),
            provisional=7 * block_bytes,
        )
        try:
            blocks = measured_blocks(m, block_size, block_bytes, window=2048, kv_tokens=None)
        except ValueError as e:
            assert m.kv_room < (2048 // block_size + 1) * block_bytes, limit_gib
            assert "--max_seq_length" in str(e)
            continue
        assert (blocks - 1) * block_size >= 2048
        assert m.weights + m.steps + blocks * block_bytes + m.margin <= m.limit
        assert m.weights + m.steps + (blocks + 1) * block_bytes + m.margin > m.limit  # and takes all that fits
        line = m.breakdown(blocks * block_bytes, (blocks - 1) * block_size)
        assert line.startswith(f"memory: {m.limit / GIB:.2f} GiB allowed = weights 12.55 + steps and graphs (measured; worst: -) 1.90")
        assert f"KV pool {(blocks - 1) * block_size:,} tokens" in line


def test_an_explicit_kv_tokens_that_cannot_fit_is_refused_naming_the_flag() -> None:
    block_size, block_bytes = 16, 16 * 2**19
    m = Measured(limit=int(23.25 * GIB), weights=int(12.55 * GIB), peak=int(14.5 * GIB), provisional=129 * block_bytes)
    room = (m.kv_room // block_bytes - 1) * block_size
    assert measured_blocks(m, block_size, block_bytes, 2048, kv_tokens=room) == room // block_size + 1
    assert measured_blocks(m, block_size, block_bytes, 2048, kv_tokens=4000) == math.ceil(4000 / 16) + 1
    with pytest.raises(ValueError, match=rf"^kv_tokens: {room + 1} tokens need .* ask for at most {room} or leave --kv_tokens unset"):
        measured_blocks(m, block_size, block_bytes, 2048, kv_tokens=room + 1)


def test_running_out_of_memory_in_the_profile_is_a_clear_error() -> None:
    probe = FakeProbe(limit=20 * GIB, weights=12 * GIB, steps=0)

    def profile(runner):
        yield "graphs"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")

    with pytest.raises(ValueError, match=r"the worst step does not fit .*Tried to allocate 2.00 GiB\); lower --max_batch"):
        measure(probe, lambda blocks: FakeRunner(probe, blocks, 1), profile, provisional_blocks=3, block_bytes=1)


@pytest.mark.parametrize(
    ("max_len", "max_batch", "prefill_tokens", "echo_tokens"), [(2048, 32, 4096, 512), (64, 16, 40, 8), (4096, 16, 2048, 512), (2, 16, 1, 512)]
)
def test_worst_prefills_are_chunks_the_scheduler_can_form(max_len: int, max_batch: int, prefill_tokens: int, echo_tokens: int) -> None:
    chunks = worst_prefills(max_len, max_batch, prefill_tokens, echo_tokens)
    assert chunks
    for chunk in chunks:
        assert 1 <= len(chunk) <= max_batch
        assert sum(take for _, take, _ in chunk) <= prefill_tokens
        assert sum(take for _, take, echo in chunk if echo) <= echo_tokens
        assert all(take >= 1 and start >= 0 and start + take <= max_len for start, take, _ in chunk)
    full = min(prefill_tokens, max_batch * max_len)
    assert sum(take for _, take, _ in chunks[0]) == full and chunks[0][0] == (0, min(echo_tokens, max_len, prefill_tokens), True)
    if max_len > 2 * SHORT_SEGMENT:  # a long continued prompt (masked attention) and a batch of short ones, both at the window's end
        assert any(start > 0 and take > SHORT_SEGMENT for start, take, _ in chunks[1])
        assert len(chunks[2]) == min(max_batch, prefill_tokens) and all(
            start + take == max_len and take <= SHORT_SEGMENT for start, take, _ in chunks[2]
        )


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_worst_steps_run_on_the_paged_runner(arch: str) -> None:
    model = _model(arch)
    runner = PagedModel(model, num_blocks=64 // 8 + 1, block_size=8, max_batch=16, max_len=64)
    stages = list(worst_steps(runner, max_batch=16, prefill_tokens=96, echo_tokens=24))
    assert stages == [
        *(f"prefill of {len(c)} segments from position {c[-1][0]}" for c in worst_prefills(64, 16, 96, 24)),
        "decode of 16 sequences with sampling",
    ]
    assert torch.isfinite(runner.kv).all()


def test_the_engine_takes_its_gpu_pool_from_the_measurement(make_tiny_checkpoint, monkeypatch) -> None:
    generator = load_generator(make_tiny_checkpoint(), device="cpu", dtype="fp32", max_seq_length=64)
    block_bytes = 8 * kv_bytes_per_token(generator.model)
    provisional = (64 // 8 + 1) * block_bytes
    steps = 5 * 2**20
    probes = []

    class Probe(FakeProbe):
        def __init__(self, device, gpu_memory_gib) -> None:
            assert gpu_memory_gib == 1.5
            super().__init__(limit=GIB, weights=2**20, steps=steps)
            probes.append(self)

        def peak(self) -> int:  # the real runner runs on the CPU: say what a GPU allocator would have seen
            self.events.append("peak")
            return 2**20 + provisional + steps

    monkeypatch.setattr(batch_engine, "CudaProbe", Probe)
    monkeypatch.setattr(generator, "device", torch.device("cuda"))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, cuda_graphs=False, gpu_memory_gib=1.5)
    try:
        room = GIB - 2**20 - steps - GIB // 2
        assert engine.pool.num_blocks == room // block_bytes == engine.model.num_blocks
        assert probes[0].events == ["settle", "reserved", *["peak", "settle"] * 4, "settle", "limit"]  # 3 prefills, 1 decode (no graphs on the CPU)
        assert engine.memory.startswith("memory: 1.00 GiB allowed = weights 0.00 + steps and graphs (measured; worst: prefill of")
    finally:
        engine.close()
    with pytest.raises(ValueError, match=r"^kv_tokens: 100000000 tokens need"):
        BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, kv_tokens=10**8, cuda_graphs=False, gpu_memory_gib=1.5)
