"""Soak: many clients for minutes against the real server, some hanging up mid-request; does it stay up and flat?

    python -m bench.soak --checkpoint_dir checkpoints/tiny --device cpu --out_dir out/bench

Starts ``python -m server`` on a free port (or soaks ``--url``), then runs ``clients`` concurrent
clients for ``duration_s``. Each client loops over a HELM-like mix: a multiple-choice answer
(1 token, stop at newline), a short sampled generation, a scored echo (``max_new_tokens`` 0) and a
``/tokenize`` + ``/decode`` pair. A ``disconnect_fraction`` of the requests are long generations whose
client hangs up after 0.05-1 s, as the challenge-era HELM client did after its timeout; the server
must cancel them and free what they held. Reported as JSON (printed, and ``soak.json`` in ``out_dir``):
requests answered, errors (any other status or transport failure, with a sample), 503s, hang-ups,
latency p50/p99/max of answered requests, the server's resident memory after warm-up and at the end,
and whether it still answers and goes idle afterwards (``/health``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Question: Is 4821 even or odd?\nAnswer:",
    "Repeat the words exactly.\nfox owl pear\nAnswer:",
    "The capital of France is ",
    "Which is larger, 31 or 13?\nA. 31\nB. 13\nAnswer:",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` (and its children, where a server forks workers) from /proc, in MiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:"))
    return round(kib / 1024, 1)


def _request(rng: random.Random, prompt: str) -> tuple[str, dict]:
    kind = rng.choice(["choice", "generate", "score", "tokenize"])
    if kind == "choice":
        return "/process", {"prompt": prompt, "max_new_tokens": 1, "temperature": 1e-7, "stop_sequences": ["\n"], "top_k_per_token": 5}
    if kind == "generate":
        return "/process", {"prompt": prompt, "max_new_tokens": rng.randint(8, 48), "temperature": 0.3, "top_p": 0.9, "stop_sequences": ["###"]}
    if kind == "score":
        return "/process", {"prompt": prompt, "max_new_tokens": 0, "echo_prompt": True, "top_k_per_token": 1}
    return "/tokenize", {"text": prompt, "truncation": False, "max_length": 2048}


class Tally:
    def __init__(self) -> None:
        self.answered = 0
        self.errors = 0
        self.rejected_503 = 0
        self.hung_up = 0
        self.latencies: list[float] = []
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what[:300])


async def _client(url: str, seed: int, stop_at: float, disconnect_fraction: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        while time.monotonic() < stop_at:
            prompt = rng.choice(PROMPTS)
            if rng.random() < disconnect_fraction:  # a long generation whose client leaves early
                body = {"prompt": prompt, "max_new_tokens": 1500, "temperature": 1.0}
                try:
                    await asyncio.wait_for(client.post("/process", json=body), timeout=rng.uniform(0.05, 1.0))
                    tally.answered += 1  # finished before the client gave up
                except asyncio.TimeoutError:
                    tally.hung_up += 1
                except httpx.HTTPError as e:
                    tally.error(f"hang-up request: {type(e).__name__}: {e}")
                continue
            path, body = _request(rng, prompt)
            start = time.monotonic()
            try:
                response = await client.post(path, json=body)
                if response.status_code == 200 and path == "/tokenize":
                    response = await client.post("/decode", json={"tokens": response.json()["tokens"]})
            except httpx.HTTPError as e:
                tally.error(f"{path}: {type(e).__name__}: {e}")
                continue
            if response.status_code == 200:
                tally.answered += 1
                tally.latencies.append(time.monotonic() - start)
            elif response.status_code == 503:
                tally.rejected_503 += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            else:
                tally.error(f"{path} {json.dumps(body)[:120]} -> {response.status_code} {response.text[:200]}")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def _wait_ready(url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"error: the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {url}/health not ready after {timeout:.0f} s")


def _after(url: str, settle_s: float) -> dict:
    """Health, a normal request, and the engine's counters once the hung-up requests have had time to be cancelled."""
    time.sleep(settle_s)
    health = httpx.get(f"{url}/health", timeout=30)
    start = time.monotonic()
    answer = httpx.post(f"{url}/process", json={"prompt": PROMPTS[2], "max_new_tokens": 4, "temperature": 1e-7}, timeout=60)
    return {
        "health_status": health.status_code,
        "health": health.json(),
        "normal_request_status": answer.status_code,
        "normal_request_s": round(time.monotonic() - start, 3),
    }


def main(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    device: str = "cpu",
    out_dir: Path = Path("out/bench"),
    clients: int = 64,
    duration_s: float = 300.0,
    disconnect_fraction: float = 0.1,
    url: str | None = None,
    seed: int = 0,
) -> dict:
    """Soak the server; see the module doc.

    Args:
        checkpoint_dir: the checkpoint the started server serves (ignored with --url).
        device: the started server's --device.
        out_dir: where soak.json (and the server's log) go.
        clients: concurrent clients.
        duration_s: how long they keep sending.
        disconnect_fraction: share of requests whose client hangs up early.
        url: soak a server that is already running instead (its memory is then not measured).
        seed: seeds the clients' choices.
    """
    if not 0.0 <= disconnect_fraction <= 1.0:
        raise SystemExit(f"error: disconnect_fraction must be within [0, 1], got {disconnect_fraction}")
    out_dir.mkdir(parents=True, exist_ok=True)
    process = None
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(out_dir / "soak_server.log", "w")
        command = [sys.executable, "-m", "server", "--checkpoint_dir", str(checkpoint_dir), "--port", str(port), "--device", device]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_ready(url, process, timeout=600)
        rss_start = rss_mib(process.pid) if process else None
        tally = Tally()
        started = time.monotonic()

        async def run_all() -> None:
            stop_at = time.monotonic() + duration_s
            await asyncio.gather(*(_client(url, seed * 1000 + i, stop_at, disconnect_fraction, tally) for i in range(clients)))

        asyncio.run(run_all())
        wall = time.monotonic() - started
        rss_end = rss_mib(process.pid) if process else None
        after = _after(url, settle_s=5.0)
        rss_idle = rss_mib(process.pid) if process else None
    finally:
        exit_s = None
        if process is not None:
            process.terminate()
            stopping = time.monotonic()
            try:
                process.wait(timeout=60)
                exit_s = round(time.monotonic() - stopping, 2)
            except subprocess.TimeoutExpired:
                process.kill()  # exit code -9 in the report: SIGTERM did not end it
                process.wait()
    result = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.soak", *sys.argv[1:]]),
        "checkpoint_dir": str(checkpoint_dir),
        "device": device,
        "cpus": os.cpu_count(),
        "clients": clients,
        "duration_s": duration_s,
        "wall_s": round(wall, 1),
        "disconnect_fraction": disconnect_fraction,
        "requests_answered": tally.answered,
        "requests_per_s": round(tally.answered / wall, 1),
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "rejected_503": tally.rejected_503,
        "hung_up": tally.hung_up,
        "latency_p50_s": _percentile(tally.latencies, 0.50),
        "latency_p99_s": _percentile(tally.latencies, 0.99),
        "latency_max_s": round(max(tally.latencies), 4) if tally.latencies else None,
        "rss_mib_start": rss_start,
        "rss_mib_end": rss_end,
        "rss_mib_idle_after": rss_idle,
        "server_exit_code": process.returncode if process else None,  # after SIGTERM; -9: it had to be killed
        "server_exit_s": exit_s,
        **after,
    }
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
