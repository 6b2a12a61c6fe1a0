"""Continuous batching: many requests share each forward pass; they join and leave between steps.

Three parts with narrow seams (as vLLM v1 splits them):
- ``server.scheduler``: which requests run and how many prompt tokens each computes (blocks from
  ``server.kv_pool``; no tensors);
- ``server.paged_model``: runs a step's prefill segments and decode batch over the paged KV cache;
- ``server.generate``: sampling, logprobs, stop sequences, EOS and echo, the same functions as the
  serial ``Generator``, so a request returns what it would return alone (its samples come from
  its own seeded generator, and its ``n`` sequences stay in the batch together until all are done).

This module is the loop that joins them, on one engine thread that owns the GPU:
1. take the requests the app submitted (tokenized and fitted on a helper thread) and the ones whose
   clients went away (cancelled: their blocks are freed now);
2. run the scheduler's prefill segments, then one decode step;
3. answer what is done.
With ``kv_reservation="lazy"`` the scheduler may preempt a running request when the pool is out of
blocks (``server.scheduler``): its sampling state stays here untouched (tokens, text streams, stop
state, logprobs, its random generator), and when it is readmitted its prompt and each sequence's
generated tokens (``_Live.history``, kept only under lazy: nothing else preempts) are computed again
without sampling, so it decodes on exactly where it stopped; a request preempted before its first
token starts over (its echo scores are dropped and computed again).
A failure fails only the requests it touched (a sampling error its own request; a failed forward
the requests in that forward); the loop goes on.

With ``overlap_decode`` (off by default; vLLM v1's async scheduling) the host's work for decode step N
(reading back the samples, advancing texts and stops, answering, the next schedule, building the next
inputs) runs while the GPU runs step N+1, which is enqueued before step N's samples are read: its
input ids are step N's samples copied on the device (``PagedModel.decode``'s ``on_device``), and only
step N's own readback is waited for (its CUDA event, ``server.generate.Picked``). Step N+1 is a guess
that every sequence of step N goes on; it is checked when its turn comes (``_take_ahead``):
- a request that step N ended (EOS, stop sequence, max tokens, failure) or that was cancelled or
  preempted meanwhile has its rows of step N+1 dropped, unread; the rest of the batch keeps them.
  Requests that step N is certain to end (their last token) are left out of step N+1;
- a request admitted meanwhile joins at the next step (its first decode one step later; nothing it
  returns changes);
- a sampled request draws step N+1 from its own generator after step N, as without overlap; if step
  N+1 is not used for a request that goes on (its sampling failed, or it no longer matches), its
  generator's state is put back to before step N+1's draws;
- step N+1 is enqueued only if every sequence in it already holds the block its position is in (or
  the pool has one free now, taken one step early as ``Scheduler.hold``): so the next schedule grows
  and preempts nothing for it, and otherwise the step runs in order, as without overlap.
Why a dropped row can write nothing anyone reads: it writes K/V only at its own next position, in its
own last block, which holds generated positions and so is never a full prompt block in the prefix
index (only prompts' full blocks are indexed). When its request ends, its blocks go back to the pool on
the host at once, but everything that could write or read a reused block (another request's prefill,
a fork's copy, a later decode) is enqueued after step N+1 on the same stream, so the device runs it
after step N+1 is done with the block; and a freed request is never put in a step enqueued after the
free. On the CPU everything runs in order (events are no-ops), so the same logic is tested there.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.compiled_decode import resolve_compile_decode, trial_compile
from server.engine import Busy, FieldError, RequestFailed, Unavailable, until_done_or_gone
from server.generate import Generator, Picked, Prompt, Sequence, advance, completions, echo_scores, echo_tokens, new_generator, pick
from server.kv_pool import KVPool
from server.paged_model import ATTENTION_TOKENS, PagedModel, Segment, kv_bytes_per_token
from server.scheduler import ECHO_TOKENS, KV_RESERVATIONS, Job, KVReservation, Scheduler
from server.schemas import MAX_SEQUENCES, Completion, ProcessRequest
from server.step_memory import CudaProbe, measure, measured_blocks, worst_steps

CPU_WINDOWS = 2  # on the CPU the pool holds this many full windows (tests and demos), unless --kv_tokens
STALL_S = 120.0  # /health says "stalled" when a step with work to do has taken longer than this


@dataclass(eq=False)
class _Live:
    """A request inside the engine: its scheduler job and its sampling state."""

    req: ProcessRequest
    prompt: Prompt
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    job: Job = field(init=False)
    echo_chosen: list[float] = field(default_factory=list)
    echo_tops: list = field(default_factory=list)
    echo: tuple = ([], "")
    seqs: list[Sequence] = field(default_factory=list)
    generator: torch.Generator | None = None
    next_ids: list[int] = field(default_factory=list)
    history: list[list[int]] | None = None  # per sequence, every id sampled (what a resume recomputes); lazy only
    step: int = 0

    def __post_init__(self) -> None:
        self.job = Job(list(self.prompt.ids), self.req.n, self.req.max_new_tokens, echo=self.req.echo_prompt, payload=self)


@dataclass(eq=False)
class _Launched:
    """A decode step enqueued on the device, its samples not necessarily read back yet."""

    lives: list[_Live]
    rows: dict[_Live, list[int]]  # each request's rows in the batch
    pos: dict[_Live, int]  # the position its rows decode
    tables: dict[_Live, list[list[int]]]  # its job's tables (the same list until it is freed or preempted)
    results: list[tuple[_Live, list[int], Picked]]
    picked: Picked | None  # the whole batch's, when it was sampled in one go (its device ids feed the next step)
    states: dict[_Live, torch.Tensor] = field(default_factory=dict)  # speculative: generator states before its draws


def cpu_pool_blocks(window: int, block_size: int, kv_tokens: int | None) -> int:
    """Blocks in a CPU pool (block 0, the padding block, included): ``kv_tokens``, or ``CPU_WINDOWS`` full windows."""
    return math.ceil((CPU_WINDOWS * window if kv_tokens is None else kv_tokens) / block_size) + 1


class BatchEngine:
    def __init__(
        self,
        generator: Generator,
        max_batch: int = 32,
        prefill_tokens: int = 4096,
        kv_block_size: int = 16,
        kv_tokens: int | None = None,
        max_queue: int = 1024,
        cuda_graphs: bool = True,
        gpu_memory_gib: float | None = None,
        kv_reservation: KVReservation = "lazy",
        compile_decode: bool | None = None,
        attention_tokens: int | None = ATTENTION_TOKENS,
        overlap_decode: bool = False,
    ) -> None:
        """See ``python -m server --help`` for the arguments."""
        if kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation: choose one of {', '.join(KV_RESERVATIONS)}, got {kv_reservation!r}")
        for name, value, low in (
            ("max_batch", max_batch, MAX_SEQUENCES),
            ("prefill_tokens", prefill_tokens, 1),
            ("kv_block_size", kv_block_size, 1),
            ("max_queue", max_queue, 1),
            ("attention_tokens", attention_tokens or 0, 0),
        ):
            if value < low:
                raise ValueError(f"{name}: must be at least {low}, got {value}")
        self.generator = generator
        self.codec = generator.codec
        window = generator.max_seq_length
        if kv_tokens is not None and kv_tokens < window:
            raise ValueError(f"kv_tokens: {kv_tokens} cannot hold one {window}-token sequence (--max_seq_length); ask for at least {window}")
        block_bytes = kv_block_size * kv_bytes_per_token(generator.model)
        trial = functools.partial(trial_compile, generator.model, kv_block_size)  # a build that fails: refused, or eager by default
        compile_decode = resolve_compile_decode(compile_decode, generator.model, trial)  # None: on where it was measured faster

        def runner(blocks: int) -> PagedModel:
            return PagedModel(
                generator.model, blocks, kv_block_size, max_batch, window, cuda_graphs=cuda_graphs, compile_decode=compile_decode,
                attention_tokens=attention_tokens,
            )  # fmt: skip

        if generator.device.type == "cuda":  # what the worst steps leave under the limit (server.step_memory)
            one_window = math.ceil(window / kv_block_size) + 1  # the provisional pool (+ the padding block)
            steps = functools.partial(worst_steps, max_batch=max_batch, prefill_tokens=prefill_tokens, echo_tokens=ECHO_TOKENS)
            measured = measure(CudaProbe(generator.device, gpu_memory_gib), runner, steps, one_window, block_bytes)
            blocks = measured_blocks(measured, kv_block_size, block_bytes, window, kv_tokens)
            self.memory = measured.breakdown(blocks * block_bytes, (blocks - 1) * kv_block_size)
        else:
            blocks = cpu_pool_blocks(window, kv_block_size, kv_tokens)
            self.memory = f"memory: KV pool {(blocks - 1) * kv_block_size:,} tokens, {blocks * block_bytes / 2**30:.2f} GiB (CPU)"
        self.pool = KVPool(blocks, kv_block_size)
        self.model = runner(blocks)
        self.scheduler = Scheduler(self.pool, max_batch, prefill_tokens, ECHO_TOKENS, reservation=kv_reservation)
        self.overlap_decode = overlap_decode
        self._ahead: _Launched | None = None  # the decode step enqueued ahead of its turn (overlap_decode)
        self.keeps_history = kv_reservation == "lazy"  # only a preempted request is resumed, and only lazy preempts
        self.max_batch, self.max_queue = max_batch, max_queue
        self._inbox: deque[_Live] = deque()
        self._cancelled: deque[_Live] = deque()
        self._wake = threading.Condition()
        self._submitted = 0  # requests in the inbox or the scheduler's queue (guarded by _wake)
        self._stop = self._draining = False
        self._closed = False  # _fail_all has emptied the inbox for the last time: nothing joins it after (guarded by _wake)
        self._error: BaseException | None = None  # what killed the engine thread
        self._step_started: float | None = None  # monotonic start of the step in progress
        self.counters = {"requests": 0, "prompt_tokens": 0, "computed_prompt_tokens": 0, "prefill_rounds": 0, "decode_steps": 0,
                      "decoded_tokens": 0, "cancelled": 0, "failed": 0, "max_sequences": 0, "kv_blocks": blocks - 1,
                      "kv_block_size": kv_block_size, "kv_reservation": kv_reservation, "preempted": 0,
                      "recomputed_tokens": 0, "overlap_decode": overlap_decode, "overlapped_steps": 0,
                      "overlap_discarded_steps": 0, "overlap_discarded_rows": 0}  # fmt: skip
        self._tokenizer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def warmup(self, max_length: int | None = None) -> int:
        """Capture the CUDA graphs of every decode batch and length bucket now; returns how many."""
        return self.model.warmup(self.max_batch, max_length or self.generator.max_seq_length)

    # --- the app's side -----------------------------------------------------------------------

    async def process(self, request: ProcessRequest, disconnected: Callable[[], Awaitable] | None = None) -> tuple[list[Completion], int]:
        if (reason := self.health()) is not None:
            raise Unavailable(reason)
        with self._wake:
            if self._submitted >= self.max_queue:
                raise Busy(f"{self._submitted} requests are waiting (--max_queue {self.max_queue}); retry shortly")
            self._submitted += 1
        loop = asyncio.get_running_loop()
        try:
            prompt = await loop.run_in_executor(self._tokenizer, self.generator.prompt, request)  # may raise RequestTooLong
        except BaseException:
            with self._wake:
                self._submitted -= 1
            raise
        if not prompt.ids:  # empty prompt on a model without BOS: nothing to condition on
            with self._wake:
                self._submitted -= 1
            return [Completion(text="", tokens=[], logprob=0.0) for _ in range(request.n)], prompt.dropped
        live = _Live(request, prompt, loop.create_future(), loop)
        if (refusal := self.scheduler.never_fits(live.job)) is not None:
            with self._wake:
                self._submitted -= 1
            raise FieldError("num_return_sequences", f"{request.n} sequences of this request {refusal}; ask for fewer (or fewer max_new_tokens)")
        live.future.add_done_callback(lambda f: f.cancelled() and self._cancel(live))
        with self._wake:
            if self._closed:  # the engine thread stopped while this prompt was tokenized: nobody would answer it
                raise Unavailable(self.health() or "the engine thread stopped")
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(prompt.ids)
            self._inbox.append(live)
            self._wake.notify()
        return await until_done_or_gone(live.future, disconnected)

    def _cancel(self, live: _Live) -> None:
        with self._wake:
            self._cancelled.append(live)
            self._wake.notify()

    def health(self) -> str | None:
        if self._error is not None or not self._thread.is_alive():
            return f"the engine thread stopped: {type(self._error).__name__}: {self._error}" if self._error else "the engine thread stopped"
        if self._stop or self._draining:
            return "the server is shutting down"
        started = self._step_started
        if started is not None and time.monotonic() - started > STALL_S:
            return f"the engine has been in one step for {time.monotonic() - started:.0f} s"
        return None

    def drain(self) -> None:
        self._draining = True

    @property
    def stats(self) -> dict:
        """Counters since start, and what is in flight now (read without stopping the engine)."""
        stats = {**self.counters, "queued": self._submitted, "sequences": self.scheduler.sequences, "kv_blocks_held": self.pool.held}
        if self.generator.device.type == "cuda":  # what the allocator took at most, to compare with --gpu_memory_gib
            stats["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.generator.device) / 2**30, 2)
            stats["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.generator.device) / 2**30, 2)
        return stats

    @property
    def idle(self) -> bool:
        """Nothing queued, running or held: every block is back in the pool."""
        with self._wake:
            return not self._inbox and not self.scheduler.busy and self._submitted == 0 and self.pool.held == 0

    def close(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # --- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._stop or self._inbox or self._cancelled or self.scheduler.busy):
                        self._wake.wait()
                    if self._stop:
                        break
                    new, self._inbox = list(self._inbox), deque()
                    gone, self._cancelled = list(self._cancelled), deque()
                for live in new:  # O(new requests)
                    self.scheduler.add(live.job)
                for live in gone:
                    if live.job.state == "queued" and not live.job.cancelled:
                        with self._wake:
                            self._submitted -= 1
                    self.scheduler.cancel(live.job)
                    self.counters["cancelled"] += 1
                self._step_started = time.monotonic()
                self._step()
                self._step_started = None
        except BaseException as e:  # a bug in the loop itself: say so on /health and fail everyone
            self._error = e
            print(f"engine: stopped by {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self._fail_all(Unavailable("the server is shutting down" if self._error is None else f"the engine stopped: {self._error}"))

    def _step(self) -> None:
        queued_before = self.scheduler.queued
        step = self.scheduler.schedule()
        admitted = queued_before - self.scheduler.queued
        if admitted:
            with self._wake:
                self._submitted -= admitted
        for job, reason in step.refused:
            self._fail([job.payload], RequestFailed(f"num_return_sequences: {job.n} sequences of this request {reason}"), "refused")
        for job in step.preempted:  # its blocks are gone; what it sampled stays in its _Live
            self.counters["preempted"] += 1
            if not job.resumed:  # preempted while its prompt was computed: it starts over
                job.payload.echo_chosen, job.payload.echo_tops = [], []
            elif job.payload.history is None:  # a bug, not a request's fault: resuming would decode on wrong K/V
                raise RuntimeError(
                    f"a request was preempted after its first tokens, but its sampled ids were not kept (keeps_history={self.keeps_history})"
                )
        self.counters["max_sequences"] = max(self.counters["max_sequences"], self.scheduler.sequences)
        if step.prefill or step.recompute:
            self._prefill(step.prefill, step.recompute)
        decoding = [job for job in self.scheduler.running if job.state == "decode"]
        if decoding:
            self._decode([job.payload for job in decoding])
        elif self._ahead is not None:  # nobody it decodes for is decoding now
            self._take_ahead([])

    def _prefill(self, chunks: list[tuple[Job, int, int]], recompute: list[tuple[Job, int, int]] = ()) -> None:
        """Prompt chunks and, for resumed requests, their sequences' generated tokens: one forward."""
        segments = [Segment(job.blocks, start, job.ids[start : start + take], all_logits=job.echo) for job, start, take in chunks]
        for job, start, take in recompute:  # K/V only: these tokens were sampled before the preemption
            at = start - len(job.ids)
            segments += [Segment(table, start, ids[at : at + take]) for table, ids in zip(job.tables, job.payload.history)]
        try:
            outputs = self.model.prefill(segments)
        except Exception as e:  # a failed forward fails the requests in it, not the server
            self._fail([job.payload for job, _, _ in [*chunks, *recompute]], e, "prefill")
            return
        self.counters["prefill_rounds"] += 1
        self.counters["computed_prompt_tokens"] += sum(take for _, _, take in chunks)
        self.counters["recomputed_tokens"] += sum(take * job.n for job, _, take in recompute)
        done = []
        for (job, start, take), logits in zip(chunks, outputs):
            live = job.payload
            try:
                if job.echo:  # row i predicts prompt token start + i + 1
                    chosen, tops = echo_scores(logits, job.ids[start + 1 : start + take + 1], live.req.top_k_per_token)
                    live.echo_chosen += chosen
                    live.echo_tops += tops
                if self.scheduler.computed(job, take):
                    if job.resumed:  # its first tokens were sampled before: recompute the generated ones next
                        for src, dst in self.scheduler.fork(job):
                            self.model.copy_block(src, dst)
                    else:
                        done.append((live, logits[-1:]))
            except Exception as e:
                self._fail([live], e, "prefill")
        for job, _, take in recompute:
            self.scheduler.recomputed(job, take)
        if done:
            self._first_tokens(done)

    def _first_tokens(self, done: list[tuple[_Live, torch.Tensor]]) -> None:
        """Prompts just computed: echo, then the first generated token of each sequence."""
        sampling = []
        for live, last in done:
            try:
                live.seqs = [Sequence(stream=self.codec.stream(live.prompt.ids)) for _ in range(live.req.n)]
                if live.req.echo_prompt:
                    k = live.req.top_k_per_token
                    live.echo = echo_tokens(self.codec, live.prompt.ids, live.prompt.skip, live.echo_chosen, live.echo_tops, k)
                    live.echo_chosen, live.echo_tops = [], []
                if live.req.max_new_tokens > 0:
                    live.generator = new_generator(live.req, self.generator.device)
                    sampling.append((live, last))
                else:
                    self._finish(live)
            except Exception as e:
                self._fail([live], e, "output")
        if not sampling:
            return
        logits = torch.cat([last.expand(live.req.n, -1) for live, last in sampling])
        lives = [live for live, _ in sampling]
        for live, rows, picked in self._pick(logits, lives, [live.req.n for live in lives])[0]:
            try:
                self._advance(live, picked, rows)
                if all(s.done for s in live.seqs) or not live.job.forks:
                    self._finish(live)
                else:
                    for src, dst in self.scheduler.fork(live.job):
                        self.model.copy_block(src, dst)
            except Exception as e:
                self._fail([live], e, "output")

    def _pick(self, logits: torch.Tensor, lives: list[_Live], counts: list[int]) -> tuple[list[tuple[_Live, list[int], Picked]], Picked | None]:
        """Sample every request's rows: (live, its rows, Picked) each, and the batch's Picked when it was sampled
        in one go. A request whose sampling fails fails alone: on an error the batch is sampled again one
        request at a time, each from its generator's state before the batch's draws (as if the batch had not drawn)."""
        groups = self._groups(lives, counts)
        states = {live: live.generator.get_state() for live in lives if live.generator is not None}
        try:
            picked = pick(logits, groups, defer=self.overlap_decode)
        except Exception:
            self._restore(states)
            results = []
            for live, group in zip(lives, groups):
                try:
                    alone = pick(logits[group[0]], [(slice(0, group[0].stop - group[0].start), live.req, live.generator)])
                    alone.ids  # noqa: B018 (read back now: a failure here is this request's)
                except Exception as e:
                    self._fail([live], e, "sampling")
                    continue
                results.append((live, list(range(group[0].stop - group[0].start)), alone))
            return results, None
        return [(live, list(range(group[0].start, group[0].stop)), picked) for live, group in zip(lives, groups)], picked

    @staticmethod
    def _groups(lives: list[_Live], counts: list[int]) -> list[tuple[slice, ProcessRequest, torch.Generator | None]]:
        groups, start = [], 0
        for live, n in zip(lives, counts):
            groups.append((slice(start, start + n), live.req, live.generator))
            start += n
        return groups

    def _advance(self, live: _Live, picked, rows: list[int]) -> None:
        for seq, r in zip(live.seqs, rows):
            advance(seq, picked.ids[r], picked.logprobs[r], picked.top[r], live.req, live.step, self.codec.eos_id)
        live.next_ids = [picked.ids[r] for r in rows]
        if not self.keeps_history:
            return
        if live.history is None:
            live.history = [[] for _ in rows]
        for history, tid in zip(live.history, live.next_ids):
            history.append(tid)

    def _decode(self, lives: list[_Live]) -> None:
        """One decode step of ``lives``; with ``overlap_decode``, the next one is enqueued before this one's samples are read."""
        current, waiting = self._take_ahead(lives), []
        if current is None:
            current = self._launch(lives, {live: live.job.pos for live in lives})
            if current is None:
                return
        else:  # admitted since the step ahead was enqueued: they decode with the next one
            waiting = [live for live in lives if live not in current.rows]
        if self.overlap_decode:
            self._ahead = self._speculate(current, waiting)
        self._consume(current)
        if self._ahead is not None and all(live.job.state == "done" for live in self._ahead.lives):
            self._take_ahead([])  # every request in it ended: drop it now

    def _launch(
        self, lives: list[_Live], positions: dict[_Live, int], on_device: tuple[torch.Tensor, list[int]] | None = None, speculative: bool = False
    ) -> _Launched | None:
        """Enqueue the decode step of ``lives`` at ``positions`` and its sampling; None if it failed (a step in order
        fails its requests; a speculative one is dropped, and runs again in order)."""
        tokens, pos, tables, rows = [], [], [], {}
        for live in lives:
            rows[live] = list(range(len(tokens), len(tokens) + live.req.n))
            for table, tid in zip(live.job.tables, live.next_ids):  # placeholders where on_device has the ids
                tokens.append(tid)
                pos.append(positions[live])
                tables.append(table)
        states = {live: live.generator.get_state() for live in lives if live.generator is not None} if speculative else {}
        try:
            logits = self.model.decode(tokens, pos, tables, on_device)
        except Exception as e:  # a failed forward fails the requests in it, not the server
            if not speculative:
                self._fail(lives, e, "decode")
            return None
        if speculative:
            try:
                picked = pick(logits, self._groups(lives, [live.req.n for live in lives]), defer=True)
            except Exception:  # sampled again in order, where a failure is answered
                self._restore(states)
                return None
            results = [(live, rows[live], picked) for live in lives]
        else:
            results, picked = self._pick(logits, lives, [live.req.n for live in lives])
        return _Launched(lives, rows, dict(positions), {live: live.job.tables for live in lives}, results, picked, states)

    def _speculate(self, current: _Launched, waiting: list[_Live]) -> _Launched | None:
        """Enqueue the step after ``current`` (see the module docstring), or None where it would not be exact."""
        if current.picked is None:  # sampled one request at a time: the batch's ids are not in one tensor
            return None
        going = [live for live in current.lives if live.job.state == "decode" and live.step + 2 < live.req.max_new_tokens]
        positions = {live: live.job.pos + 1 for live in going} | {live: live.job.pos for live in waiting}
        if not positions:
            return None
        for live, p in positions.items():
            if p >= self.model.max_len or not self.scheduler.hold(live.job, p):
                return None
        src = [r for live in going for r in current.rows[live]]
        return self._launch([*going, *waiting], positions, (current.picked.device_ids, src), speculative=True)

    def _take_ahead(self, lives: list[_Live]) -> _Launched | None:
        """The step enqueued ahead, for those of ``lives`` it still holds exactly (same position, same blocks); the
        rows of everyone else are dropped unread. None when nothing of it is used."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        ready = {live for live in lives if live in ahead.rows and live.job.state == "decode" and live.job.pos == ahead.pos[live]
                 and live.job.tables is ahead.tables[live]}  # fmt: skip
        dropped = [live for live in ahead.lives if live not in ready]
        self.counters["overlap_discarded_rows"] += sum(live.req.n for live in dropped)
        self._restore({live: ahead.states[live] for live in dropped if live in ahead.states and live.job.state != "done"})
        if not ready:
            self.counters["overlap_discarded_steps"] += 1
            return None
        self.counters["overlapped_steps"] += 1
        ahead.lives = [live for live in ahead.lives if live in ready]
        ahead.results = [result for result in ahead.results if result[0] in ready]
        return ahead

    @staticmethod
    def _restore(states: dict[_Live, torch.Tensor]) -> None:
        """Undo draws that were made ahead for requests that go on: they are drawn again in order."""
        for live, state in states.items():
            live.generator.set_state(state)

    def _consume(self, step: _Launched) -> None:
        """Read a decode step's samples back and advance its requests (answering those that are done)."""
        self.counters["decode_steps"] += 1
        self.counters["decoded_tokens"] += sum(len(step.rows[live]) for live in step.lives)
        for live, rows, picked in step.results:
            try:
                live.step += 1
                live.job.pos += 1
                self._advance(live, picked, rows)
                if all(s.done for s in live.seqs):
                    self._finish(live)
            except Exception as e:
                self._fail([live], e, "output")

    def _finish(self, live: _Live) -> None:
        self.scheduler.finish(live.job)
        result = (completions(live.seqs, live.echo), live.prompt.dropped)
        live.loop.call_soon_threadsafe(_resolve, live.future, result, None)

    def _fail(self, lives: list[_Live], error: Exception, where: str) -> None:
        """Answer ``lives`` with ``error`` and free what they hold; the rest of the batch goes on."""
        if not isinstance(error, (RequestFailed, Unavailable)):
            print(f"engine: {where} failed for {len(lives)} request(s): {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            error = RequestFailed(f"{where} failed: {type(error).__name__}: {error}")
        for live in lives:
            self.counters["failed"] += 1
            self.scheduler.finish(live.job)
            live.loop.call_soon_threadsafe(_resolve, live.future, None, error)

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            self._closed = True
            lives = list(self._inbox)
            self._inbox.clear()
            self._submitted = 0
        lives += [job.payload for job in self.scheduler.running] + [job.payload for job in self.scheduler.queue if not job.cancelled]
        for live in lives:
            try:
                self.scheduler.finish(live.job)
            except Exception:  # the loop died mid-update: answering matters more than the pool now
                pass
            live.loop.call_soon_threadsafe(_resolve, live.future, None, error)
        self.scheduler.queue.clear()
        self.scheduler.queued = 0


def _resolve(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():  # cancelled by a client that went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
