"""Admission past a request that waits for a shared prefix (no head-of-line blocking), model-free.

A request whose prefix an older prompt is computing right now waits a round for it; the requests
behind it must not wait with it (vLLM v1 passes such requests over and puts them back at the head).
Fairness stays: the waiter keeps its place, its blocks and batch seats are held for it, it waits
only on older prompts, requests that wait on nothing are admitted first come first served, and a
request that does not fit still stops everything behind it (backpressure). Every test but the
last (fairness and no leaks under random traffic) fails on the scheduler that stopped the queue at
the waiter.
"""

from __future__ import annotations

import random

from server.kv_pool import KVPool
from server.scheduler import Job, Scheduler

SHOTS = list(range(1000, 1064))  # a 64-token few-shot prefix: 16 blocks of 4


def _prefilled(step) -> list[Job]:
    return [job for job, _, _ in step.prefill]


def _compute(s: Scheduler, step) -> None:
    """What the engine does after a prefill: a finished prompt forks (or is answered if it generates nothing more)."""
    for job, _, take in step.prefill:
        if s.computed(job, take):
            s.fork(job) if job.forks else s.finish(job)


def test_requests_behind_a_prefix_waiter_are_admitted_in_the_same_step() -> None:
    pool = KVPool(num_blocks=200, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000)
    a, waiter = Job(SHOTS + [1, 2, 3], 1, 2), Job(SHOTS + [4, 5], 1, 2)
    c, d = Job(list(range(5000, 5040)), 1, 2), Job(list(range(6000, 6030)), 1, 2)
    for job in (a, waiter, c, d):
        s.add(job)
    step = s.schedule()
    assert _prefilled(step) == [a, c, d] and step.waiting == [waiter]  # the old scheduler ran only a
    assert waiter.state == "queued" and s.queued == 1 and list(s.queue) == [waiter]
    _compute(s, step)
    step = s.schedule()
    assert _prefilled(step) == [waiter] and waiter.computed == len(SHOTS) and waiter.blocks[:16] == a.blocks[:16]
    for job in (a, waiter, c, d):
        s.finish(job)
    assert pool.held == 0 and not s.busy


def test_a_burst_of_run_specs_is_admitted_in_two_steps_not_two_per_run_spec() -> None:
    """30 requests of 6 run specs at once (HELM at concurrency 30): each run spec's first prompt
    computes its prefix in step 1, alongside the other run specs'; the rest share them in step 2."""
    pool = KVPool(num_blocks=2000, block_size=16)
    s = Scheduler(pool, max_batch=32, prefill_tokens=100_000)
    jobs = []
    for spec in range(6):
        prefix = list(range(spec * 10_000, spec * 10_000 + 400))
        jobs += [Job(prefix + list(range(90_000 + 100 * i, 90_000 + 100 * i + 50)), 1, 1) for i in range(5)]
    for job in jobs:
        s.add(job)
    first = s.schedule()
    assert _prefilled(first) == jobs[::5] and len(first.waiting) == 24
    _compute(s, first)
    second = s.schedule()
    assert sorted(_prefilled(second), key=jobs.index) == [j for i, j in enumerate(jobs) if i % 5]
    assert all(start == 400 for _, start, _ in second.prefill)  # every prefix computed once
    assert s.queued == 0


def test_the_waiter_keeps_its_room_and_requests_that_wait_on_nothing_stay_fifo() -> None:
    pool = KVPool(num_blocks=41, block_size=4)  # 40 usable blocks
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000)
    a = Job(SHOTS + [1], 1, 1)  # 17 blocks
    waiter = Job(SHOTS + [2, 3, 4, 5, 6], 1, 4)  # 18 blocks now; 2 once a's prefix is in
    small = Job(list(range(5000, 5012)), 1, 1)  # 3 blocks: fits beside the waiter's 18
    big = Job(list(range(6000, 6012)), 1, 1)  # 3 blocks: would fit only in the waiter's room
    tiny = Job([7000, 7001], 1, 1)  # 1 block, behind big: backpressure keeps it there
    s.add(a)
    step = s.schedule()
    s.add(waiter)
    s.add(small)
    s.add(gone := Job(list(range(8000, 8004)), 1, 1))
    s.cancel(gone)  # a cancelled one is skipped as ever
    s.add(big)
    s.add(tiny)
    step = s.schedule()
    assert _prefilled(step) == [a, small] and step.waiting == [waiter]
    assert pool.available == 40 - 17 - 3 == 20  # 18 of them held for the waiter: big (3) does not fit
    assert big.state == tiny.state == "queued" and [j for j in s.queue if not j.cancelled] == [waiter, big, tiny]
    _compute(s, step)
    step = s.schedule()
    assert _prefilled(step) == [waiter, big, tiny]  # the waiter first, in its place; then first come first served
    for job in (a, waiter, small, big, tiny):
        s.finish(job)
    assert pool.held == 0


def test_the_waiters_batch_seats_are_held_for_it() -> None:
    pool = KVPool(num_blocks=400, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=1000)
    a, waiter = Job(SHOTS + [1], 1, 2), Job(SHOTS + [2, 3], 8, 2)
    s.add(a)
    s.add(waiter)
    others = [Job([9000 + i, 1, 2], 1, 2) for i in range(10)]
    for job in others:
        s.add(job)
    step = s.schedule()
    assert step.waiting == [waiter] and _prefilled(step) == [a] + others[:7]  # 1 + 8 held + 7 = 16 seats
    _compute(s, step)
    assert _prefilled(s.schedule()) == [waiter]
    assert s.sequences == 16


def test_a_waiter_waits_on_older_prompts_only_and_gets_the_prefill_budget_in_arrival_order() -> None:
    """An echo request never waits (it needs every position's logits), so it is admitted past the
    waiter; the waiter must not then wait on it: it computes its own prefix, before the younger."""
    pool = KVPool(num_blocks=200, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=64)
    suffix = list(range(2000, 2064))
    a = Job(SHOTS + [1, 2, 3], 1, 2)
    waiter = Job(SHOTS + suffix + [4, 5], 1, 2)
    echo = Job(SHOTS + suffix + [6], 1, 0, echo=True)
    for job in (a, waiter, echo):
        s.add(job)
    step = s.schedule()
    assert step.waiting == [waiter] and echo.state == "prefill" and _prefilled(step) == [a]  # the budget went to a
    s.computed(a, step.prefill[0][2])  # 64 of 67 tokens: the shots are indexed
    step = s.schedule()
    assert waiter.state == "prefill" and waiter.computed == len(SHOTS)  # does not wait on the younger echo
    assert [(job, start, take) for job, start, take in step.prefill] == [(a, 64, 3), (waiter, 64, 61)]
    assert s.running == [a, waiter, echo]


def test_a_waiter_passes_over_no_more_than_the_batch_seats() -> None:
    """Admission's cost stays the requests admitted plus at most ``max_batch`` waiters, however long the queue."""
    pool = KVPool(num_blocks=20_000, block_size=4)
    s = Scheduler(pool, max_batch=16, prefill_tokens=8)
    long = Job(SHOTS * 4, 1, 1)  # 256 tokens at 8 a step: still computing during the whole test
    s.add(long)
    s.schedule()
    for i in range(3000):
        s.add(Job(SHOTS + [i, 1, 2], 1, 1))
    calls = []
    match = pool.match
    pool.match = lambda ids, limit: calls.append(1) or match(ids, limit)
    for _ in range(5):
        step = s.schedule()
        _compute(s, step)
        assert len(step.waiting) == 15
    assert len(calls) <= 5 * 16 and s.queued == 3000


def test_random_mixed_traffic_is_fair_and_leaves_no_block_held() -> None:
    """Many requests over a small pool: some share prefixes, some are echo or cancelled, forks too.
    Each step, a request is admitted while an older one waits only if that older one waits on a
    prefix; a waiter is admitted within a few steps; all are answered and every block comes back."""
    rng = random.Random(0)
    pool = KVPool(num_blocks=120, block_size=4)
    s = Scheduler(pool, max_batch=12, prefill_tokens=48)
    prefixes = [list(range(p * 1000, p * 1000 + rng.choice([8, 40, 72]))) for p in range(25)]
    made = done = 0
    waited: dict[Job, int] = {}
    generated: dict[Job, int] = {}
    for _ in range(3000):
        while made < 400 and s.queued < 20 and rng.random() < 0.6:
            made += 1
            ids = rng.choice(prefixes) + [rng.randrange(1, 900) for _ in range(rng.randrange(1, 30))]
            s.add(Job(ids, rng.choice([1, 1, 2, 3]), rng.choice([0, 1, 5, 12]), echo=rng.random() < 0.1))
        if not s.busy and made == 400:
            break
        queued_before = [j for j in s.queue if not j.cancelled]
        step = s.schedule()
        done += len(step.refused)
        admitted = [j for j in queued_before if j.state == "prefill"]
        for job in admitted:
            older = [j for j in queued_before if j.arrival < job.arrival and j.state == "queued"]
            assert all(j in step.waiting for j in older), "a request was admitted past an older one that waits on nothing"
        for job in step.waiting:
            waited[job] = waited.get(job, 0) + 1
            assert waited[job] <= 8, "a waiter waited too long"
        for job, _, take in step.prefill:
            if s.computed(job, take):
                if job.forks:
                    s.fork(job)
                    generated[job] = 1
                else:
                    s.finish(job)
                    done += 1
        for job in step.decode:
            generated[job] += 1
            if generated[job] >= job.max_new_tokens:
                s.finish(job)
                done += 1
        for job in list(s.running) + list(s.queue):
            if not job.cancelled and rng.random() < 0.01:
                s.cancel(job)
                done += 1
    assert made == 400 and done == 400 and not s.busy
    assert pool.held == 0 and len(waited) > 10  # the prefixes of 40 and 72 tokens were waited on
