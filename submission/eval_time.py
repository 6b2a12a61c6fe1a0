"""``make eval-time``: will HELM finish in time against this server?

Replays a HELM-like trace (``core.workload``) against a running server with ``threads`` requests in
flight (helm-run's ``-n/--num-threads``, default 4, which the organizers' command does not set),
measures each request type's latency, and projects the wall time of the 2-hour sample conf, the open
set (300 min) and the closed set (600 min) as helm-run really runs them (``submission.helm_model``):
one run spec at a time, ``threads`` requests in flight within it, and a barrier at each spec's slowest
request (the sample conf: 88 entries of 3 to 19 instances, 175 run specs once BIG-bench is expanded).

Method (per request type, ``requests_per_type`` requests of the trace, ``threads`` in flight):

1. ``first_token`` phase: the trace's prompts with ``max_new_tokens=1``. For multiple choice this *is*
   the real request. Each request's latency here is its prefill cost (with queueing and HTTP) at
   ``threads`` in flight: ``l1`` (their mean ``L1``), with ``g1`` tokens generated.
2. ``capped`` phase (generation types only): prompts of the same type with ``max_new_tokens``
   capped (``cap_new_tokens``, default 32), from a second sample of the trace (other instances and run
   specs, so a prompt-caching server does not get them for free): mean latency ``L2`` with ``g2``
   tokens generated. The decode cost per generated token is ``d = (L2 - L1) / (g2 - g1)``.
3. A request of the type takes ``l1 + d * (E - g1)``, ``E`` the type's expected generated length
   (``core.workload``: MC 1, GSM8K 120, MATH 200, CNN/DM 70, SAMSum 30, BIG-bench generative 64): a
   small or random-weight model never emits the stop strings, so real lengths cannot be observed; the
   worst case (every generation runs to HELM's max_new_tokens) is shown next to it.
4. A set's time is ``submission.helm_model.project``: per run spec, its requests (the measured ``l1``
   cycled) go to the first free of ``threads`` threads; the spec ends with its last request; specs add
   up. The same requests pooled with no barriers are shown for comparison.
5. For the other track's card (or both, on another GPU) an *estimate*: each request's prefill part
   scaled by bf16 compute, its decode part by memory bandwidth (``submission.helm_model.CARDS``).

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
from typing import Literal

import httpx

from core.workload import (
    CALIBRATION_WORDS,
    EXPECTED_NEW_TOKENS_NOTE,
    HELM_RUN_THREADS,
    HELM_WINDOW,
    SETS,
    TYPES,
    TraceRequest,
    build_trace,
    calibration_text,
)
from submission import helm_model

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_OUT = Path("out/eval_time.json")
METHOD = (
    "per type: request latency at `threads` in flight with max_new_tokens=1 (l1, mean L1) and capped (mean L2, "
    "g2 tokens generated); a request costs l1 + (L2 - L1) / (g2 - g1) * (E - g1) for an expected generated length E; "
    "set time = helm-run's schedule: run spec after run spec, `threads` requests in flight within one, "
    "each spec ending with its slowest request"
)
GPU = Literal["auto", "none", "rtx4090", "a100_40gb", "a100_80gb", "h100", "h200"]  # helm_model.CARDS, auto, none
ESTIMATE_LABEL = (
    "estimate, not a measurement: each request's prefill part scaled by bf16 dense compute and its decode part by "
    "memory bandwidth ({ran} -> {target}: {tflops_a:.0f} -> {tflops_b:.0f} TFLOPS, {bw_a:.0f} -> {bw_b:.0f} GB/s)"
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
        "latency_mean_s": statistics.fmean(latencies) if latencies else math.nan,
        "latencies_s": latencies,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
        "mean_generated_tokens": statistics.fmean(o.generated_tokens for o in ok) if ok else math.nan,
    }


def request_cost(type_name: str, first: dict, capped: dict | None) -> dict:
    """Latency of a request of the type at the measured threads: prefill (the first-token phase) plus decode,
    at the expected and the worst-case generated length."""
    t = TYPES[type_name]
    l1, g1 = first["latency_mean_s"], first["mean_generated_tokens"]
    notes: list[str] = []
    if capped is None:  # multiple choice: the first_token phase is the request itself
        return {"prefill_s": l1, "seconds_per_generated_token": None, "decode_expected_s": 0.0, "decode_worst_case_s": 0.0,
                "expected_s": l1, "worst_case_s": l1, "notes": notes}  # fmt: skip
    l2, g2 = capped["latency_mean_s"], capped["mean_generated_tokens"]
    if g2 - g1 >= 1:
        per_token = max(0.0, l2 - l1) / (g2 - g1)
    else:  # stopped at once (EOS / stop string): attribute the whole request to its tokens (upper bound)
        per_token = l2 / max(g2, 1.0)
        notes.append(f"only {g2:.1f} tokens generated with a cap of {capped['max_new_tokens']}: per-token cost is an upper bound")
    if g2 < 0.5 * capped["max_new_tokens"] and g2 - g1 >= 1:
        notes.append(f"the model stopped early ({g2:.1f} of {capped['max_new_tokens']} tokens): per-token cost from fewer tokens")
    decode = {n: per_token * max(0.0, tokens - g1) for n, tokens in (("expected", t.expected_new_tokens), ("worst_case", t.max_new_tokens))}
    return {
        "prefill_s": l1,
        "seconds_per_generated_token": per_token,
        "decode_expected_s": decode["expected"],
        "decode_worst_case_s": decode["worst_case"],
        "expected_s": l1 + decode["expected"],
        "worst_case_s": l1 + decode["worst_case"],
        "notes": notes,
    }


def latency_model(types: dict[str, dict], case: str = "expected", ran_on: str | None = None, target: str | None = None) -> helm_model.LatencyOf:
    """(type, i) -> seconds: the i-th request of a spec takes a measured first-token latency (cycled) plus the
    type's decode time; with ``target``, both parts scaled from ``ran_on`` to that card (an estimate)."""
    prefill = {t: r["phases"]["first_token"]["latencies_s"] or [r["cost"]["prefill_s"]] for t, r in types.items()}
    decode = {t: r["cost"][f"decode_{case}_s"] for t, r in types.items()}

    def latency(type_name: str, i: int) -> float:
        if type_name not in prefill:
            raise ValueError(f"no measurement for request type {type_name!r}")
        p = prefill[type_name][i % len(prefill[type_name])]
        if target is None:
            return p + decode[type_name]
        return helm_model.scale_to_card(p, decode[type_name], ran_on, target)

    return latency


def detect_gpu(gpu: str) -> str | None:
    """The ``helm_model.CARDS`` key eval-time projects for: as given, or (auto) this machine's CUDA device
    (eval-time runs beside the server); None on a CPU or an unlisted GPU."""
    if gpu != "auto":
        return None if gpu == "none" else gpu
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return helm_model.card_from_device(props.name, props.total_memory / 2**30)
    except Exception:  # noqa: BLE001 - no torch or no driver: no card, said so in the report
        return None


def project_sets(types: dict[str, dict], threads: int, ran_on: str | None = None, specs: dict | None = None) -> dict:
    """Every set's projection at ``threads`` (helm-run's schedule), without barriers, worst case, and the estimates."""
    specs = helm_model.sets_specs() if specs is None else specs
    expected, worst = latency_model(types, "expected"), latency_model(types, "worst_case")
    out = {}
    for name, set_specs in specs.items():
        ws = SETS[name]
        projected, worst_s = helm_model.project(set_specs, expected, threads), helm_model.project(set_specs, worst, threads)
        estimates = {}
        for target in helm_model.other_cards(ran_on) if ran_on else []:
            a, b = helm_model.CARDS[ran_on], helm_model.CARDS[target]
            est = helm_model.project(set_specs, latency_model(types, "expected", ran_on, target), threads)
            est_worst = helm_model.project(set_specs, latency_model(types, "worst_case", ran_on, target), threads)
            estimates[target] = {
                "title": b.title, "projected_s": est, "worst_case_s": est_worst, "within_limit": est <= ws.limit_s,
                "label": ESTIMATE_LABEL.format(ran=a.title, target=b.title, tflops_a=a.bf16_tflops, tflops_b=b.bf16_tflops,
                                               bw_a=a.memory_gb_s, bw_b=b.memory_gb_s),
            }  # fmt: skip
        out[name] = {
            "title": ws.title,
            "run_specs": len(set_specs),
            "requests": helm_model.requests_by_type(set_specs),
            "total_requests": ws.total_requests,
            "threads": threads,
            "projected_s": projected,
            "no_barrier_s": helm_model.project_without_barriers(set_specs, expected, threads),
            "worst_case_s": worst_s,
            "limit_s": ws.limit_s,
            "within_limit": projected <= ws.limit_s,
            "worst_case_within_limit": worst_s <= ws.limit_s,
            "estimates": estimates,
        }
    return out


async def measure(
    client: httpx.AsyncClient,
    trace: list[TraceRequest],
    concurrency: int = HELM_RUN_THREADS,
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
    threads: int = HELM_RUN_THREADS,
    cap_new_tokens: int = 32,
    max_prompt_tokens: int = HELM_WINDOW,
    timeout: float = 600.0,
    seed: int = 0,
    transport: httpx.AsyncBaseTransport | None = None,
    gpu: str = "auto",
) -> dict:
    """Measure the server at ``url`` with ``threads`` requests in flight and return the report (see the module doc)."""
    if requests_per_type < 1 or threads < 1 or cap_new_tokens < 2:
        raise EvalTimeError("requests_per_type and threads must be >= 1 and cap_new_tokens >= 2")
    if gpu not in ("auto", "none", *helm_model.CARDS):
        raise EvalTimeError(f"gpu: {gpu!r} is not one of auto, none, {', '.join(helm_model.CARDS)}")
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    async with httpx.AsyncClient(base_url=url, transport=transport, limits=limits, timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        health = await _check_server(client, url)
        tpw = await _tokens_per_word(client)
        first, second = (
            build_trace(
                requests_per_type * len(TYPES),
                s,
                max_prompt_tokens=max_prompt_tokens,
                cap_new_tokens=cap_new_tokens,
                workload="all",
                tokens_per_word=tpw or 1.0,
                min_per_type=requests_per_type,
            )  # fmt: skip
            for s in (seed, seed + 1)
        )
        start = time.perf_counter()
        types = await measure(client, first, threads, cap_new_tokens, capped_trace=second)
        elapsed = time.perf_counter() - start

    ran_on = detect_gpu(gpu)
    errors = sum(p["errors"] for r in types.values() for p in r["phases"].values())
    return {
        "url": url,
        "model": health.get("model"),
        "threads": threads,
        "gpu": ran_on,
        "gpu_title": helm_model.CARDS[ran_on].title if ran_on else None,
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
        "sets": project_sets(types, threads, ran_on),
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
        f"eval-time: {report['url']} (model: {report['model'] or '?'}), {report['requests_sent']} requests with "
        f"{report['threads']} in flight in {_duration(report['measure_s'])} on {report['gpu_title'] or 'an unlisted device'}"
        + (f", tokens/word {report['tokens_per_word']:.2f}" if report["tokens_per_word"] else ", /tokenize unavailable"),
        "",
        f"{'type':<21} {'n':>3} {'prompt':>6} {'p50@1':>7} {'p99@1':>7} {'gen':>5} {'ms/tok':>7} {'E':>4} {'s/req(E)':>9} {'s/req(max)':>10}",
    ]
    for name, r in report["types"].items():
        first, capped, cost = r["phases"]["first_token"], r["phases"].get("capped"), r["cost"]
        ms_tok = cost["seconds_per_generated_token"]
        lines.append(
            f"{name:<21} {r['requests']:>3} {r['mean_prompt_tokens']:>6.0f} {first['latency_p50_s']:>7.3f} {first['latency_p99_s']:>7.3f} "
            + (f"{capped['mean_generated_tokens']:>5.1f} " if capped else f"{'-':>5} ")
            + (f"{ms_tok * 1000:>7.2f} " if ms_tok is not None else f"{'-':>7} ")
            + f"{r['expected_new_tokens']:>4} {cost['expected_s']:>9.4f} {cost['worst_case_s']:>10.4f}"
        )
        lines += [f"  note: {n}" for n in cost["notes"]]
    lines += [
        "",
        "p50/p99@1: latency (s) with max_new_tokens=1; gen: tokens generated in the capped phase; s/req: one request's latency.",
        f"method: {report['method']}.",
        f"assumption: {report['assumption']}",
        "not included: HELM's own overhead (downloads, prompt building, metrics). Keep a margin.",
        "",
        f"helm-run with -n {report['threads']} on {report['gpu_title'] or 'this device'}:",
        f"{'set':<58} {'specs':>5} {'requests':>8} {'projected':>10} {'no barriers':>11} {'worst case':>11} {'limit':>8}",
    ]
    for s in report["sets"].values():
        mark = "OK" if s["within_limit"] else "OVER"
        worst_mark = "" if s["worst_case_within_limit"] else " (worst case OVER)"
        lines.append(
            f"{s['title']:<58} {s['run_specs']:>5} {s['total_requests']:>8} {_duration(s['projected_s']):>10} "
            f"{_duration(s['no_barrier_s']):>11} {_duration(s['worst_case_s']):>11} {_duration(s['limit_s']):>8}  {mark}{worst_mark}"
        )
    estimates = [(s, e) for s in report["sets"].values() for e in s["estimates"].values()]
    labels = {e["label"] for _, e in estimates}
    for label in sorted(labels):
        lines += ["", f"ESTIMATE ({label}):"]
        for s, e in estimates:
            if e["label"] == label:
                lines.append(
                    f"  {e['title']}: {s['title']:<58} {_duration(e['projected_s']):>10} (worst case {_duration(e['worst_case_s'])}) "
                    f"limit {_duration(s['limit_s'])}  {'OK' if e['within_limit'] else 'OVER'} (estimate)"
                )
    if report["gpu"] is None:
        lines.append("\nno estimate for the track cards: pass --gpu <the card the server runs on> to get one")
    if report["errors"]:
        lines.append(f"\nwarning: {report['errors']} requests failed; see the report's first_error fields")
    return "\n".join(lines)


def main(
    url: str = DEFAULT_URL,
    requests_per_type: int = 30,
    threads: int = HELM_RUN_THREADS,
    cap_new_tokens: int = 32,
    max_prompt_tokens: int = HELM_WINDOW,
    timeout: float = 600.0,
    seed: int = 0,
    gpu: GPU = "auto",
    out: Path = DEFAULT_OUT,
) -> dict:
    """Project HELM's wall time on the sample conf, open and closed sets from a running server.

    Args:
        url: the server (what `make serve` or the container exposes).
        requests_per_type: trace requests measured per request type (11 types; generation types
            are sent twice: with max_new_tokens=1 and capped).
        threads: helm-run's -n/--num-threads: requests in flight within a run spec (helm-run's default: 4).
        cap_new_tokens: max_new_tokens of the capped phase; longer generations are extrapolated.
        max_prompt_tokens: the window prompts are fitted to (HELM: 2048).
        timeout: seconds one request may take, queueing included.
        seed: the trace's seed.
        gpu: the GPU the server runs on, for the estimate on the other track's card (auto: this machine's
            CUDA device; none: no estimate).
        out: where the JSON report goes.
    """
    try:
        report = asyncio.run(evaluate(url, requests_per_type, threads, cap_new_tokens, max_prompt_tokens, timeout, seed, gpu=gpu))
    except EvalTimeError as e:
        raise SystemExit(f"eval-time: error: {e}") from None
    print(render(report))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {out}")
    return report


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
