"""Continuous batching: many requests share each forward pass; they join and leave between steps.

One engine thread owns the GPU and loops:
1. admit: take requests the app submitted (already tokenized and fitted on a helper thread);
2. prefill round: pack the new tokens of waiting prompts into one forward, up to
   ``prefill_tokens`` (a longer prompt continues next round: chunked prefill). Each prompt first
   copies the longest prefix some prompt row already holds (``PromptRows``), so a run spec's
   shared few-shot examples are computed once. A prompt that shares more with a prompt being
   computed right now waits one round for it rather than recomputing the same prefix;
3. decode step: one token for every generating sequence (rows 0..B-1 of the cache).

Sampling, logprobs, stop sequences, EOS and echo use the same functions as the serial
``Generator`` (``server.generate``), so a request returns what it would return alone: a
request's samples come from its own seeded generator, and its ``n`` sequences stay in the batch
together until all are done (the serial loop's order of random draws).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from server.batched_model import BatchedModel, Segment
from server.generate import (
    Generator,
    Prompt,
    Sequence,
    advance,
    completions,
    echo_tokens,
    new_generator,
    pick,
)
from server.prompt_rows import PromptRows, common_prefix
from server.schemas import MAX_SEQUENCES, Completion, ProcessRequest

MIN_SHARED = 16  # fewer shared tokens than this are recomputed rather than copied
WAIT_FOR_SHARED = 32  # wait a round when a prompt being computed shares this many more tokens


@dataclass
class _Live:
    """A request inside the engine."""

    req: ProcessRequest
    prompt: Prompt
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    ids: np.ndarray = field(init=False)
    row: int | None = None  # prompt row while its prompt is computed (and until decode rows free up)
    cached: int = 0  # prompt tokens whose K/V the prompt row holds
    echo_logits: list[torch.Tensor] = field(default_factory=list)
    echo: tuple = ([], "")
    seqs: list[Sequence] = field(default_factory=list)
    generator: torch.Generator | None = None
    rows: list[int] = field(default_factory=list)  # decode rows, one per sequence
    next_ids: list[int] = field(default_factory=list)
    step: int = 0
    pos: int = 0

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.prompt.ids, dtype=np.int64)

    @property
    def n(self) -> int:
        return self.req.n


class BatchEngine:
    def __init__(
        self,
        generator: Generator,
        decode_rows: int = 32,
        prompt_rows: int = 32,
        prefill_tokens: int = 4096,
        cuda_graphs: bool = True,
        kv_memory_fraction: float = 0.9,
    ) -> None:
        self.generator = generator
        self.codec = generator.codec
        decode_rows, prompt_rows = self._fit_rows(generator, decode_rows, prompt_rows, kv_memory_fraction)
        self.model = BatchedModel(generator.model, decode_rows + prompt_rows, decode_rows, cuda_graphs=cuda_graphs)
        self.decode_rows = decode_rows
        self.prompts = PromptRows(range(decode_rows, decode_rows + prompt_rows))
        self.prefill_tokens = prefill_tokens
        self._inbox: deque[_Live] = deque()
        self._wake = threading.Condition()
        self._pending: list[_Live] = []  # prompts not fully computed
        self._waiting: deque[_Live] = deque()  # prompt done, waiting for decode rows
        self._decoding: list[_Live] = []
        self._stop = False
        self.stats = {"requests": 0, "prompt_tokens": 0, "computed_prompt_tokens": 0, "prefill_rounds": 0, "decode_steps": 0, "decoded_tokens": 0}
        self._tokenizer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @staticmethod
    def _fit_rows(generator: Generator, decode_rows: int, prompt_rows: int, fraction: float) -> tuple[int, int]:
        """Shrink the prompt rows, then the decode rows, to what free GPU memory holds."""
        decode_rows = max(decode_rows, MAX_SEQUENCES)  # one request may ask for that many sequences
        prompt_rows = max(prompt_rows, 1)
        device = generator.device
        if device.type != "cuda":  # CPU serving is for tests and demos: keep the cache small
            return decode_rows, min(prompt_rows, 8)
        free = torch.cuda.mem_get_info(device)[0] * fraction
        row = BatchedModel.row_bytes(generator.model)
        fits = int(free // row)
        if fits < MAX_SEQUENCES + 1:
            raise ValueError(
                f"the KV cache needs {MAX_SEQUENCES + 1} rows of {row / 2**20:.0f} MiB but only {fits} fit in free GPU "
                f"memory; serve a quantized model (--quantize bnb.nf4) or a smaller one"
            )
        prompt_rows = min(prompt_rows, max(1, fits - decode_rows))
        decode_rows = min(decode_rows, fits - prompt_rows)
        return decode_rows, prompt_rows

    def warmup(self, max_length: int = 2048) -> int:
        """Capture the CUDA graphs of every decode batch and length bucket up to ``max_length`` (HELM's
        window) now; longer ones are captured when first needed. Returns how many."""
        return self.model.warmup(self.decode_rows, max_length)

    # --- the app's side -----------------------------------------------------------------------

    async def process(self, request: ProcessRequest) -> tuple[list[Completion], int]:
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self._tokenizer, self.generator.prompt, request)  # may raise RequestTooLong
        if not prompt.ids:  # empty prompt on a model without BOS: nothing to condition on
            return [Completion(text="", tokens=[], logprob=0.0) for _ in range(request.n)], prompt.dropped
        live = _Live(request, prompt, loop.create_future(), loop)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt.ids)
        with self._wake:
            self._inbox.append(live)
            self._wake.notify()
        return await live.future

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()
        self._tokenizer.shutdown(wait=True)

    # --- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._inbox and not (self._pending or self._waiting or self._decoding):
                    self._wake.wait()
                if self._stop:
                    break
                self._pending.extend(self._inbox)
                self._inbox.clear()
            try:
                self._start_decoding()
                if self._pending:
                    self._prefill_round()
                    self._start_decoding()
                if self._decoding:
                    self._decode_step()
            except Exception as e:  # a failed forward fails the requests in flight, not the server
                print(f"engine: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _prefill_round(self) -> None:
        budget = self.prefill_tokens
        chosen: list[tuple[_Live, int]] = []
        for live in list(self._pending):
            if budget <= 0:
                break
            if live.future.cancelled():  # the client went away
                self._pending.remove(live)
                self._release_prompt_row(live)
                continue
            if live.row is None and not self._assign_row(live, chosen):
                continue
            take = min(len(live.ids) - live.cached, budget)
            chosen.append((live, take))
            budget -= take
        if not chosen:
            return
        self.stats["prefill_rounds"] += 1
        self.stats["computed_prompt_tokens"] += sum(take for _, take in chosen)
        segments = [
            Segment(live.row, live.cached, live.prompt.ids[live.cached : live.cached + take], all_logits=live.req.echo_prompt)
            for live, take in chosen
        ]
        done: list[tuple[_Live, torch.Tensor]] = []
        for (live, take), logits in zip(chosen, self.model.prefill(segments)):
            live.cached += take
            self.prompts.set_tokens(live.row, live.ids[: live.cached])
            if live.req.echo_prompt:
                live.echo_logits.append(logits)
            if live.cached == len(live.ids):
                self._pending.remove(live)
                done.append((live, logits[-1:]))
        if done:
            self._first_tokens(done)

    def _assign_row(self, live: _Live, chosen: list[tuple[_Live, int]]) -> bool:
        """Give ``live`` a prompt row, starting from the longest cached prefix; False to wait."""
        limit = len(live.ids) - 1  # the last prompt token is always computed: it gives the first logits
        source, shared = (None, 0) if live.req.echo_prompt else self.prompts.best_match(live.ids, limit)
        if not live.req.echo_prompt:
            in_flight = [other for other, _ in chosen] + [p for p in self._pending if p.row is not None]
            if any(min(common_prefix(o.ids, live.ids), limit) >= shared + WAIT_FOR_SHARED for o in in_flight if o is not live):
                return False
        row = self.prompts.free_row(prefer=source if shared >= MIN_SHARED else None)
        if row is None:
            return False
        if shared < MIN_SHARED:
            shared = 0
        elif row != source:
            self.model.copy_rows(source, row, shared)
        self.prompts.claim(row, live, live.ids[:shared])
        live.row, live.cached = row, shared
        return True

    def _first_tokens(self, done: list[tuple[_Live, torch.Tensor]]) -> None:
        """Prompts just computed: echo, then the first generated token of each sequence."""
        sampling = []
        for live, _ in done:
            live.seqs = [Sequence(stream=self.codec.stream(live.prompt.ids)) for _ in range(live.n)]
            if live.req.echo_prompt:
                live.echo = echo_tokens(self.codec, live.prompt.ids, live.prompt.skip, torch.cat(live.echo_logits), live.req.top_k_per_token)
                live.echo_logits = []
            if live.req.max_new_tokens > 0:
                sampling.append(live)
            else:
                self._finish(live)
        if not sampling:
            return
        last = {id(live): logits for live, logits in done}
        logits = torch.cat([last[id(live)].expand(live.n, -1) for live in sampling])
        groups, start = [], 0
        for live in sampling:
            live.generator = new_generator(live.req, self.generator.device)
            groups.append((slice(start, start + live.n), live.req, live.generator))
            start += live.n
        picked = pick(logits, groups)
        start = 0
        for live in sampling:
            self._advance(live, picked, list(range(start, start + live.n)))
            start += live.n
            if all(s.done for s in live.seqs):
                self._finish(live)
            else:
                live.pos = len(live.ids)
                self._waiting.append(live)

    def _advance(self, live: _Live, picked, rows: list[int]) -> None:
        for seq, r in zip(live.seqs, rows):
            advance(seq, picked.ids[r], picked.logprobs[r], picked.top[r], live.req, live.step, self.codec.eos_id)
        live.next_ids = [picked.ids[r] for r in rows]

    def _start_decoding(self) -> None:
        """Move computed prompts into the dense decode rows while there is room, oldest first."""
        used = sum(live.n for live in self._decoding)
        while self._waiting and used + self._waiting[0].n <= self.decode_rows:
            live = self._waiting.popleft()
            if live.future.cancelled():
                self._release_prompt_row(live)
                continue
            live.rows = list(range(used, used + live.n))
            for r in live.rows:
                self.model.copy_rows(live.row, r, len(live.ids))
            self._release_prompt_row(live)
            self._decoding.append(live)
            used += live.n

    def _decode_step(self) -> None:
        used = sum(live.n for live in self._decoding)
        tokens, positions, groups = [0] * used, [0] * used, []
        for live in self._decoding:  # logits row r is cache row r
            for r, tid in zip(live.rows, live.next_ids):
                tokens[r], positions[r] = tid, live.pos
            groups.append((live.rows, live.req, live.generator))
        logits = self.model.decode(tokens, positions)
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += used
        picked = pick(logits, groups)
        finished = []
        for live in self._decoding:
            live.step += 1
            live.pos += 1
            self._advance(live, picked, live.rows)
            if all(s.done for s in live.seqs) or live.future.cancelled():
                finished.append(live)
        if finished:
            for live in finished:
                self._decoding.remove(live)
                self._finish(live)
            self._compact()

    def _compact(self) -> None:
        """Keep decoding rows dense (0..B-1): move the sequences above B into the holes below it."""
        used = sum(live.n for live in self._decoding)
        taken = {r for live in self._decoding for r in live.rows if r < used}
        holes = iter(sorted(set(range(used)) - taken))
        for live in self._decoding:
            for i, r in enumerate(live.rows):
                if r >= used:
                    hole = next(holes)
                    self.model.copy_rows(r, hole, live.pos)
                    live.rows[i] = hole

    def _release_prompt_row(self, live: _Live) -> None:
        if live.row is not None:
            if live.cached < len(live.ids) and live.cached > 0:
                self.prompts.set_tokens(live.row, live.ids[: live.cached])
            self.prompts.release(live.row)
            live.row = None

    def _finish(self, live: _Live) -> None:
        self._release_prompt_row(live)
        result = (completions(live.seqs, live.echo), live.prompt.dropped)
        live.loop.call_soon_threadsafe(_resolve, live.future, result, None)

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            lives = self._pending + list(self._waiting) + self._decoding + list(self._inbox)
            self._inbox.clear()
        self._pending, self._waiting, self._decoding = [], deque(), []
        for live in lives:
            if live.row is not None:
                self.prompts.forget(live.row)
                live.row = None
            live.loop.call_soon_threadsafe(_resolve, live.future, None, error)


def _resolve(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():  # cancelled by a client that went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
