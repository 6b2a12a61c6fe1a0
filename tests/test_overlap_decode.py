"""``overlap_decode``: each decode step is enqueued before the previous one's samples are read back.

On the tiny model (CPU, fp32), through the app, the engine with overlap answers every request as the
engine without it (texts, tokens, logprobs to 1e-5, top logprobs), on a trace where the guessed step
ahead is often wrong: greedy and seeded samples, n > 1, stop sequences and EOS hit mid-decode,
``max_new_tokens`` 1 and long, echo, a request whose sampler fails, at concurrency 1 and 30 (a small
pool: lazy preemption). The counters show that steps were overlapped and that wrong guesses were
dropped. The option is refused by the serial engine, naming it.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.app import create_app
from server.batch_engine import BatchEngine
from server.engine import make_engine
from server.loading import load_generator
from server.schemas import ProcessRequest
from tests.test_batch_engine import _send_all
from tests.test_lazy_engine import SHOTS, WINDOW, _identical

FAILS = 666  # the seed whose sampler raises


@pytest.fixture(scope="module")
def generator(make_tiny_checkpoint):
    return load_generator(make_tiny_checkpoint(), device="cpu", max_seq_length=WINDOW)


def _bodies() -> list[dict]:
    lengths = [1, 2, 3, 17, 40, 60]
    bodies = [
        {"prompt": SHOTS + f"Is {n} even or odd?\nAnswer:", "temperature": 0, "max_new_tokens": lengths[n % 6], "top_k_per_token": n % 3}
        for n in range(12)
    ]
    bodies[4]["stop_sequences"] = ["e"]
    bodies[5]["stop_sequences"] = ["\n", "or"]
    bodies[10]["stop_sequences"] = ["a"]
    bodies += [
        {"prompt": SHOTS + "Is 7 even?", "num_return_sequences": 3, "max_new_tokens": 24, "temperature": 0.9, "seed": 3, "top_k_per_token": 2},
        {"prompt": "Is 9 odd?", "num_samples": 2, "max_new_tokens": 30, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 11},
        {"prompt": SHOTS + "Is 8 even?", "num_return_sequences": 2, "max_new_tokens": 45, "temperature": 0},
        {"prompt": SHOTS[:70], "echo_prompt": True, "max_new_tokens": 30, "temperature": 0, "top_k_per_token": 3},
        {"prompt": SHOTS[:50], "echo_prompt": True, "max_new_tokens": 0, "temperature": 0, "top_k_per_token": 1},
        {"prompt": "Is 5 odd?", "max_new_tokens": 50, "temperature": 1.0, "seed": FAILS},
        {"prompt": "Is 6 odd?", "max_new_tokens": 35, "temperature": 1.0, "seed": 21, "stop_sequences": ["s"]},
    ]
    return bodies


def _greedy_ids(generator, body: dict, steps: int) -> list[int]:
    """The greedy continuation by litgpt's full forward (no KV cache)."""
    ids = generator.prompt(ProcessRequest(**body)).ids
    with torch.inference_mode():
        for _ in range(steps):
            ids = ids + [int(generator.model(torch.tensor([ids], device=generator.device))[0, -1].argmax())]
    return ids[-steps:]


def _serve(generator, bodies: list[dict], concurrency: int, **options) -> tuple[list, dict]:
    engine = BatchEngine(generator, **{"max_batch": 16, "prefill_tokens": 64, "kv_block_size": 8, **options})
    try:
        responses = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=concurrency))
        for _ in range(200):
            if engine.idle:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.idle and engine.pool.held == 0, engine.stats
        return responses, dict(engine.stats)
    finally:
        engine.close()


CASES = pytest.mark.parametrize(("concurrency", "kv_tokens"), [(1, 16 * WINDOW), (30, WINDOW)], ids=["c1", "c30-small-pool"])


@CASES
def test_overlapped_decode_answers_as_decode_in_order(generator, monkeypatch, concurrency: int, kv_tokens: int) -> None:
    check_overlap(generator, monkeypatch, concurrency, kv_tokens, _identical)


def check_overlap(generator, monkeypatch, concurrency: int, kv_tokens: int, same) -> None:
    """The trace with and without overlap_decode (answers compared by ``same``), and the counters; also the GPU lane's."""
    import server.batch_engine as batch_engine

    real_pick = batch_engine.pick

    calls: dict[int, int] = {}

    def pick(logits, groups, **options):  # from its 3rd pick (decoding), after the batch's other requests drew their samples
        picked = real_pick(logits, groups, **options)
        for _, req, _ in groups:
            if req.seed == FAILS and calls.setdefault(id(req), 0) >= 2:
                raise RuntimeError("sampler exploded")
            calls[id(req)] = calls.get(id(req), 0) + 1
        return picked

    monkeypatch.setattr(batch_engine, "pick", pick)
    bodies = _bodies()
    monkeypatch.setattr(generator.codec, "eos_id", _greedy_ids(generator, bodies[3], 6)[-1])  # request 3 ends by EOS mid-decode
    options = {"kv_tokens": kv_tokens, "kv_reservation": "lazy"}
    reference, off = _serve(generator, bodies, concurrency, **options)
    responses, on = _serve(generator, bodies, concurrency, overlap_decode=True, **options)
    assert off["overlapped_steps"] == 0 and not off["overlap_decode"] and on["overlap_decode"]
    for i, (a, b) in enumerate(zip(responses, reference)):
        assert a.status_code == b.status_code == (500 if bodies[i].get("seed") == FAILS else 200), (i, a.text, b.text)
        if b.status_code == 200:
            same(a.json(), b.json(), f"request {i}")
    ended_early = [r.json() for r, body in zip(reference, bodies) if r.status_code == 200 and 1 < len(r.json()["tokens"]) < body["max_new_tokens"]]
    assert len(ended_early) >= 3, "the trace must end requests mid-decode (stops, EOS)"
    assert reference[3].json()["tokens"] and len(reference[3].json()["tokens"]) < 6  # EOS
    assert max(len(r.json()["tokens"]) for r in reference if r.status_code == 200) >= 40
    # most steps ran ahead of the previous one's readback; guesses that a request went on were dropped
    assert on["overlapped_steps"] > on["decode_steps"] / 2, on
    assert on["overlap_discarded_rows"] > 0, on
    if concurrency == 1:  # alone, a request that ends mid-decode drops the whole step ahead
        assert on["overlap_discarded_steps"] > 0, on
    else:
        assert on["preempted"] > 0 and on["recomputed_tokens"] > 0, on


def test_overlap_decode_is_refused_by_the_serial_engine(generator) -> None:
    with pytest.raises(ValueError, match=r"overlap_decode: only the batched engine overlaps its decode steps \(--engine serial\)"):
        make_engine(generator, "serial", overlap_decode=True)
    make_engine(generator, "serial", overlap_decode=False).close()
