"""Lazy KV reservation with preemption (``Scheduler(reservation="lazy")``), model-free.

Admission reserves a prompt's blocks (not ``max_new_tokens``), a decoding sequence gets a block when
it crosses a block boundary, and when the pool is out of blocks the youngest running request is
preempted: freed, queued again ahead of younger ones, and on readmission its prompt and its
generated tokens are recomputed (``Step.recompute``) before it decodes on at the same position.
Checked here on a driver that does what the engine does with a step: every block is held exactly as
often as the pool counts (ref counts exact, nothing leaks), a sequence only ever writes blocks it
holds alone, the oldest running request is never preempted, and every request finishes.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from server.kv_pool import KVPool
from server.scheduler import Job, Scheduler, Step


def _holders(s: Scheduler) -> Counter:
    """How often each block is held by the running jobs (tables after fork, blocks + spare before)."""
    held: Counter = Counter()
    for job in s.running:
        for block in [b for t in job.tables for b in t] if job.tables else job.blocks + job.spare:
            held[block] += 1
    return held


def _check(s: Scheduler, step: Step) -> None:
    pool, bs = s.pool, s.pool.block_size
    held = _holders(s)
    assert all(pool.refs(b) == held[b] for b in range(1, pool.num_blocks)), "a block's ref count is not its holders"
    assert pool.held == len(held)
    for job, start, take in step.recompute:  # what each sequence writes is its own
        for table in job.tables:
            assert len(table) * bs >= start + take
            assert all(pool.refs(table[p // bs]) == 1 for p in range(start, start + take))


class Driver:
    """What the engine does with each step, with token counts instead of a model."""

    def __init__(self, s: Scheduler) -> None:
        self.s, self.generated, self.finished = s, {}, []

    def step(self) -> Step:
        s, bs = self.s, self.s.pool.block_size
        oldest = min(s.running, key=lambda j: j.arrival, default=None)
        step = s.schedule()
        assert oldest is None or oldest not in step.preempted, "the oldest running request was preempted"
        _check(s, step)
        for job, _, take in step.prefill:
            if s.computed(job, take):
                if job.resumed:  # its first tokens are sampled already
                    s.fork(job)
                elif job.forks:
                    s.fork(job)
                    self.generated[job] = 1
                else:
                    self._done(job)
        for job, _, take in step.recompute:
            s.recomputed(job, take)
        for job in [j for j in s.running if j.state == "decode"]:  # those that forked or resumed now too
            assert all(len(t) * bs > job.pos and s.pool.refs(t[job.pos // bs]) == 1 for t in job.tables)
            assert job.pos == len(job.ids) + self.generated[job] - 1  # resumed where it stopped
            job.pos += 1
            self.generated[job] += 1
            if self.generated[job] >= job.max_new_tokens:
                self._done(job)
        return step

    def _done(self, job: Job) -> None:
        self.s.finish(job)
        self.finished.append(job)


def _prompt(start: int, n_tokens: int) -> list[int]:
    return list(range(start, start + n_tokens))


def test_lazy_admits_by_prompt_and_grows_a_block_at_each_boundary() -> None:
    pool = KVPool(num_blocks=17, block_size=4)  # 16 usable blocks
    jobs = [Job(_prompt(100 * i, 8), 1, 12) for i in range(4)]  # 2 prompt blocks each, 5 blocks up front
    up_front = Scheduler(KVPool(17, 4), max_batch=16, prefill_tokens=1000)
    lazy = Scheduler(pool, max_batch=16, prefill_tokens=1000, reservation="lazy", watermark=0.0)
    for job in jobs:
        up_front.add(Job(list(job.ids), 1, 12))
        lazy.add(job)
    assert len(up_front.schedule().prefill) == 3  # 15 of 16 blocks reserved
    driver = Driver(lazy)
    assert len(driver.step().prefill) == 4 and pool.held == 4 * 2 + 4  # prompts, and each first token's block
    lengths = []
    while lazy.running and not driver.step().preempted:
        lengths.append([len(j.tables[0]) for j in jobs if j.state == "decode"])
    assert lengths[:5] == [[3] * 4] * 3 + [[4] * 4] * 2  # position 12 then 16 are new blocks


def test_the_youngest_is_preempted_and_resumes_at_its_position() -> None:
    pool = KVPool(num_blocks=14, block_size=4)  # 13 usable blocks
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000, reservation="lazy", watermark=0.0)
    old, young = Job(_prompt(0, 8), 1, 20), Job(_prompt(500, 8), 2, 20)  # 7 and 12 blocks at most: not both
    s.add(old)
    s.add(young)
    driver = Driver(s)  # it checks that a resumed job decodes on at the position it stopped at
    tails, recomputed = [], 0
    while s.busy:
        step = driver.step()
        tails += [job.tail for job in step.preempted]
        assert all(job is young and job.state == "queued" and job.tables == [] for job in step.preempted)
        for job, start, take in step.recompute:
            assert job is young and start == len(young.ids) + recomputed
            recomputed += take
        if young.state == "decode":
            recomputed = 0
    assert tails and tails[0] > 0 and young.preemptions == len(tails) and old.preemptions == 0
    assert driver.finished == [old, young] and pool.held == 0
    assert driver.generated == {old: 20, young: 20}


def test_a_preempted_request_goes_back_ahead_of_younger_ones_and_its_prompt_is_taken_from_the_index() -> None:
    pool = KVPool(num_blocks=13, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000, reservation="lazy", watermark=0.0)
    a, b = Job(_prompt(0, 8), 1, 24), Job(_prompt(300, 9), 1, 24)
    s.add(a)
    s.add(b)
    driver = Driver(s)
    while not (step := driver.step()).preempted:
        pass
    assert step.preempted == [b] and b.state == "queued" and b.resumed and b.tail > 0
    late = Job(_prompt(900, 4), 1, 2)
    s.add(late)
    assert list(s.queue) == [b, late]
    while b.state == "queued":
        assert late.state == "queued"  # first come first served: nothing passes the preempted request
        step = driver.step()
    assert [(job, start) for job, start, _ in step.prefill] == [(b, 8), (late, 0)]  # b's 2 full prompt blocks were cached
    while s.busy:
        driver.step()
    assert pool.held == 0 and set(driver.finished) == {a, b, late}


def test_the_n_sequences_of_a_request_are_preempted_together_and_shared_blocks_freed_exactly() -> None:
    pool = KVPool(num_blocks=30, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000, reservation="lazy", watermark=0.0)
    shots = _prompt(7000, 16)
    old = Job(shots + [1, 2], 1, 40)
    forks = Job(shots + [3, 4, 5], 3, 30)  # shares 4 blocks with old and its own 3 sequences
    s.add(old)
    driver = Driver(s)
    driver.step()
    s.add(forks)
    seen = False
    while s.busy:
        step = driver.step()
        if forks in step.preempted:
            seen = True
            assert forks.tables == [] and all(pool.refs(b) >= 1 for b in old.tables[0][:4])
    assert seen and pool.held == 0 and driver.generated[forks] == 30


def test_a_request_that_cannot_fit_alone_is_refused_under_lazy_too() -> None:
    s = Scheduler(KVPool(num_blocks=9, block_size=4), max_batch=16, prefill_tokens=1000, reservation="lazy")
    big = Job(_prompt(0, 8), 2, 20)  # 2 + 5 + 5 blocks up front (27 positions a sequence): more than 8
    s.add(big)
    step = s.schedule()
    assert [job for job, _ in step.refused] == [big] and "need 12 KV blocks" in step.refused[0][1]


def test_a_bad_reservation_is_refused_naming_the_option() -> None:
    with pytest.raises(ValueError, match="kv_reservation: choose one of up_front, lazy, got 'eager'"):
        Scheduler(KVPool(9, 4), 16, 100, reservation="eager")
    with pytest.raises(ValueError, match="watermark"):
        Scheduler(KVPool(9, 4), 16, 100, reservation="lazy", watermark=1.5)


def test_a_thousand_mixed_requests_under_lazy_preempt_and_leave_no_block_held() -> None:
    """Shared prefixes, echo, forks, cancellations (queued, prefilling, decoding, preempted) on a
    small pool: preemptions happen, ref counts stay exact every step, the oldest running request is
    never preempted, every request is answered, and every block comes back."""
    rng = random.Random(0)
    pool = KVPool(num_blocks=80, block_size=4)
    s = Scheduler(pool, max_batch=12, prefill_tokens=64, reservation="lazy")
    driver = Driver(s)
    prefixes = [_prompt(p * 1000, rng.choice([8, 24, 40])) for p in range(15)]
    made = cancelled = refused = 0
    jobs: list[Job] = []
    for _ in range(40_000):
        while made < 1000 and s.queued < 16 and rng.random() < 0.5:
            made += 1
            ids = rng.choice(prefixes) + [rng.randrange(1, 900) for _ in range(rng.randrange(1, 20))]
            jobs.append(Job(ids, rng.choice([1, 1, 1, 2, 3]), rng.choice([0, 1, 8, 30, 60]), echo=rng.random() < 0.05))
            s.add(jobs[-1])
        if not s.busy and made == 1000:
            break
        step = driver.step()
        refused += len(step.refused)
        for job in list(s.running) + list(s.queue):
            if not job.cancelled and job.state != "done" and rng.random() < 0.003:
                s.cancel(job)
                cancelled += 1
        _check(s, Step())
    assert made == 1000 and not s.busy and pool.held == 0
    assert len(driver.finished) + cancelled + refused == 1000
    assert s.preemptions > 50 and any(j.preemptions > 1 for j in jobs)
    assert all(driver.generated[j] == j.max_new_tokens for j in driver.finished if j.forks)
