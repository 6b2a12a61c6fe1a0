"""``attention_tokens``: each attention call gathers at most that many K/V positions (sequences x positions).

On the paged tests' architectures (fp32, CPU) a bounded runner answers as an unbounded one and as
litgpt's forward, to 1e-5: many short segments at late positions (grouped), a long continued segment
(queries in chunks), sliding windows, and decode steps whose batch is split into several chunks. Every
``_gather`` is recorded: the bound holds for every call, while the unbounded runner exceeds it on the
same steps. The engine's memory profile (``server.step_memory``) runs the bounded path, and the option
goes from ``python -m server`` to the runner; a negative value is refused naming it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server import batch_engine
from server.batch_engine import BatchEngine
from server.kv_pool import KVPool
from server.loading import load_generator
from server.paged_model import PagedModel, Segment, balanced_chunks
from server.step_memory import GIB
from tests.test_batch_engine import ARCHITECTURES, _model, _tables
from tests.test_step_memory import FakeProbe

BUDGET = 128  # 2 full 64-position windows of the test models per call
SHORT = 8  # SHORT_SEGMENT for these tests: segments up to 8 tokens are batched, longer ones alone


def _recorded(monkeypatch) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, bool]]]:
    """(sequences, positions) of every ``_gather``; (calls, query rows, keys, causal) of every attention call."""
    gathers, scores = [], []
    gather, sdpa = PagedModel._gather, F.scaled_dot_product_attention

    def spy_gather(self, layer, tables):
        keys, values = gather(self, layer, tables)
        gathers.append((keys.size(0), keys.size(2)))
        return keys, values

    def spy_sdpa(q, k, v, **kwargs):
        scores.append((q.size(0), q.size(-2), k.size(-2), kwargs.get("is_causal", False)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(PagedModel, "_gather", spy_gather)
    monkeypatch.setattr("server.paged_model.F.scaled_dot_product_attention", spy_sdpa)
    return gathers, scores


def _serve_steps(paged: PagedModel, pool: KVPool, seqs: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefixes (30..44 tokens, and 10) alone; then 8 sequences' next 8 tokens together (short segments at
    late positions) with the last one's 30 more (a long continued segment, masked); then 4 decode steps."""
    tables = _tables(pool, [len(s) for s in seqs])
    prefix = [30 + 2 * i for i in range(len(seqs) - 1)] + [10]
    out = paged.prefill([Segment(t, 0, s[:p]) for t, s, p in zip(tables, seqs, prefix)])
    late = [Segment(t, p, s[p : p + SHORT], all_logits=i % 2 == 0) for i, (t, s, p) in enumerate(zip(tables[:-1], seqs, prefix))]
    out += paged.prefill([*late, Segment(tables[-1], 10, seqs[-1][10:40], all_logits=True)])
    ends = [p + SHORT for p in prefix[:-1]] + [40]
    steps = []
    for step in range(4):
        positions = [e + step for e in ends]
        steps.append(paged.decode([s[p] for s, p in zip(seqs, positions)], positions, tables))
    return out, steps


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bounded_attention_equals_unbounded_and_keeps_its_bound(arch: str, monkeypatch) -> None:
    monkeypatch.setattr("server.paged_model.SHORT_SEGMENT", SHORT)
    model = _model(arch)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (64,), generator=g).tolist() for _ in range(9)]
    with torch.inference_mode():
        refs = [model(torch.tensor([s]))[0] for s in seqs]
    gathers, scores = _recorded(monkeypatch)
    runs, seen = {}, {}
    for budget in (0, BUDGET):
        gathers.clear(), scores.clear()
        pool = KVPool(num_blocks=9 * 16 + 1, block_size=4)
        runs[budget] = _serve_steps(PagedModel(model, pool.num_blocks, pool.block_size, max_batch=16, attention_tokens=budget), pool, seqs)
        seen[budget] = list(gathers), [(n, rows, keys) for n, rows, keys, causal in scores if not causal]  # flash holds no scores
    (prefills, steps), (bounded_prefills, bounded_steps) = runs[0], runs[BUDGET]
    for a, b in zip(prefills + steps, bounded_prefills + bounded_steps, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # and both are litgpt's: a short late segment's logits, the long segment's, a decode step's
    torch.testing.assert_close(bounded_prefills[9], refs[0][30:38], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bounded_prefills[17], refs[8][10:40], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bounded_steps[-1][4], refs[4][30 + 8 + 8 + 3], atol=1e-5, rtol=1e-5)

    layers, per_kv = model.config.n_layer, model.config.n_head // model.config.n_query_groups
    gathered, masked = seen[BUDGET]
    assert all(n * length <= BUDGET for n, length in gathered), gathered
    assert max(n for n, _ in gathered) == 2  # still batched: two windows per call
    assert all(n * rows * keys <= BUDGET * SHORT * per_kv for n, rows, keys in masked), masked  # scores: at most a short batch's
    assert (1, 15, 40) in masked  # the long segment's 30 queries in two chunks
    # decode: 9 sequences x 64 positions in calls of 2, 2, 2, 2 and 1 a layer
    assert gathered[-5 * layers :] == ([(2, 64)] * 4 + [(1, 64)]) * layers
    # unbounded, the same steps gathered past the bound: 8 short segments, 9 decoded sequences, 30 queries at once
    gathered, masked = seen[0]
    assert (8, 52) in gathered and gathered[-layers:] == [(9, 64)] * layers and (1, 30, 40) in masked


def test_balanced_chunks_are_near_equal_within_the_budget() -> None:
    for n in range(1, 40):
        for size in (1, 7, 64, 2048):
            for budget in (None, 0, 1, 100, 16384, 10**9):
                parts = balanced_chunks(n, size, budget)
                lengths = [p.stop - p.start for p in parts]
                assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))  # every item once, in order
                assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
                if not budget or n * size <= budget:
                    assert len(parts) == 1  # under the budget: one call, as unbounded
                else:
                    per = max(1, budget // size)
                    assert max(lengths) <= per and len(parts) == -(-n // per)  # fewest calls within the budget


def test_a_negative_budget_is_refused_naming_the_option(capsys, make_tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="attention_tokens: must be positive .* or 0 for no bound, got -1"):
        PagedModel(_model("gqa"), 9, 8, max_batch=16, attention_tokens=-1)
    generator = load_generator(make_tiny_checkpoint(), device="cpu", max_seq_length=64)
    with pytest.raises(ValueError, match="attention_tokens: must be at least 0, got -5"):
        BatchEngine(generator, max_batch=16, attention_tokens=-5)
    from core.cli import run_cli
    from server.__main__ import serve

    with pytest.raises(SystemExit, match="^error: attention_tokens: must be at least 0, got -5$"):
        run_cli(
            serve, args=["--checkpoint_dir", str(make_tiny_checkpoint()), "--device", "cpu", "--max_seq_length", "64", "--attention_tokens", "-5"]
        )


@pytest.mark.parametrize(("flag", "expected"), [("4096", 4096), ("0", None), ("null", None), (None, 16384)])
def test_the_option_goes_from_the_command_line_to_the_runner(make_tiny_checkpoint, monkeypatch, flag, expected) -> None:
    import server.__main__ as main

    served = []
    monkeypatch.setattr(main._DrainingServer, "run", lambda self: served.append(self.engine))
    args = ["--checkpoint_dir", str(make_tiny_checkpoint()), "--device", "cpu", "--max_seq_length", "64", "--max_batch", "16"]
    from core.cli import run_cli

    run_cli(main.serve, args=args + (["--attention_tokens", flag] if flag is not None else []))
    (engine,) = served
    try:
        assert isinstance(engine, BatchEngine) and engine.model.attention_tokens == expected
    finally:
        engine.close()


def test_the_memory_profile_runs_the_bounded_attention(make_tiny_checkpoint, monkeypatch) -> None:
    """The engine sizes its GPU pool from ``worst_steps`` on a runner built as the served one: bounded too."""
    generator = load_generator(make_tiny_checkpoint(), device="cpu", dtype="fp32", max_seq_length=64)

    class Probe(FakeProbe):
        def __init__(self, device, gpu_memory_gib) -> None:
            super().__init__(limit=GIB, weights=2**20, steps=2**20)

    gathers, _ = _recorded(monkeypatch)
    monkeypatch.setattr(batch_engine, "CudaProbe", Probe)
    monkeypatch.setattr(generator, "device", torch.device("cuda"))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=96, kv_block_size=8, cuda_graphs=False, gpu_memory_gib=1.0, attention_tokens=BUDGET)
    engine.close()
    assert gathers and all(n * length <= BUDGET for n, length in gathers), gathers
    assert max(n for n, _ in gathers) == BUDGET // 64  # the 16 short segments and the 16-sequence decode: chunks of 2 windows
