"""``make eval-time``: will HELM finish in time against this server?

Replays a HELM-like sample trace (``core.workload``) against a running server at HELM's concurrency
(30 requests in flight), measures each request type, and projects the wall time of the 2-hour
sample conf, the open set (300 min) and the closed set (600 min).

Method (per request type, ``requests_per_type`` requests of the trace, kept ``concurrency`` in flight):

1. ``first_token`` phase: the trace's prompts with ``max_new_tokens=1``. For multiple choice this *is*
   the real workload. Its wall time / requests = ``s1``, the effective cost of a request that
   generates ~1 token (prefill, queueing, HTTP) at this concurrency.
2. ``capped`` phase (generation types only): prompts of the same type with ``max_new_tokens``
   capped (``cap_new_tokens``, default 32). They come from a second sample of the trace (other
   instances and run specs), so a server that caches prompts does not get them for free. Wall time / requests = ``s2``, with ``g2`` tokens generated on
   average (counted from the responses). The per-generated-token cost at this concurrency is
   ``b = (s2 - s1) / (g2 - g1)``.
3. A request of that type costs ``s1 + b * (E - g1)`` where ``E`` is the type's expected generated
   length (``core.workload``: MC 1, GSM8K 120, MATH 200, CNN/DM 70, SAMSum 30, BIG-bench
   generative 64): a small or random-weight model never emits the stop strings, so the real lengths
   cannot be observed; they are assumed, and the worst case (every generation runs to HELM's
   max_new_tokens) is shown next to them.
4. A set's projection is ``sum(requests[type] * cost[type])`` (``core.workload.project``): HELM runs
   one run spec after another, each with 30 requests in flight.

Linear extrapolation from 32 tokens ignores that decoding slows as the context grows (small next to
the prompt for these lengths), and HELM's own overhead (scenario downloads, metrics, its
``/tokenize`` calls) is not included: keep a margin.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.workload import (
    CALIBRATION_WORDS,
    EXPECTED_NEW_TOKENS_NOTE,
    HELM_CONCURRENCY,
    HELM_WINDOW,
    SETS,
    TYPES,
    TraceRequest,
    build_trace,
    calibration_text,
    project,
)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_OUT = Path("out/eval_time.json")
METHOD = (
    "per type: effective seconds per request at the given concurrency (phase wall time / requests) "
    "with max_new_tokens=1 (s1) and with max_new_tokens capped (s2, g2 tokens generated); "
    "cost = s1 + (s2 - s1) / (g2 - g1) * (E - g1) for an expected generated length E; "
    "set time = sum over types of requests x cost"
)


class EvalTimeError(RuntimeError):
    """A failure to report as one line (no traceback): unreachable server, every request failing."""


@dataclass
class Outcome:
    latency_s: float
    ok: bool
    generated_tokens: int = 0
    error: str = ""


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _send(client: httpx.AsyncClient, sem: asyncio.Semaphore, body: dict) -> Outcome:
    async with sem:
        start = time.perf_counter()
        try:
            response = await client.post("/process", json=body)
        except httpx.HTTPError as e:
            return Outcome(time.perf_counter() - start, False, error=f"{type(e).__name__}: {e}".rstrip(": "))
        latency = time.perf_counter() - start
        if response.status_code != 200:
            return Outcome(latency, False, error=f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            tokens = response.json().get("tokens", [])
        except ValueError:
            return Outcome(latency, False, error="response is not JSON")
        return Outcome(latency, True, generated_tokens=len(tokens))


async def run_phase(client: httpx.AsyncClient, bodies: list[dict], concurrency: int) -> dict:
    """Send ``bodies`` keeping at most ``concurrency`` in flight; wall time, rate, latencies."""
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(_send(client, sem, b) for b in bodies))
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in ok]
    errors = [o.error for o in outcomes if not o.ok]
    return {
        "requests": len(bodies),
        "ok": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "in_flight": min(concurrency, len(bodies)),
        "max_new_tokens": max((b["max_new_tokens"] for b in bodies), default=0),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else math.inf,
        "seconds_per_request": wall / len(bodies) if bodies else math.nan,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
        "mean_generated_tokens": statistics.fmean(o.generated_tokens for o in ok) if ok else math.nan,
    }


def request_cost(type_name: str, first: dict, capped: dict | None) -> dict:
    """Per-request cost of a type at the measured concurrency, at expected and worst-case lengths."""
    t = TYPES[type_name]
    s1, g1 = first["seconds_per_request"], first["mean_generated_tokens"]
    notes: list[str] = []
    if capped is None:  # multiple choice: the first_token phase is the workload itself
        return {"seconds_per_generated_token": None, "expected_s": s1, "worst_case_s": s1, "notes": notes}
    s2, g2 = capped["seconds_per_request"], capped["mean_generated_tokens"]
    if g2 - g1 >= 1:
        per_token = max(0.0, s2 - s1) / (g2 - g1)
    else:  # stopped at once (EOS / stop string): attribute the whole request to its tokens (upper bound)
        per_token = s2 / max(g2, 1.0)
        notes.append(f"only {g2:.1f} tokens generated with a cap of {capped['max_new_tokens']}: per-token cost is an upper bound")
    if g2 < 0.5 * capped["max_new_tokens"] and g2 - g1 >= 1:
        notes.append(f"the model stopped early ({g2:.1f} of {capped['max_new_tokens']} tokens): per-token cost from fewer tokens")
    extra = lambda n: max(0.0, n - g1)  # noqa: E731 - tokens beyond those of the first_token phase
    return {
        "seconds_per_generated_token": per_token,
        "expected_s": s1 + per_token * extra(t.expected_new_tokens),
        "worst_case_s": s1 + per_token * extra(t.max_new_tokens),
        "notes": notes,
    }


async def measure(
    client: httpx.AsyncClient,
    trace: list[TraceRequest],
    concurrency: int = HELM_CONCURRENCY,
    cap_new_tokens: int = 32,
    capped_trace: list[TraceRequest] | None = None,
) -> dict[str, dict]:
    """Measure every request type of ``trace`` (two phases for generation types; see the module doc).

    ``capped_trace``: the capped phase's requests (default: ``trace``'s own, which a prompt-caching
    server has just seen)."""
    by_type: dict[str, list[TraceRequest]] = {}
    for r in trace:
        by_type.setdefault(r.type, []).append(r)
    capped_by_type: dict[str, list[TraceRequest]] = {}
    for r in capped_trace or trace:
        capped_by_type.setdefault(r.type, []).append(r)
    results: dict[str, dict] = {}
    for name, reqs in by_type.items():
        t = TYPES[name]
        first = await run_phase(client, [{**r.body, "max_new_tokens": 1} for r in reqs], concurrency)
        capped = None
        if t.max_new_tokens > 1:
            cap = min(t.max_new_tokens, cap_new_tokens)
            second = capped_by_type.get(name) or reqs
            capped = await run_phase(client, [{**r.body, "max_new_tokens": cap} for r in second], concurrency)
        for phase in (first, capped):
            if phase is not None and phase["ok"] == 0:
                raise EvalTimeError(f"every {name} request failed: {phase['first_error']}")
        results[name] = {
            "requests": len(reqs),
            "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in reqs),
            "max_new_tokens": t.max_new_tokens,
            "expected_new_tokens": t.expected_new_tokens,
            "phases": {"first_token": first, **({"capped": capped} if capped else {})},
            "cost": request_cost(name, first, capped),
        }
    return results


async def _check_server(client: httpx.AsyncClient, url: str) -> dict:
    """Any HTTP answer means reachable; returns /health's JSON when the server has one."""
    try:
        response = await client.get("/health", timeout=10.0)
    except (httpx.TransportError, httpx.InvalidURL) as e:
        raise EvalTimeError(
            f"cannot reach the server at {url} ({type(e).__name__}: {e}). Start it first "
            f"(make serve CKPT=...) or pass the right URL (make eval-time URL=http://host:port)."
        ) from None
    try:
        return response.json() if response.status_code == 200 else {}
    except ValueError:
        return {}


async def _tokens_per_word(client: httpx.AsyncClient) -> float | None:
    """Calibrate prompt sizes with the server's own tokenizer (``/tokenize``); None if unavailable."""

    async def count(text: str) -> int:
        response = await client.post("/tokenize", json={"text": text, "truncation": False, "max_length": HELM_WINDOW})
        response.raise_for_status()
        return len(response.json()["tokens"])

    try:
        words, empty = await count(calibration_text()), await count("")
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return None
    return max(1e-3, (words - empty) / CALIBRATION_WORDS)


async def evaluate(
    url: str = DEFAULT_URL,
    requests_per_type: int = 30,
    concurrency: int = HELM_CONCURRENCY,
    cap_new_tokens: int = 32,
    max_prompt_tokens: int = HELM_WINDOW,
    timeout: float = 600.0,
    seed: int = 0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict:
    """Measure the server at ``url`` and return the report (see the module doc for the method)."""
    if requests_per_type < 1 or concurrency < 1 or cap_new_tokens < 2:
        raise EvalTimeError("requests_per_type and concurrency must be >= 1 and cap_new_tokens >= 2")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, transport=transport, limits=limits, timeout=httpx.Timeout(timeout, connect=10.0)
    ) as client:
        health = await _check_server(client, url)
        tpw = await _tokens_per_word(client)
        first, second = (
            build_trace(
                requests_per_type * len(TYPES), s, max_prompt_tokens=max_prompt_tokens,
                cap_new_tokens=cap_new_tokens, workload="all", tokens_per_word=tpw or 1.0,
                min_per_type=requests_per_type,
            )  # fmt: skip
            for s in (seed, seed + 1)
        )
        start = time.perf_counter()
        types = await measure(client, first, concurrency, cap_new_tokens, capped_trace=second)
        elapsed = time.perf_counter() - start

    expected = {t: r["cost"]["expected_s"] for t, r in types.items()}
    worst = {t: r["cost"]["worst_case_s"] for t, r in types.items()}
    sets = {}
    for name, ws in SETS.items():
        counts = ws.requests
        projected, worst_s = project(expected, counts), project(worst, counts)
        sets[name] = {
            "title": ws.title,
            "requests": counts,
            "total_requests": ws.total_requests,
            "projected_s": projected,
            "worst_case_s": worst_s,
            "limit_s": ws.limit_s,
            "within_limit": projected <= ws.limit_s,
            "worst_case_within_limit": worst_s <= ws.limit_s,
        }
    errors = sum(p["errors"] for r in types.values() for p in r["phases"].values())
    return {
        "url": url,
        "model": health.get("model"),
        "concurrency": concurrency,
        "requests_per_type": requests_per_type,
        "cap_new_tokens": cap_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "tokens_per_word": tpw,
        "requests_sent": sum(p["requests"] for r in types.values() for p in r["phases"].values()),
        "errors": errors,
        "measure_s": elapsed,
        "method": METHOD,
        "assumption": EXPECTED_NEW_TOKENS_NOTE,
        "types": types,
        "sets": sets,
    }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def render(report: dict) -> str:
    """The human-readable summary printed by the CLI."""
    lines = [
        f"eval-time: {report['url']} (model: {report['model'] or '?'}), {report['requests_sent']} requests at "
        f"concurrency {report['concurrency']} in {_duration(report['measure_s'])}"
        + (f", tokens/word {report['tokens_per_word']:.2f}" if report["tokens_per_word"] else ", /tokenize unavailable"),
        "",
        f"{'type':<21} {'n':>3} {'prompt':>6} {'req/s@1':>8} {'p50':>7} {'p99':>7} {'req/s@cap':>9} {'gen':>5} "
        f"{'ms/tok':>7} {'E':>4} {'s/req(E)':>9} {'s/req(max)':>10}",
    ]
    for name, r in report["types"].items():
        first, capped, cost = r["phases"]["first_token"], r["phases"].get("capped"), r["cost"]
        ms_tok = cost["seconds_per_generated_token"]
        lines.append(
            f"{name:<21} {r['requests']:>3} {r['mean_prompt_tokens']:>6.0f} {first['requests_per_s']:>8.2f} "
            f"{first['latency_p50_s']:>7.3f} {first['latency_p99_s']:>7.3f} "
            + (f"{capped['requests_per_s']:>9.2f} {capped['mean_generated_tokens']:>5.1f} " if capped else f"{'-':>9} {'-':>5} ")
            + (f"{ms_tok * 1000:>7.2f} " if ms_tok is not None else f"{'-':>7} ")
            + f"{r['expected_new_tokens']:>4} {cost['expected_s']:>9.4f} {cost['worst_case_s']:>10.4f}"
        )
        lines += [f"  note: {n}" for n in cost["notes"]]
    lines += [
        "",
        "p50/p99: latency (s) of the max_new_tokens=1 phase; req/s@cap, gen: the capped phase and its generated tokens.",
        f"method: {report['method']}.",
        f"assumption: {report['assumption']}",
        "not included: HELM's own overhead (downloads, prompt building, metrics). Keep a margin.",
        "",
        f"{'set':<58} {'requests':>8} {'projected':>10} {'worst case':>11} {'limit':>8}",
    ]
    for s in report["sets"].values():
        mark = "OK" if s["within_limit"] else "OVER"
        worst_mark = "" if s["worst_case_within_limit"] else " (worst case OVER)"
        lines.append(
            f"{s['title']:<58} {s['total_requests']:>8} {_duration(s['projected_s']):>10} "
            f"{_duration(s['worst_case_s']):>11} {_duration(s['limit_s']):>8}  {mark}{worst_mark}"
        )
    if report["errors"]:
        lines.append(f"\nwarning: {report['errors']} requests failed; see the report's first_error fields")
    return "\n".join(lines)


def main(
    url: str = DEFAULT_URL,
    requests_per_type: int = 30,
    concurrency: int = HELM_CONCURRENCY,
    cap_new_tokens: int = 32,
    max_prompt_tokens: int = HELM_WINDOW,
    timeout: float = 600.0,
    seed: int = 0,
    out: Path = DEFAULT_OUT,
) -> dict:
    """Project HELM's wall time on the sample conf, open and closed sets from a running server.

    Args:
        url: the server (what `make serve` or the container exposes).
        requests_per_type: trace requests measured per request type (11 types; generation types
            are sent twice: with max_new_tokens=1 and capped).
        concurrency: requests in flight (HELM: helm-run -n 30).
        cap_new_tokens: max_new_tokens of the capped phase; longer generations are extrapolated.
        max_prompt_tokens: the window prompts are fitted to (HELM: 2048).
        timeout: seconds one request may take, queueing included.
        seed: the trace's seed.
        out: where the JSON report goes.
    """
    try:
        report = asyncio.run(
            evaluate(url, requests_per_type, concurrency, cap_new_tokens, max_prompt_tokens, timeout, seed)
        )
    except EvalTimeError as e:
        raise SystemExit(f"eval-time: error: {e}") from None
    print(render(report))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {out}")
    return report


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
