"""The paged KV cache's bookkeeping and the scheduler, with no model and no tensors.

- ``KVPool``: ref counts, the shared-prefix index (exact tokens, never a hash), reuse of cached
  blocks only when nothing free is left, block 0 never handed out.
- ``Scheduler``: admission by blocks (a full pool makes the head wait, then admits it), a request
  that can never fit is refused, admission looks at the head of the queue only, forks share full
  prompt blocks and copy a partial one, and finishing frees everything.
"""

from __future__ import annotations

import pytest

from server.kv_pool import KVPool, PoolExhausted
from server.scheduler import WAIT_FOR_SHARED, Job, Scheduler


def test_pool_counts_refs_and_never_hands_out_block_zero() -> None:
    pool = KVPool(num_blocks=6, block_size=4)
    blocks = pool.allocate(5)
    assert 0 not in blocks and sorted(blocks) == [1, 2, 3, 4, 5]
    assert pool.available == 0 and pool.held == 5
    with pytest.raises(PoolExhausted):
        pool.allocate(1)
    pool.share(blocks[:2])
    pool.free(blocks)
    assert pool.held == 2 and pool.available == 3
    pool.free(blocks[:2])
    assert pool.held == 0 and pool.available == 5
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(blocks[:1])


def test_index_matches_exact_prefixes_only() -> None:
    pool = KVPool(num_blocks=10, block_size=4)
    a = list(range(10))
    table = pool.allocate(3)
    pool.register(a, table, upto=len(a))  # two full blocks indexed; the partial third is not
    assert pool.match(a, max_blocks=5) == table[:2]
    assert pool.match(a, max_blocks=1) == table[:1]
    assert pool.match(a[:4] + [99] + a[5:], max_blocks=5) == table[:1]  # second block differs
    assert pool.match([99] + a[1:], max_blocks=5) == []  # the same second block behind another first is no match
    shifted = [7, 7, 7, 7] + a[4:8]
    assert pool.match(shifted, max_blocks=5) == []


def test_cached_blocks_stay_until_nothing_free_is_left() -> None:
    pool = KVPool(num_blocks=5, block_size=2)
    ids = [1, 2, 3, 4]
    table = pool.allocate(2)
    pool.register(ids, table, upto=4)
    pool.free(table)
    assert pool.held == 0 and pool.available == 4
    other = pool.allocate(2)  # never-used blocks first: the prefix survives
    assert set(other).isdisjoint(table) and pool.match(ids, 2) == table
    pool.share(table)  # taken by reference again
    assert pool.refs(table[0]) == 1 and pool.available == 0
    pool.free(table + other)
    pool.allocate(4)  # now the cached blocks are reused and forgotten
    assert pool.match(ids, 2) == []


def _job(n_tokens: int, n: int = 1, max_new: int = 1, start: int = 0, echo: bool = False) -> Job:
    return Job(list(range(start, start + n_tokens)), n, max_new, echo=echo)


def test_full_pool_makes_the_head_wait_then_admits_it() -> None:
    pool = KVPool(num_blocks=9, block_size=4)  # 8 usable blocks = 32 tokens
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000)
    first, second = _job(20, max_new=5, start=0), _job(20, max_new=5, start=100)  # 24 positions = 6 blocks each
    s.add(first)
    s.add(second)
    step = s.schedule()
    assert [job for job, _, _ in step.prefill] == [first] and second.state == "queued"
    assert s.queued == 1
    s.computed(first, 20)
    s.fork(first)
    assert s.schedule().decode == [first] and second.state == "queued"
    s.finish(first)
    assert pool.held == 0
    step = s.schedule()
    assert [job for job, _, _ in step.prefill] == [second]
    s.finish(second)
    assert pool.held == 0 and not s.busy


def test_a_request_that_can_never_fit_is_refused() -> None:
    pool = KVPool(num_blocks=9, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000)
    big = _job(20, n=4, max_new=10)
    s.add(big)
    step = s.schedule()
    assert [job for job, _ in step.refused] == [big] and "need" in step.refused[0][1]
    assert not s.busy and pool.held == 0


def test_admission_looks_at_the_head_only(monkeypatch) -> None:
    pool = KVPool(num_blocks=9, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000)
    s.add(_job(30, max_new=2))  # takes the pool
    for i in range(5000):
        s.add(_job(30, max_new=2, start=1000 + i))
    s.schedule()
    calls = []
    monkeypatch.setattr(pool, "match", lambda ids, limit: calls.append(1) or [])
    for _ in range(10):
        s.schedule()
    assert len(calls) <= 10  # one look at the head per step, not one per queued request


def test_cancelled_jobs_free_now_or_are_skipped() -> None:
    pool = KVPool(num_blocks=20, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=8)
    running, queued = _job(30, max_new=3), _job(10, max_new=3, start=500)
    s.add(running)
    s.schedule()
    s.add(queued)
    s.cancel(queued)
    s.cancel(running)
    assert pool.held == 0 and s.queued == 0
    assert s.schedule().prefill == [] and not s.busy


def test_fork_shares_full_prompt_blocks_and_copies_the_partial_one() -> None:
    pool = KVPool(num_blocks=30, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=100)
    job = _job(10, n=3, max_new=7)  # 10 prompt tokens: 2 full blocks + 2 positions; 16 positions stored
    s.add(job)
    s.schedule()
    assert s.computed(job, 10)
    copies = s.fork(job)
    full = job.tables[0][:2]
    assert all(t[:2] == full for t in job.tables)
    assert [pool.refs(b) for b in full] == [3, 3]
    partials = [t[2] for t in job.tables]
    assert len(set(partials)) == 3 and copies == [(partials[0], partials[1]), (partials[0], partials[2])]
    assert all(len(t) == 4 for t in job.tables)
    assert len({b for t in job.tables for b in t[2:]}) == 6  # the rest is each sequence's own
    s.finish(job)
    assert pool.held == 0


def test_a_prompt_shares_blocks_an_earlier_one_computed_and_waits_for_one_in_flight() -> None:
    pool = KVPool(num_blocks=60, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=64)
    shots = list(range(200, 264))  # 64 shared tokens = 16 blocks
    a = Job(shots + [1, 2, 3], 1, 2)
    b = Job(shots + [4, 5], 1, 2)
    s.add(a)
    s.add(b)
    step = s.schedule()
    assert [job for job, _, _ in step.prefill] == [a] and b.state == "queued"  # b waits: a is computing its prefix
    assert len(shots) >= WAIT_FOR_SHARED
    assert not s.computed(a, step.prefill[0][2])  # 64 of 67 tokens: its 16 full blocks are indexed
    step = s.schedule()
    assert b.state == "prefill" and b.computed == 64 and b.blocks[:16] == a.blocks[:16]
    assert [(job, start) for job, start, _ in step.prefill] == [(a, 64), (b, 64)]
    echo = Job(shots + [9], 1, 0, echo=True)  # echo needs every position's logits: nothing shared
    s.add(echo)
    s.schedule()
    assert echo.computed == 0
