"""Soak: many clients for minutes against the real server, some hanging up mid-request; does it stay up and flat?

    python -m bench.soak --checkpoint_dir checkpoints/tiny --device cpu --out_dir out/bench

Starts ``python -m server`` on a free port (or soaks ``--url``), then runs ``clients`` concurrent
clients for ``duration_s``. Each client loops over a HELM-like mix: a multiple-choice answer
(1 token, stop at newline), a short sampled generation, a scored echo (``max_new_tokens`` 0) and a
``/tokenize`` + ``/decode`` pair. A ``disconnect_fraction`` of the requests are long generations
(1,500 tokens) whose client hangs up after 0.05-1 s, as the challenge-era HELM client did after its
timeout; the server must cancel them and free what they held.

Reported as JSON (printed, and ``soak.json`` in ``out_dir``): requests sent, answered, errors (any
other status or transport failure, with a sample), 503s and hang-ups; latency p50/p99/max of the
answered mix, overall and per kind; the server's resident memory when ready, after ``warmup_s``, at
the end and once idle, with a timeline of memory and of what the engine holds; the engine's own
counts of the requests it took and cancelled; then whether it goes idle (nothing queued, running
or held), answers a normal request, and exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Question: Is 4821 even or odd?\nAnswer:",
    "Repeat the words exactly.\nfox owl pear\nAnswer:",
    "The capital of France is ",
    "Which is larger, 31 or 13?\nA. 31\nB. 13\nAnswer:",
]
KINDS = ("choice", "generate", "score", "tokenize")  # the mix clients wait for
LONG = {"max_new_tokens": 1500, "temperature": 1.0}  # what a client that hangs up asked for
IDLE_KEYS = ("queued", "sequences", "kv_blocks_held")  # the batched engine's /health counters that must reach 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` from /proc, in MiB (None off Linux or once it is gone)."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")), None)
    return None if kib is None else round(kib / 1024, 1)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least ``q`` of them at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(math.ceil(q * len(ordered)) - 1, 0)], 4)


def _request(rng: random.Random, prompt: str) -> tuple[str, str, dict]:
    kind = rng.choice(KINDS)
    if kind == "choice":
        return kind, "/process", {"prompt": prompt, "max_new_tokens": 1, "temperature": 1e-7, "stop_sequences": ["\n"], "top_k_per_token": 5}
    if kind == "generate":
        body = {"prompt": prompt, "max_new_tokens": rng.randint(8, 48), "temperature": 0.3, "top_p": 0.9, "stop_sequences": ["###"]}
        return kind, "/process", body
    if kind == "score":
        return kind, "/process", {"prompt": prompt, "max_new_tokens": 0, "echo_prompt": True, "top_k_per_token": 1}
    return kind, "/tokenize", {"text": prompt, "truncation": False, "max_length": 2048}


@dataclass
class Tally:
    sent: int = 0
    errors: int = 0
    rejected_503: int = 0
    hung_up: int = 0
    long_answered: int = 0  # long requests that finished before their client gave up
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error_samples: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + self.long_answered

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what[:300])


async def _send(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    response = await client.post(path, json=body)
    if response.status_code == 200 and path == "/tokenize":  # the pair HELM's tokenizer client makes
        response = await client.post("/decode", json={"tokens": response.json()["tokens"]})
    return response


async def _client(url: str, seed: int, stop_at: float, disconnect_fraction: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        while time.monotonic() < stop_at:
            prompt = rng.choice(PROMPTS)
            if rng.random() < disconnect_fraction:  # a long generation whose client leaves early
                kind, path, body, patience = "long", "/process", {"prompt": prompt, **LONG}, rng.uniform(0.05, 1.0)
            else:
                (kind, path, body), patience = _request(rng, prompt), None
            tally.sent += 1
            start = time.monotonic()
            try:  # cancelling the request closes its connection: the server sees the client leave
                response = await asyncio.wait_for(_send(client, path, body), patience)
            except asyncio.TimeoutError:
                tally.hung_up += 1
                continue
            except httpx.HTTPError as e:
                tally.error(f"{kind} {path}: {type(e).__name__}: {e}")
                continue
            if response.status_code == 200:
                if kind == "long":
                    tally.long_answered += 1
                else:
                    tally.latencies[kind].append(time.monotonic() - start)
            elif response.status_code == 503:
                tally.rejected_503 += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            else:
                tally.error(f"{kind} {path} {json.dumps(body)[:120]} -> {response.status_code} {response.text[:200]}")


def _engine(url: str) -> tuple[int, dict]:
    """/health's status and the engine's counters (empty for an engine that reports none)."""
    health = httpx.get(f"{url}/health", timeout=30)
    return health.status_code, health.json().get("engine", {})


async def _sample(url: str, pid: int | None, started: float, every_s: float, timeline: list[dict]) -> None:
    """Every ``every_s``: the server's memory and what its engine holds, until cancelled."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while True:
            await asyncio.sleep(every_s)
            point = {"t_s": round(time.monotonic() - started, 1), "rss_mib": rss_mib(pid)}
            try:
                engine = (await client.get("/health")).json().get("engine", {})
                point.update({k: engine[k] for k in IDLE_KEYS if k in engine})
            except (httpx.HTTPError, ValueError) as e:
                point["health_error"] = f"{type(e).__name__}: {e}"
            timeline.append(point)


def _wait_ready(url: str, process: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-2000:] if log else ""
            raise SystemExit(f"error: the server exited with {process.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {url}/health not ready after {timeout:.0f} s")


def _after(url: str, settle_s: float) -> dict:
    """Once the clients stop: how long until the engine holds nothing, then health and a normal request."""
    start = time.monotonic()
    while True:
        status, engine = _engine(url)
        if status == 200 and all(engine.get(k, 0) == 0 for k in IDLE_KEYS):
            idle_after_s = round(time.monotonic() - start, 2)
            break
        if time.monotonic() - start > settle_s:
            idle_after_s = None  # still holding work: a leak, or cancellations that never came
            break
        time.sleep(0.2)
    asked = time.monotonic()
    answer = httpx.post(f"{url}/process", json={"prompt": PROMPTS[2], "max_new_tokens": 4, "temperature": 1e-7}, timeout=60)
    return {
        "idle_after_s": idle_after_s,
        "engine_after": engine,
        "health_status": status,
        "normal_request_status": answer.status_code,
        "normal_request_s": round(time.monotonic() - asked, 3),
    }


def _check(clients: int, duration_s: float, disconnect_fraction: float, warmup_s: float, sample_every_s: float) -> None:
    if clients < 1:
        raise SystemExit(f"error: --clients must be at least 1, got {clients}")
    if duration_s <= 0:
        raise SystemExit(f"error: --duration_s must be positive, got {duration_s}")
    if not 0.0 <= disconnect_fraction <= 1.0:
        raise SystemExit(f"error: --disconnect_fraction must be within [0, 1], got {disconnect_fraction}")
    if not 0 <= warmup_s < duration_s:
        raise SystemExit(f"error: --warmup_s must be within [0, --duration_s {duration_s:g}), got {warmup_s}")
    if sample_every_s <= 0:
        raise SystemExit(f"error: --sample_every_s must be positive, got {sample_every_s}")


def main(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    device: str = "cpu",
    out_dir: Path = Path("out/bench"),
    clients: int = 64,
    duration_s: float = 300.0,
    disconnect_fraction: float = 0.1,
    warmup_s: float = 30.0,
    sample_every_s: float = 15.0,
    url: str | None = None,
    server_pid: int | None = None,
    seed: int = 0,
) -> dict:
    """Soak the server; see the module doc.

    Args:
        checkpoint_dir: the checkpoint the started server serves (ignored with --url).
        device: the started server's --device (ignored with --url).
        out_dir: where soak.json (and the started server's log) go.
        clients: concurrent clients.
        duration_s: how long they keep sending.
        disconnect_fraction: share of requests whose client hangs up early.
        warmup_s: memory after this long is the baseline the end is compared with (caches filled).
        sample_every_s: how often the timeline samples memory and the engine's queue.
        url: soak a server that is already running instead of starting one.
        server_pid: with --url, the server's process id, to measure its memory (otherwise not measured).
        seed: seeds the clients' choices.
    """
    _check(clients, duration_s, disconnect_fraction, warmup_s, sample_every_s)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = ["python", "-m", "bench.soak", "--clients", str(clients), "--duration_s", f"{duration_s:g}",
               "--disconnect_fraction", f"{disconnect_fraction:g}", "--seed", str(seed)]  # fmt: skip
    command += ["--url", url] if url else ["--checkpoint_dir", str(checkpoint_dir), "--device", device]
    process, log_path, pid = None, None, server_pid
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = out_dir / "soak_server.log"
        server = [sys.executable, "-m", "server", "--checkpoint_dir", str(checkpoint_dir), "--port", str(port), "--device", device]
        with log_path.open("w") as log:
            process = subprocess.Popen(server, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        pid = process.pid
    exit_s = None
    try:
        _wait_ready(url, process, log_path, timeout=600)
        rss_start = rss_mib(pid)
        _, engine_before = _engine(url)
        tally, timeline = Tally(), []
        started = time.monotonic()

        async def run_all() -> None:
            sampler = asyncio.ensure_future(_sample(url, pid, started, sample_every_s, timeline))
            stop_at = started + duration_s
            await asyncio.gather(*(_client(url, seed * 1000 + i, stop_at, disconnect_fraction, tally) for i in range(clients)))
            sampler.cancel()

        asyncio.run(run_all())
        wall = time.monotonic() - started
        rss_end = rss_mib(pid)
        after = _after(url, settle_s=60.0)
        rss_idle = rss_mib(pid)
    finally:
        if process is not None:
            process.terminate()  # the server drains (its --drain_s, default 30 s), then exits
            stopping = time.monotonic()
            try:
                process.wait(timeout=60)
                exit_s = round(time.monotonic() - stopping, 2)
            except subprocess.TimeoutExpired:
                process.kill()  # exit code -9 in the report: SIGTERM did not end it
                process.wait()
    warm = next((p["rss_mib"] for p in timeline if p["t_s"] >= warmup_s), rss_end)
    every = [x for kind in KINDS for x in tally.latencies[kind]]
    engine_end = after["engine_after"]
    result = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(command),
        "cpus": os.cpu_count(),
        "clients": clients,
        "duration_s": duration_s,
        "wall_s": round(wall, 1),
        "disconnect_fraction": disconnect_fraction,
        "requests_sent": tally.sent,
        "requests_answered": tally.answered,
        "requests_per_s": round(tally.answered / wall, 1),
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "rejected_503": tally.rejected_503,
        "hung_up": tally.hung_up,
        "long_answered": tally.long_answered,
        "server_requests": engine_end.get("requests", 0) - engine_before.get("requests", 0) if engine_end else None,
        "server_cancelled": engine_end.get("cancelled", 0) - engine_before.get("cancelled", 0) if engine_end else None,
        "latency_p50_s": percentile(every, 0.50),
        "latency_p99_s": percentile(every, 0.99),
        "latency_max_s": round(max(every), 4) if every else None,
        "latency_by_kind": {k: {"n": len(v), "p50_s": percentile(v, 0.5), "p99_s": percentile(v, 0.99)} for k, v in tally.latencies.items()},
        "rss_mib_start": rss_start,
        "rss_mib_after_warmup": warm,
        "rss_mib_end": rss_end,
        "rss_mib_idle_after": rss_idle,
        "timeline": timeline,
        **after,
        "server_exit_code": process.returncode if process else None,  # after SIGTERM; -9: it had to be killed
        "server_exit_s": exit_s,
    }
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
