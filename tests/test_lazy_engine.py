"""The batched engine with ``kv_reservation="lazy"`` on a pool too small to reserve ``max_new_tokens`` up front.

On the tiny model (CPU, fp32), through the app: requests are admitted by their prompts' blocks, grow
as they decode, and the youngest is preempted when the pool runs out; a preempted request keeps its
tokens, text streams, stop state and logprobs, its prompt and generated tokens are recomputed, and
every answer equals the one from an unconstrained pool (greedy, seeded samples, n > 1, echo with
generation, stop sequences). A bad ``kv_reservation`` is refused naming the option and its values,
by the engine and by ``python -m server``.
"""

from __future__ import annotations

import asyncio

import pytest

from server.app import create_app
from server.batch_engine import BatchEngine
from server.loading import load_generator
from tests.test_batch_engine import _send_all

WINDOW = 160
SHOTS = "".join(f"Is {n} even or odd?\nAnswer: {'odd' if n % 2 else 'even'}\n\n" for n in range(11, 20, 3))  # 40 tokens


@pytest.fixture(scope="module")
def generator(make_tiny_checkpoint):
    return load_generator(make_tiny_checkpoint(), device="cpu", max_seq_length=WINDOW)


def _bodies() -> list[dict]:
    bodies = [
        {"prompt": SHOTS + f"Is {n} even or odd?\nAnswer:", "temperature": 0, "max_new_tokens": 30 + 7 * (n % 5), "top_k_per_token": 2}
        for n in range(14)
    ]
    bodies[3]["stop_sequences"] = ["e"]
    bodies[5]["stop_sequences"] = ["\n", "or"]
    bodies += [
        {"prompt": SHOTS + "Is 7 even?", "num_return_sequences": 3, "max_new_tokens": 24, "temperature": 0.9, "seed": 3, "top_k_per_token": 1},
        {"prompt": SHOTS + "Is 8 even?", "num_return_sequences": 2, "max_new_tokens": 45, "temperature": 0},
        {"prompt": SHOTS + SHOTS[:70], "echo_prompt": True, "max_new_tokens": 30, "temperature": 0, "top_k_per_token": 3},
    ]
    return bodies


def _serve(generator, bodies: list[dict], **options) -> tuple[list[dict], dict]:
    engine = BatchEngine(generator, **{"max_batch": 16, "prefill_tokens": 64, "kv_block_size": 8, **options})
    try:
        responses = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=len(bodies)))
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses if r.status_code != 200]
        deadline = 0
        while not engine.idle and deadline < 200:
            asyncio.run(asyncio.sleep(0.05))
            deadline += 1
        assert engine.idle and engine.pool.held == 0
        return [r.json() for r in responses], dict(engine.stats)
    finally:
        engine.close()


def _identical(a: dict, b: dict, where: str) -> None:
    assert a["text"] == b["text"] and a["truncated_prompt_tokens"] == b["truncated_prompt_tokens"], where
    for ca, cb in zip(a["completions"], b["completions"], strict=True):
        assert [t["text"] for t in ca["tokens"]] == [t["text"] for t in cb["tokens"]], where
        assert [t["logprob"] for t in ca["tokens"]] == pytest.approx([t["logprob"] for t in cb["tokens"]], abs=1e-5), where
        assert [t["top_logprob"].keys() for t in ca["tokens"]] == [t["top_logprob"].keys() for t in cb["tokens"]], where


def test_a_small_pool_serves_everything_lazily_with_preemption_and_the_same_answers(generator) -> None:
    bodies = _bodies()
    reference, _ = _serve(generator, bodies, kv_tokens=16 * WINDOW, kv_reservation="up_front")  # every request fits up front at once
    up_front, up_front_stats = _serve(generator, bodies, kv_tokens=WINDOW, kv_reservation="up_front")  # 20 blocks: about 2 requests at a time
    lazy, stats = _serve(generator, bodies, kv_tokens=WINDOW, kv_reservation="lazy")
    assert stats["preempted"] > 0 and stats["recomputed_tokens"] > 0, stats
    assert stats["max_sequences"] > up_front_stats["max_sequences"], (stats, up_front_stats)
    assert up_front_stats["preempted"] == 0
    for i, (ref, a, b) in enumerate(zip(reference, up_front, lazy)):
        _identical(a, ref, f"up_front {i}")
        _identical(b, ref, f"lazy {i}")


def test_preempted_while_computing_its_prompt_or_its_generated_tokens(generator, monkeypatch) -> None:
    """Two long generations, then a long echo prompt computed 4 tokens a step: the echo request is
    preempted before its first token (it starts over: its echo scores are computed again, not
    twice), and a resumed request is preempted again while its generated tokens are recomputed."""
    import server.scheduler as scheduler

    preempted, real = [], scheduler.Scheduler.preempt
    monkeypatch.setattr(scheduler.Scheduler, "preempt", lambda self, job, step: preempted.append((job.echo, job.state)) or real(self, job, step))
    early = [{"prompt": SHOTS + f"Is {n} even or odd?\nAnswer:", "temperature": 0, "max_new_tokens": 100, "top_k_per_token": 1} for n in range(2)]
    echo = {"prompt": SHOTS + SHOTS[:80], "echo_prompt": True, "max_new_tokens": 3, "temperature": 0, "top_k_per_token": 2}
    reference, _ = _serve(generator, [*early, echo], kv_tokens=16 * WINDOW, kv_reservation="up_front")
    preempted.clear()
    engine = BatchEngine(generator, max_batch=16, prefill_tokens=4, kv_block_size=8, kv_tokens=200, kv_reservation="lazy")

    async def main():
        app = create_app(engine, generator.codec)
        first = asyncio.ensure_future(_send_all(app, early, concurrency=2))
        while engine.stats["requests"] < 2:  # the echo request arrives last: it is the youngest
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(_send_all(app, [echo], concurrency=1))
        return [*(await first), *(await second)]

    try:
        responses = asyncio.run(main())
    finally:
        engine.close()
    assert (True, "prefill") in preempted and (False, "recompute") in preempted, preempted
    for i, (r, ref) in enumerate(zip(responses, reference)):
        assert r.status_code == 200
        _identical(r.json(), ref, f"request {i}")


def test_a_bad_kv_reservation_is_refused_naming_it(generator, capsys) -> None:
    with pytest.raises(ValueError, match="kv_reservation: choose one of up_front, lazy, got 'eager'"):
        BatchEngine(generator, kv_reservation="eager")
    from core.cli import run_cli
    from server.__main__ import serve

    with pytest.raises(SystemExit) as exit_:
        run_cli(serve, args=["--kv_reservation", "eager"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --kv_reservation: 'eager' is not one of up_front, lazy"


def test_up_front_keeps_no_history_and_answers_as_lazy_does(generator, monkeypatch) -> None:
    """Only a resume reads ``_Live.history``, and only lazy preempts: under up_front no sampled id is kept per decode
    step, and every answer equals lazy's (which keeps them all, and resumes from them); a resume without them stops
    the engine saying why, not decoding on wrong K/V."""
    kept, finish = {}, BatchEngine._finish

    def spy(self, live):
        kept.setdefault(self.counters["kv_reservation"], []).append((live.history, live.step, live.req.n))
        return finish(self, live)

    monkeypatch.setattr(BatchEngine, "_finish", spy)
    bodies = _bodies()
    up_front, _ = _serve(generator, bodies, kv_tokens=16 * WINDOW, kv_reservation="up_front")
    lazy, stats = _serve(generator, bodies, kv_tokens=WINDOW, kv_reservation="lazy")
    assert stats["preempted"] > 0 and stats["recomputed_tokens"] > 0, stats
    assert [history for history, _, _ in kept["up_front"]] == [None] * len(bodies)
    assert len(kept["lazy"]) == len(bodies)
    for history, step, n in kept["lazy"]:  # every id sampled, per sequence (done sequences are decoded on with the rest)
        assert len(history) == n and all(len(ids) == step + 1 for ids in history)
    for i, (a, b) in enumerate(zip(up_front, lazy)):
        _identical(a, b, f"request {i}")

    engine = BatchEngine(generator, max_batch=16, prefill_tokens=64, kv_block_size=8, kv_tokens=WINDOW, kv_reservation="up_front")
    engine.scheduler.lazy = True  # a scheduler that preempts behind an engine that keeps no history
    try:
        responses = asyncio.run(_send_all(create_app(engine, generator.codec), bodies, concurrency=len(bodies)))
    finally:
        engine.close()
    assert isinstance(engine._error, RuntimeError) and "its sampled ids were not kept" in str(engine._error)
    assert any(r.status_code != 200 for r in responses)
