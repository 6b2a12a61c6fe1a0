"""Which requests run, and how many prompt tokens each computes this step (no tensors, no model).

A ``Job`` is one request as the scheduler sees it: prompt ids, how many sequences, how many new
tokens at most. Each step:

1. admission, first come first served: the oldest queued request starts when its blocks fit the
   pool and its sequences fit the batch; otherwise it waits (backpressure) and so does everything
   behind it. What it reserves depends on ``reservation``:
   - ``up_front`` (this class's default; the server's is lazy): every block it can ever write (prompt plus ``max_new_tokens`` for
     each sequence), so a running request never runs out of cache. On a small pool this admits few
     requests: most of what they reserve is for tokens not generated yet (or never: stops and EOS).
   - ``lazy`` (as vLLM does; the server's default, measured faster on a capped GPU): the prompt's blocks (and the copies its fork makes, and the block of
     the first decoded token), with ``WATERMARK`` of the pool left over; a decoding sequence gets a
     block each time it crosses a block boundary. When the pool cannot give a running request its
     next block, the youngest running request (the latest arrived) is preempted: its blocks are
     freed and it goes back to the head of the queue. When it is admitted again its prompt (cached
     full blocks are taken from the index) and then each sequence's tokens generated so far are
     recomputed (``Step.recompute``), and it decodes on from where it stopped: for greedy decoding
     its output is what it would have been. The oldest running request is never preempted, and a
     request alone always fits (``never_fits`` is the up-front count), so every request finishes.
   Its prompt's first full blocks come from the shared-prefix index when some earlier prompt computed
   them (by reference: nothing is copied). A request that shares a longer prefix with an older
   prompt being computed right now waits a round for it rather than computing the same prefix
   twice; as vLLM v1 does with its ``skipped_waiting_requests``, the requests behind it are not held
   up by that wait: they are admitted past it, and it keeps its place at the head of the queue.
   Its blocks and batch seats stay reserved while it waits, so it starts as soon as the prefix is
   in (never later because younger requests took its room), and it waits only on older prompts,
   so a stream of younger ones cannot keep it waiting. Admission's cost is the requests admitted
   plus the waiters passed over (at most ``max_batch`` of them), not the queue's length.
2. prefill: the prompts not fully computed (and the generated tokens of resumed requests) share
   ``prefill_tokens`` (a longer prompt continues next step: chunked prefill); computed full blocks go
   into the index at once.
3. decode: every request whose prompt is done generates one token per sequence.

When a prompt is done its ``n`` sequences fork: they share the prompt's full blocks, and each but
the first gets its own copy of a partly filled last block (the engine copies it). A cancelled or
failed request frees its blocks at the next step. The ``n`` sequences of a request are admitted,
grown and preempted together.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, get_args

from server.kv_pool import KVPool

KVReservation = Literal["up_front", "lazy"]
KV_RESERVATIONS: tuple[str, ...] = get_args(KVReservation)
WATERMARK = 0.01  # lazy admission leaves this share of the pool's blocks free for running requests to grow into

WAIT_FOR_SHARED = 32  # wait a round when a prompt being computed shares this many more tokens
ECHO_TOKENS = 512  # prompt positions a prefill step returns logits for (echo requests), by default


@dataclass(eq=False)
class Job:
    ids: list[int]
    n: int
    max_new_tokens: int
    echo: bool = False  # logits for every prompt position: no prefix is taken from the index
    payload: object = None  # the engine's own state for this request
    blocks: list[int] = field(default_factory=list)  # the prompt's block table
    spare: list[int] = field(default_factory=list)  # blocks for generation (and copies), handed out at fork
    tables: list[list[int]] = field(default_factory=list)  # one block table per sequence, after fork
    computed: int = 0  # prompt tokens whose K/V is in the cache
    pos: int = 0  # position the next decode step writes
    state: str = "queued"  # queued -> prefill -> (recompute, once resumed) -> decode -> done
    cancelled: bool = False
    arrival: int = 0  # the order the scheduler received it in (running jobs are kept in this order)
    resumed: bool = False  # preempted after its first tokens were sampled: they are not sampled again
    tail: int = 0  # generated tokens per sequence whose K/V a resumed job recomputes (positions len(ids)...)
    recomputed: int = 0  # of them, computed again so far
    preemptions: int = 0

    @property
    def stored(self) -> int:
        """Positions with K/V per sequence at the end: the last sampled token is never fed back."""
        return len(self.ids) + max(self.max_new_tokens - 1, 0)

    @property
    def forks(self) -> bool:
        return self.max_new_tokens > 1


@dataclass
class Step:
    prefill: list[tuple[Job, int, int]] = field(default_factory=list)  # (job, start, tokens)
    decode: list[Job] = field(default_factory=list)
    refused: list[tuple[Job, str]] = field(default_factory=list)  # can never fit this pool
    waiting: list[Job] = field(default_factory=list)  # passed over: an older prompt is computing their prefix
    recompute: list[tuple[Job, int, int]] = field(default_factory=list)  # (job, start, tokens) for each of its sequences
    preempted: list[Job] = field(default_factory=list)  # freed and back in the queue (lazy reservation)


def common_prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        max_batch: int,
        prefill_tokens: int,
        echo_tokens: int = ECHO_TOKENS,
        reservation: KVReservation = "up_front",
        watermark: float = WATERMARK,
    ) -> None:
        """``max_batch``: sequences in flight at most; ``echo_tokens``: prompt positions a prefill step
        returns logits for (echo requests), which bounds that step's logits memory; ``reservation``:
        what admission reserves (see the module's docstring); ``watermark``: the share of the pool a
        lazy admission leaves free."""
        if reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation: choose one of {', '.join(KV_RESERVATIONS)}, got {reservation!r}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark: a share of the pool in [0, 1), got {watermark}")
        self.pool, self.max_batch, self.prefill_tokens, self.echo_tokens = pool, max_batch, prefill_tokens, echo_tokens
        self.lazy = reservation == "lazy"
        self.watermark = math.ceil(watermark * (pool.num_blocks - 1)) if self.lazy else 0
        self.preemptions = 0
        self.queue: deque[Job] = deque()
        self.queued = 0  # jobs in the queue that are not cancelled
        self.running: list[Job] = []  # admitted, in arrival order: prefilling or decoding
        self.sequences = 0  # sequences of the running jobs
        self._arrivals = 0

    # --- bookkeeping --------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        self._arrivals += 1
        job.arrival = self._arrivals
        self.queue.append(job)
        self.queued += 1

    def cancel(self, job: Job) -> None:
        """Free ``job``'s blocks now (a queued job is skipped when it reaches the head)."""
        if job.cancelled or job.state == "done":
            return
        job.cancelled = True
        if job.state == "queued":
            self.queued -= 1
        else:
            self.finish(job)

    def finish(self, job: Job) -> None:
        """``job`` is done (answered, cancelled or failed): its blocks go back to the pool."""
        if job.state == "done":
            return
        if job.state in ("prefill", "recompute", "decode"):
            self.running.remove(job)
            self.sequences -= job.n
        self._free(job)
        job.state = "done"

    def _free(self, job: Job) -> None:
        if job.tables:
            for table in job.tables:
                self.pool.free(table)
        else:
            self.pool.free(job.blocks + job.spare)
        job.blocks, job.spare, job.tables = [], [], []

    def preempt(self, job: Job, step: Step) -> None:
        """Free running ``job``'s blocks and queue it again in arrival order (ahead of every younger job):
        readmitted, it computes its prompt and its generated tokens again and goes on."""
        if job.state == "decode":
            job.tail, job.resumed = job.pos - len(job.ids), True
        if job.resumed:
            job.echo = False  # its echo was scored before it decoded: the recompute needs no logits
        self.running.remove(job)
        self.sequences -= job.n
        self._free(job)
        job.computed = job.recomputed = job.pos = 0
        job.state = "queued"
        job.preemptions += 1
        self.preemptions += 1
        i = 0
        while i < len(self.queue) and self.queue[i].arrival < job.arrival:  # only waiters and cancelled jobs are older
            i += 1
        self.queue.insert(i, job)
        self.queued += 1
        step.preempted.append(job)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.queued)

    # --- one step -----------------------------------------------------------------------------

    def schedule(self) -> Step:
        step = Step()
        if self.lazy:
            self._grow(step)
        if not step.preempted:  # as vLLM: a step that had to preempt admits nothing
            self._admit(step)
        budget, echo_budget = self.prefill_tokens, self.echo_tokens
        for job in self.running:
            if budget <= 0:
                break
            if job.state == "recompute":  # every sequence the same count; a budget below n still moves one token
                take = min(job.tail - job.recomputed, budget // job.n or int(budget == self.prefill_tokens))
                if take > 0:
                    step.recompute.append((job, len(job.ids) + job.recomputed, take))
                    budget -= take * job.n
                continue
            if job.state != "prefill":
                continue
            take = min(len(job.ids) - job.computed, budget)
            if job.echo:
                take = min(take, echo_budget)
                if take <= 0:
                    continue
                echo_budget -= take
            step.prefill.append((job, job.computed, take))
            budget -= take
        step.decode = [job for job in self.running if job.state == "decode"]
        return step

    def _grow(self, step: Step) -> None:
        """Give every decoding sequence the block its next token is written to, oldest request first;
        when the pool is out of blocks, preempt the youngest running request (possibly this one)."""
        pool = self.pool
        for job in list(self.running):
            if job.state != "decode":  # not decoding, or preempted by an older one just now
                continue
            if self._missing(job, job.pos) <= 0:
                continue
            while pool.available < job.n and self.running[-1] is not job:
                self.preempt(self.running[-1], step)
            if pool.available < job.n:  # it is the youngest: it gives way
                self.preempt(job, step)
                continue
            self._extend(job, 1)

    def _covered(self, job: Job, up_front: bool) -> int:
        """Positions each sequence's blocks cover when its prompt forks."""
        if up_front:
            return job.stored
        return len(job.ids) + job.tail + 1  # the generated tokens to recompute and the next one decoded (<= stored)

    def _blocks_needed(self, job: Job, shared: int, up_front: bool | None = None) -> tuple[int, int]:
        """(prompt blocks to allocate, blocks for generation and copies) given ``shared`` indexed blocks."""
        pool = self.pool
        prompt = pool.blocks_for(len(job.ids))
        generation = pool.blocks_for(self._covered(job, not self.lazy if up_front is None else up_front)) - prompt
        partial = int(len(job.ids) % pool.block_size != 0)
        spare = generation + (job.n - 1) * (partial + generation) if job.forks else 0
        return prompt - shared, spare

    def never_fits(self, job: Job) -> str | None:
        """Why even an empty pool could not hold ``job`` (or None); it depends on sizes only (the
        up-front count under either reservation: a request alone must be able to finish)."""
        own, spare = self._blocks_needed(job, 0, up_front=True)
        if own + spare > self.pool.num_blocks - 1:
            return f"need {own + spare} KV blocks of {self.pool.block_size} tokens, the pool has {self.pool.num_blocks - 1}"
        return None

    def _admit(self, step: Step) -> None:
        pool, bs = self.pool, self.pool.block_size
        waiting = step.waiting  # passed over (a prefix in flight): back at the head of the queue, in order
        reserved_blocks = reserved_seqs = 0  # what the passed-over requests will need
        try:
            while self.queue:
                job = self.queue[0]
                if job.cancelled:
                    self.queue.popleft()
                    continue
                if (self.running or waiting) and self.sequences + reserved_seqs + job.n > self.max_batch:
                    return
                if (refusal := self.never_fits(job)) is not None:
                    self.queue.popleft()
                    self.queued -= 1
                    job.state = "done"
                    step.refused.append((job, refusal))
                    continue
                limit = (len(job.ids) - 1) // bs  # the last prompt token is always computed
                shared = [] if job.echo else pool.match(job.ids, limit)
                own, spare = self._blocks_needed(job, len(shared))
                held_by_nobody = sum(1 for b in shared if pool.refs(b) == 0)  # taking these uses up available blocks
                need = own + spare + held_by_nobody
                margin = self.watermark if self.running or waiting else 0  # alone, a request may take the whole pool
                if need + margin > pool.available - reserved_blocks:
                    return
                self.queue.popleft()
                if not job.echo and self._waits_for_prefix(job, len(shared) * bs):
                    waiting.append(job)
                    reserved_blocks += need  # an upper bound: a longer shared prefix only lowers it
                    reserved_seqs += job.n
                    continue
                self.queued -= 1
                pool.share(shared)
                job.blocks = shared + pool.allocate(own)
                job.spare = pool.allocate(spare)
                job.computed = len(shared) * bs
                job.state = "prefill"
                bisect.insort(self.running, job, key=lambda j: j.arrival)
                self.sequences += job.n
        finally:
            self.queue.extendleft(reversed(waiting))

    def _waits_for_prefix(self, job: Job, cached: int) -> bool:
        """Whether an older prompt being computed holds ``WAIT_FOR_SHARED`` or more tokens of ``job``'s
        prompt (in whole blocks) beyond the ``cached`` ones the index gave it."""
        bs, limit = self.pool.block_size, len(job.ids) - 1
        return any(
            min(common_prefix(other.ids, job.ids), limit) // bs * bs - cached >= WAIT_FOR_SHARED
            for other in self.running
            if other.state == "prefill" and other.arrival < job.arrival
        )

    # --- after the model ran ------------------------------------------------------------------

    def computed(self, job: Job, tokens: int) -> bool:
        """``job``'s next ``tokens`` prompt tokens were computed; True when its prompt is done."""
        job.computed += tokens
        self.pool.register(job.ids, job.blocks, job.computed)
        return job.computed == len(job.ids)

    def fork(self, job: Job) -> list[tuple[int, int]]:
        """Start decoding ``job`` (or, resumed, recomputing its generated tokens): one block table per
        sequence; returns the (src, dst) block copies to make."""
        pool, bs = self.pool, self.pool.block_size
        generation = pool.blocks_for(self._covered(job, not self.lazy)) - len(job.blocks)
        full = len(job.ids) // bs
        spare, copies = iter(job.spare), []
        job.tables = [job.blocks + [next(spare) for _ in range(generation)]]
        for _ in range(job.n - 1):
            shared = job.blocks[:full]
            pool.share(shared)
            own = []
            if full < len(job.blocks):  # a partly filled last prompt block: copied on write
                own.append(next(spare))
                copies.append((job.blocks[full], own[0]))
            job.tables.append(shared + own + [next(spare) for _ in range(generation)])
        job.spare = []
        job.pos = len(job.ids)
        job.state = "recompute" if job.tail else "decode"
        return copies

    def hold(self, job: Job, pos: int) -> bool:
        """Whether each of decoding ``job``'s sequences holds the block of position ``pos``, taking it now if
        the pool has it free (lazy; never by preempting). The engine's ``--overlap_decode`` asks this for
        the step after next: the block the next schedule's ``_grow`` would hand out, one step early."""
        need = self._missing(job, pos)
        if need <= 0:
            return True
        if not self.lazy or self.pool.available < need * job.n:
            return False
        self._extend(job, need)
        return True

    def _missing(self, job: Job, pos: int) -> int:
        """Blocks each of ``job``'s sequences lacks to write position ``pos`` (its n tables are always equally long)."""
        return self.pool.blocks_for(pos + 1) - len(job.tables[0])

    def _extend(self, job: Job, blocks: int) -> None:
        """``blocks`` more blocks at the end of each of ``job``'s tables (the caller checked the pool has them)."""
        for table in job.tables:
            table.extend(self.pool.allocate(blocks))

    def recomputed(self, job: Job, tokens: int) -> bool:
        """Each of resumed ``job``'s sequences had ``tokens`` more generated tokens computed again; True
        when all are (it decodes on from the position it was preempted at)."""
        job.recomputed += tokens
        if job.recomputed < job.tail:
            return False
        job.pos = len(job.ids) + job.tail
        job.state = "decode"
        return True
