"""The batched engine's KV bookkeeping against an oracle model: logits are a function of the exact context read.

``FakePaged`` stands in for ``PagedModel``: a slot of the pool holds the token written there, and the logits
of a position are a fixed random function of the tokens its block table reads at positions 0..p. So any
read that sees another sequence's token, a stale slot of a reused block, a wrong copy-on-write or a
wrong position changes the answer. ``FakeGPT`` is the same function behind litgpt's serial interface (the
serial engine's reference). Under a small pool (lazy preemption, with and without overlap_decode, and
up_front waiting), chunked prefill, shared prefixes, n > 1 forks, echo, stops, greedy and seeded sampling,
every batched answer equals the serial one exactly and no block stays held.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest
import torch

import server.batch_engine as batch_engine
from server.app import create_app
from server.batch_engine import BatchEngine
from server.engine import SerialEngine
from server.generate import Generator
from server.loading import load_generator
from tests.test_batch_engine import _send_all

WINDOW = 128
SHOTS = "".join(f"Is {n} even or odd?\nAnswer: {'odd' if n % 2 else 'even'}\n\n" for n in range(11, 60, 3))
_logits: dict[tuple, torch.Tensor] = {}


def oracle(context: list, vocab: int) -> torch.Tensor:
    """Logits for the next token after ``context``: random, fixed per context."""
    key = tuple(context)
    if key not in _logits:
        _logits[key] = torch.randn(vocab, generator=torch.Generator().manual_seed(hash(key) & 0x7FFFFFFF)) * 4
    return _logits[key]


class FakeGPT(torch.nn.Module):
    """The oracle behind the calls ``Generator.run`` makes (set_kv_cache, forward at input_pos, clear_kv_cache)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(vocab, 2)})
        self.config, self.vocab, self.rows = SimpleNamespace(block_size=2048), vocab, None

    def set_kv_cache(self, batch_size: int, **_) -> None:
        self.rows = [[] for _ in range(batch_size)]

    def clear_kv_cache(self) -> None:
        self.rows = None

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, input_pos_maxp1: int | None = None) -> torch.Tensor:
        out = []
        for row, ids in zip(self.rows, idx.tolist()):
            logits = []
            for pos, tid in zip(input_pos.tolist(), ids):
                assert pos == len(row)
                row.append(tid)
                logits.append(oracle(row, self.vocab))
            out.append(torch.stack(logits))
        return torch.stack(out)


class FakePaged:
    """``PagedModel``'s interface over a pool of token slots; logits from what each block table reads."""

    def __init__(self, model: FakeGPT, num_blocks: int, block_size: int, max_batch: int, max_len: int, **_) -> None:
        self.vocab, self.num_blocks, self.block_size, self.max_batch, self.max_len = model.vocab, num_blocks, block_size, max_batch, max_len
        self.slots = [None] * (num_blocks * block_size)

    def _slot(self, table: list[int], pos: int) -> int:
        block = table[pos // self.block_size]
        assert 0 < block < self.num_blocks  # block 0 is padding
        return block * self.block_size + pos % self.block_size

    def _logits(self, table: list[int], pos: int) -> torch.Tensor:
        return oracle([self.slots[self._slot(table, p)] for p in range(pos + 1)], self.vocab)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs]

    def prefill(self, segments) -> list[torch.Tensor]:
        for s in segments:  # every write before any read, as the model's layers do
            assert s.ids and s.start + len(s.ids) <= self.max_len
            for i, tid in enumerate(s.ids):
                self.slots[self._slot(s.table, s.start + i)] = tid
        ends = [s.start + len(s.ids) for s in segments]
        return [
            torch.stack([self._logits(s.table, p) for p in (range(s.start, end) if s.all_logits else [end - 1])]) for s, end in zip(segments, ends)
        ]

    def decode(self, tokens: list[int], positions: list[int], tables: list[list[int]], on_device=None) -> torch.Tensor:
        assert 0 < len(tokens) <= self.max_batch and max(positions) < self.max_len
        tokens = list(tokens)
        if on_device is not None:  # the previous step's samples, as the device would read them
            ids, src = on_device
            tokens[: len(src)] = [int(ids[r]) for r in src]
        for tid, pos, table in zip(tokens, positions, tables):
            self.slots[self._slot(table, pos)] = tid
        return torch.stack([self._logits(table, pos) for pos, table in zip(positions, tables)])

    def warmup(self, *_, **__) -> int:
        return 0


def _bodies(count: int) -> list[dict]:
    rng = random.Random(0)
    bodies = []
    for i in range(count):
        body = {
            "prompt": SHOTS[: rng.randrange(0, 300)] + f"Is {i} odd?",
            "max_new_tokens": rng.choice([1, 2, 5, 13, 30]),
            "top_k_per_token": rng.randrange(3),
        }
        if rng.random() < 0.3:
            body["num_return_sequences"] = rng.choice([2, 3])
        if rng.random() < 0.2:
            body |= {"echo_prompt": True, "max_new_tokens": rng.choice([0, 4])}
        body |= {"temperature": 0.8, "seed": i} if rng.random() < 0.4 else {"temperature": 0}
        if rng.random() < 0.2:
            body["stop_sequences"] = [rng.choice(["e", "\n", "a"])]
        bodies.append(body)
    return bodies


@pytest.fixture(scope="module")
def codec(make_tiny_checkpoint):
    return load_generator(make_tiny_checkpoint(), device="cpu").codec


@pytest.mark.parametrize(
    "options",
    [dict(kv_reservation="lazy"), dict(kv_reservation="lazy", overlap_decode=True), dict(kv_reservation="up_front")],
    ids=["lazy", "lazy-overlap", "up_front"],
)
def test_every_batched_answer_reads_exactly_its_own_context(codec, monkeypatch, options: dict) -> None:
    monkeypatch.setattr(batch_engine, "PagedModel", FakePaged)
    monkeypatch.setattr(batch_engine, "kv_bytes_per_token", lambda model: 1)
    generator = Generator(FakeGPT(codec.vocab_size).eval(), codec, max_seq_length=WINDOW)
    bodies = _bodies(60)
    serial = asyncio.run(_send_all(create_app(SerialEngine(generator), codec), bodies, concurrency=1))
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=24, kv_block_size=4, kv_tokens=2 * WINDOW, **options)
    try:
        batched = asyncio.run(_send_all(create_app(engine, codec), bodies, concurrency=30))
        stats = dict(engine.stats)
    finally:
        engine.close()
    for i, (a, b) in enumerate(zip(batched, serial, strict=True)):
        assert a.status_code == b.status_code == 200, (i, a.text)
        assert a.json()["completions"] == b.json()["completions"], (i, bodies[i])
    assert stats["kv_blocks_held"] == 0 and stats["computed_prompt_tokens"] < stats["prompt_tokens"], stats
    assert (stats["preempted"] > 0) == (options["kv_reservation"] == "lazy"), stats
