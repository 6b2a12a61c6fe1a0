"""No request, client or failure wedges the batched engine, and the cache is always given back.

On the tiny model (CPU, fp32), through the real app:
- a ``top_p`` below float32's range samples the top token (it used to kill the engine thread);
- a failing sampler or forward fails only the requests it touched (500 naming the stage), and the
  engine goes on; a full pool makes requests wait and then answers all of them as the serial engine does;
- 1,000 mixed requests (echo, several sequences, stops, sampling failures, clients that leave) leave
  no block held;
- past ``max_queue`` requests get 503 with Retry-After, and the server recovers;
- /health is 503 with the reason once the engine thread is gone, or while one step makes no progress;
- lone surrogates get 422 naming the field;
- over real HTTP (uvicorn), 500 requests inside the engine whose clients hang up are all cancelled
  and leave no block held, and SIGTERM ends the server within ``--drain_s`` with long generations
  and the old wedge (tiny ``top_p``) in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.batch_engine import BatchEngine
from server.loading import load_generator
from server.schemas import ProcessRequest

SHOTS = "".join(f"Is {n} even or odd?\nAnswer: {'odd' if n % 2 else 'even'}\n\n" for n in range(11, 60, 3))


@pytest.fixture(scope="module")
def generator(make_tiny_checkpoint):
    return load_generator(make_tiny_checkpoint(), device="cpu")


@pytest.fixture
def engine(generator, request):
    engines = []

    def make(generator=generator, **options):
        options = {"max_batch": 16, "prefill_tokens": 256, "kv_block_size": 8, "kv_tokens": 4096, **options}
        engines.append(BatchEngine(generator, **options))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def _client(app, timeout: float = 60.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=timeout)


async def _post_all(app, bodies: list[dict], timeout: float = 60.0) -> list[httpx.Response]:
    async with _client(app, timeout) as client:
        return await asyncio.gather(*(client.post("/process", json=b) for b in bodies))


def _wait_idle(engine: BatchEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not engine.idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.idle, engine.stats
    assert engine.pool.held == 0 and engine.pool.available == engine.pool.num_blocks - 1


def test_tiny_top_p_samples_the_top_token_and_the_engine_goes_on(generator, engine) -> None:
    e = engine()
    app = create_app(e, generator.codec)
    bodies = [{"prompt": f"hello {i}", "temperature": 1.0, "top_p": 1e-60, "max_new_tokens": 3} for i in range(20)]
    responses = asyncio.run(_post_all(app, bodies))
    assert [r.status_code for r in responses] == [200] * 20
    greedy = generator.run(ProcessRequest(prompt="hello 3", temperature=0, max_new_tokens=3))[0][0]
    assert responses[3].json()["text"] == greedy.text  # only the top token is left to sample
    normal = asyncio.run(_post_all(app, [{"prompt": "Is 4 even or odd?\nAnswer:", "max_new_tokens": 3}], timeout=5.0))
    assert normal[0].status_code == 200
    _wait_idle(e)


def test_a_failing_sampler_fails_only_its_request(generator, engine, monkeypatch) -> None:
    import server.batch_engine as batch_engine

    real_pick = batch_engine.pick

    def pick(logits, groups, **options):
        if any(req.seed == 666 for _, req, _ in groups):
            raise RuntimeError("sampler exploded")
        return real_pick(logits, groups, **options)

    monkeypatch.setattr(batch_engine, "pick", pick)
    e = engine()
    bodies = [{"prompt": SHOTS + f"Is {n} even or odd?\nAnswer:", "temperature": 0, "max_new_tokens": 4} for n in range(8)]
    bodies.insert(3, {"prompt": "doomed", "temperature": 0.7, "seed": 666, "max_new_tokens": 5})
    responses = asyncio.run(_post_all(create_app(e, generator.codec), bodies))
    assert responses[3].status_code == 500 and "sampler exploded" in responses[3].json()["detail"]
    for body, r in zip(bodies[:3] + bodies[4:], responses[:3] + responses[4:]):
        assert r.status_code == 200
        assert r.json()["text"] == generator.run(ProcessRequest(**body))[0][0].text
    _wait_idle(e)


def test_a_failing_forward_fails_the_requests_in_it_and_the_engine_goes_on(generator, engine) -> None:
    e = engine()
    real_prefill, calls = e.model.prefill, []

    def prefill(segments):
        calls.append(len(segments))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real_prefill(segments)

    e.model.prefill = prefill
    app = create_app(e, generator.codec)
    first = asyncio.run(_post_all(app, [{"prompt": "Is 5 even or odd?\nAnswer:", "max_new_tokens": 3}]))
    assert first[0].status_code == 500 and "prefill failed" in first[0].json()["detail"]
    later = asyncio.run(_post_all(app, [{"prompt": "Is 6 even or odd?\nAnswer:", "max_new_tokens": 3, "temperature": 0}]))
    assert later[0].status_code == 200
    _wait_idle(e)


def test_a_full_pool_makes_requests_wait_then_answers_all(generator, engine) -> None:
    e = engine(kv_tokens=generator.max_seq_length, kv_block_size=16)  # one window: a few prompts at a time
    bodies = [{"prompt": SHOTS * 2 + f"Is {n} even or odd?\nAnswer:", "temperature": 0, "max_new_tokens": 8 + n % 5} for n in range(24)]
    responses = asyncio.run(_post_all(create_app(e, generator.codec), bodies))
    for body, r in zip(bodies, responses):
        assert r.status_code == 200
        assert r.json()["text"] == generator.run(ProcessRequest(**body))[0][0].text
    assert e.stats["max_sequences"] < len(bodies)  # they did not all fit at once
    _wait_idle(e)


def test_a_request_no_pool_could_hold_is_a_422_naming_the_field(generator, engine) -> None:
    e = engine(kv_tokens=generator.max_seq_length, kv_block_size=16)
    body = {"prompt": "Is 4 even or odd?", "num_return_sequences": 16, "max_new_tokens": 1000, "temperature": 1.0}
    r = asyncio.run(_post_all(create_app(e, generator.codec), [body]))[0]
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "num_return_sequences"]
    _wait_idle(e)


@pytest.mark.slow(reason="the acceptance count: 1,000 requests through the app")
@pytest.mark.parametrize(("reservation", "overlap"), [("up_front", False), ("lazy", False), ("lazy", True)], ids=["up_front", "lazy", "lazy-overlap"])
def test_a_thousand_mixed_requests_leave_no_block_held(generator, engine, monkeypatch, make_tiny_checkpoint, reservation: str, overlap: bool) -> None:
    import server.batch_engine as batch_engine

    real_pick = batch_engine.pick

    def pick(logits, groups, **options):
        if any(req.seed == 666 for _, req, _ in groups):
            raise RuntimeError("sampler exploded")
        return real_pick(logits, groups, **options)

    monkeypatch.setattr(batch_engine, "pick", pick)
    if reservation == "up_front":
        e = engine(kv_tokens=generator.max_seq_length + 512)
    else:  # a 256-token window (prompts are left-truncated) and a pool of two, which the sequences outgrow
        generator = load_generator(make_tiny_checkpoint(), device="cpu", max_seq_length=256)
        e = engine(generator=generator, kv_tokens=512, kv_reservation="lazy", overlap_decode=overlap)
    rng = random.Random(0)
    kinds = ["greedy", "sampled", "echo", "stop", "fail", "leave"]

    def body(i: int, kind: str) -> dict:
        prompt = SHOTS[: rng.randrange(0, len(SHOTS))] + f"Is {i} even or odd?\nAnswer:"
        if kind == "echo":
            return {"prompt": prompt, "echo_prompt": True, "max_new_tokens": rng.randrange(0, 3), "top_k_per_token": 2}
        if kind == "sampled":
            return {"prompt": prompt, "num_return_sequences": rng.randrange(1, 4), "max_new_tokens": 3, "temperature": 0.9, "seed": 1000 + i}
        if kind == "stop":
            return {"prompt": prompt, "max_new_tokens": 4, "temperature": 0, "stop_sequences": ["\n", "e"]}
        if kind == "fail":
            return {"prompt": prompt, "max_new_tokens": 3, "temperature": 0.5, "seed": 666, "num_return_sequences": 2}
        greedy = 2 if reservation == "up_front" else 24  # lazy: long enough to outgrow the pool
        return {"prompt": prompt, "max_new_tokens": greedy if kind == "greedy" else 40, "temperature": 0}

    async def main() -> list:
        sem = asyncio.Semaphore(48)
        async with _client(create_app(e, generator.codec)) as client:

            async def send(i: int):
                kind = rng.choice(kinds)
                async with sem:
                    request = asyncio.ensure_future(client.post("/process", json=body(i, kind)))
                    if kind == "leave":  # the client goes away before its answer
                        await asyncio.sleep(rng.uniform(0, 0.02))
                        request.cancel()
                        return kind, None
                    return kind, (await request).status_code

            return await asyncio.gather(*(send(i) for i in range(1000)))

    results = asyncio.run(main())
    statuses = {kind: {s for k, s in results if k == kind} for kind in kinds}
    assert statuses["fail"] == {500}
    assert all(statuses[k] == {200} for k in ("greedy", "sampled", "echo", "stop")), statuses
    _wait_idle(e)
    assert e.stats["cancelled"] > 0 and e.stats["failed"] > 0
    assert (e.stats["preempted"] > 0) == (reservation == "lazy"), e.stats
    if overlap:  # steps ran ahead, and those of requests that ended or left were dropped
        assert e.stats["overlapped_steps"] > 0 and e.stats["overlap_discarded_rows"] > 0, e.stats


def test_a_full_queue_answers_503_with_retry_after_then_recovers(generator, engine) -> None:
    e = engine(max_queue=2)
    app = create_app(e, generator.codec)
    bodies = [{"prompt": f"Is {n} even or odd?\nAnswer:", "max_new_tokens": 20, "temperature": 0} for n in range(30)]
    responses = asyncio.run(_post_all(app, bodies))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["Retry-After"].isdigit() for r in busy)
    assert {r.status_code for r in responses} == {200, 503}
    assert asyncio.run(_post_all(app, bodies[:1]))[0].status_code == 200
    _wait_idle(e)


def test_health_is_503_with_the_reason_once_the_engine_thread_is_gone(generator, engine) -> None:
    e = engine()

    def broken():
        raise RuntimeError("scheduler bug")

    e.scheduler.schedule = broken
    app = create_app(e, generator.codec)

    async def main():
        async with _client(app) as client:
            assert (await client.get("/health")).status_code == 200
            answer = await client.post("/process", json={"prompt": "hi", "max_new_tokens": 2})
            return answer, await client.get("/health")

    answer, health = asyncio.run(main())
    assert answer.status_code == 503
    assert health.status_code == 503 and "scheduler bug" in health.json()["reason"]


def test_a_request_tokenized_while_the_engine_thread_dies_gets_503_not_a_wait_forever(generator, engine, monkeypatch) -> None:
    """A request past the health check whose prompt is still being tokenized when the engine thread stops is
    answered 503: it used to join the inbox after the thread's last look at it, and nobody ever answered it."""
    e = engine()

    def broken():
        raise RuntimeError("scheduler bug")

    e.scheduler.schedule = broken
    real, late_started = generator.prompt, threading.Event()

    def prompt(req: ProcessRequest):
        if req.prompt == "late":
            late_started.set()
            e._thread.join(30)  # tokenized until the engine thread is gone
        else:
            late_started.wait(30)  # the late request is past the health check before the first reaches the engine
        return real(req)

    monkeypatch.setattr(generator, "prompt", prompt)

    async def main():
        async with _client(create_app(e, generator.codec)) as client:
            posts = [client.post("/process", json={"prompt": p, "max_new_tokens": 2}) for p in ("first", "late")]
            return await asyncio.wait_for(asyncio.gather(*posts), timeout=10)

    first, late = asyncio.run(main())
    assert first.status_code == 503 and "scheduler bug" in first.json()["detail"]
    assert late.status_code == 503 and "scheduler bug" in late.json()["detail"], late.text


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/process", {"prompt": "a\ud800b"}, ["body", "prompt"]),
        ("/process", {"prompt": "ok", "stop_sequences": ["\n", "\udfff"]}, ["body", "stop_sequences", 1]),
        ("/tokenize", {"text": "\ud83d"}, ["body", "text"]),
    ],
)
def test_lone_surrogates_get_422_naming_the_field(generator, engine, path, body, loc) -> None:
    async def main():  # JSON escapes the surrogate ("\\ud800"), as a client's encoder would
        async with _client(create_app(engine(), generator.codec)) as client:
            return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    r = asyncio.run(main())
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert [d["loc"] for d in detail] == [loc] and "surrogate" in detail[0]["msg"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server(generator, engine):
    """Factory: the app over a new engine, served by uvicorn on a free port in a thread; yields (engine, url)."""
    servers = []

    def start(**options):
        e = engine(**options)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(e, generator.codec), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        while not server.started:
            time.sleep(0.05)
        return e, f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("overlap", [False, True], ids=["in-order", "overlap"])
def test_500_requests_abandoned_by_their_clients_leave_nothing_held(http_server, overlap: bool) -> None:
    """500 long generations are all inside the engine (a few running, the rest queued) when their clients hang up."""
    e, url = http_server(max_queue=10_000, overlap_decode=overlap)
    body = {"prompt": SHOTS + "Is 7 even or odd?\nAnswer:", "max_new_tokens": 1500, "temperature": 1.0}

    async def abandon(n: int) -> int:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            posts = [asyncio.ensure_future(client.post("/process", json={**body, "seed": i})) for i in range(n)]
            deadline = time.monotonic() + 120
            while e.counters["requests"] < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert e.counters["requests"] == n and e.stats["sequences"] > 0 and e.stats["queued"] > 0, e.stats
            for p in posts:  # the clients go away: their connections close
                p.cancel()
            results = await asyncio.gather(*posts, return_exceptions=True)
            return sum(isinstance(r, httpx.Response) for r in results)

    answered = asyncio.run(abandon(500))
    _until(lambda: e.idle)
    stats = httpx.get(url + "/health").json()["engine"]
    assert stats["kv_blocks_held"] == 0 and stats["queued"] == 0 and stats["sequences"] == 0, stats
    assert e.idle and e.pool.available == e.pool.num_blocks - 1
    assert stats["cancelled"] == 500 - answered, (answered, stats)  # every one the engine did not finish was cancelled
    assert stats["decoded_tokens"] < 500 * 1500 // 10  # they were stopped, not run to the end
    assert (stats["overlapped_steps"] > 0 and stats["overlap_discarded_rows"] > 0) == overlap, stats  # cancelled while a step ran ahead
    ok = httpx.post(url + "/process", json={"prompt": "Is 4 even or odd?\nAnswer:", "max_new_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def test_health_is_503_while_a_step_makes_no_progress_then_ready_again(generator, http_server, monkeypatch) -> None:
    import server.batch_engine as batch_engine

    monkeypatch.setattr(batch_engine, "STALL_S", 0.5)
    e, url = http_server()
    release, real_prefill = threading.Event(), e.model.prefill

    def stuck(segments):  # a forward that hangs, as a wedged kernel would
        release.wait(60)
        return real_prefill(segments)

    e.model.prefill = stuck
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(httpx.post(url + "/process", json={"prompt": "hi", "max_new_tokens": 2}, timeout=60)))
    thread.start()
    _until(lambda: httpx.get(url + "/health").status_code == 503)
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and "in one step for" in health.json()["reason"]
    refused = httpx.post(url + "/process", json={"prompt": "also", "max_new_tokens": 2}, timeout=30)
    assert refused.status_code == 503 and "in one step for" in refused.json()["detail"]
    release.set()
    thread.join(60)
    assert answer[0].status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    _wait_idle(e)


@pytest.mark.slow(reason="starts a real server process: SIGTERM is only real there")
def test_sigterm_ends_the_server_within_drain_s(make_tiny_checkpoint, tmp_path) -> None:
    port, drain_s = _free_port(), 4.0
    command = [sys.executable, "-m", "server", "--checkpoint_dir", str(make_tiny_checkpoint()), "--port", str(port), "--device", "cpu",
               "--drain_s", str(drain_s)]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        def flood() -> None:  # long generations and the old wedge, in flight at SIGTERM
            bodies = [{"prompt": SHOTS, "max_new_tokens": 1900, "temperature": 0}] * 8
            bodies += [{"prompt": "x", "temperature": 1.0, "top_p": 1e-60, "max_new_tokens": 1900}] * 8
            for b in bodies:
                threading.Thread(target=_ignore, args=(httpx.post, url + "/process"), kwargs={"json": b, "timeout": 60}, daemon=True).start()

        flood()
        in_flight = {}
        deadline = time.monotonic() + 60
        while in_flight.get("requests", 0) < 16 and time.monotonic() < deadline:  # every one inside the engine
            in_flight = httpx.get(url + "/health", timeout=5).json()["engine"]
            time.sleep(0.1)
        assert in_flight["requests"] == 16 and in_flight["sequences"] > 0, in_flight
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=drain_s + 3)
        assert time.monotonic() - start <= drain_s + 2
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _ignore(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except httpx.HTTPError:
        pass
