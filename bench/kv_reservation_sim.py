"""The HELM-like trace through the scheduler under both KV reservations, model-free: steps and sequences in flight.

    python -m bench.kv_reservation_sim --out_dir out/bench             (Llama-2-7B @ 24 GiB pool, c=4 and c=30)

No model and no tensors: ``server.scheduler`` and ``server.kv_pool`` as the engine drives them, with a
step doing what the engine does with the scheduler's answer (prefill chunks, recompute of resumed
requests, one decode token per sequence). The trace is ``core.workload.build_trace`` as
``bench.serve`` / ``bench.serve_tracks`` build it (workload "all", HELM order, ``cap_new_tokens``), in
tokens: a request's prompt is its run spec's shared prefix (``prefix_tokens``, the same ids for the
whole group, so the prefix index shares them as it would on the GPU) and then its own tokens, to
``prompt_tokens`` in all. Each request generates ``max_new_tokens`` (as random weights do: they never
stop) or, with ``--lengths expected``, HELM's expected count. ``c`` clients each send the next request
of the trace when their previous one is answered (the closed loop of ``bench.serve.replay``).

Reported per policy and concurrency: engine steps to serve the trace, mean and max sequences in
flight, mean decode batch, preemptions, prompt tokens computed and generated tokens recomputed; then
lazy / up_front ratios. A step is not a fixed time (prefill steps cost more than decode steps, and a
recompute is extra prefill), so this says how much concurrency each policy gets on a pool, not
requests/s: that is the GPU run of ``bench.serve_tracks --kv_reservation lazy``. The default pool is
what the server sized on the H200 capped at 24 GiB for Llama-2-7B (5,008 tokens = 313 blocks of 16,
BENCHMARKS.md "Issue 14").
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

from core.workload import HELM_CONCURRENCY, HELM_RUN_THREADS, HELM_WINDOW, TraceRequest, build_trace
from server.kv_pool import KVPool
from server.scheduler import KV_RESERVATIONS, Job, Scheduler

LLAMA2_24GIB_TOKENS = 5008  # the KV pool the server sized for Llama-2-7B bf16 under a 24 GiB cap
VOCAB = 32000


def trace_jobs(trace: list[TraceRequest], lengths: str, window: int = HELM_WINDOW) -> list[tuple[list[int], int, int]]:
    """(prompt ids, max_new_tokens, tokens generated) per request: a group's prefix ids are shared, the rest unique."""
    prefixes: dict[str, list[int]] = {}
    jobs = []
    for i, r in enumerate(trace):
        if r.group not in prefixes:
            rng = random.Random(f"prefix:{r.group}")
            prefixes[r.group] = [rng.randrange(1, VOCAB) for _ in range(window)]
        prefix = prefixes[r.group][: r.prefix_tokens]
        rng = random.Random(f"request:{i}")
        ids = prefix + [rng.randrange(1, VOCAB) for _ in range(max(1, r.prompt_tokens - len(prefix)))]
        max_new = r.body["max_new_tokens"]
        new = max_new if lengths == "max" else max(1, min(max_new, r.expected_new_tokens))
        ids = ids[-(window - max_new) :]  # the server's left truncation (fit_prompt)
        jobs.append((ids, max_new, new))
    return jobs


def simulate(jobs: list[tuple[list[int], int, int]], concurrency: int, reservation: str, pool_tokens: int, block_size: int,
             max_batch: int, prefill_tokens: int, max_steps: int = 10_000_000) -> dict:  # fmt: skip
    """Serve ``jobs`` with ``concurrency`` closed-loop clients; the counts of the run."""
    pool = KVPool(pool_tokens // block_size + 1, block_size)
    s = Scheduler(pool, max_batch, prefill_tokens, reservation=reservation)
    pending = iter(jobs)
    generated: dict[Job, int] = {}
    target: dict[Job, int] = {}
    answered = steps = sequences = decoded = decode_steps = max_sequences = computed = recomputed = refused = 0

    def send() -> None:
        nxt = next(pending, None)
        if nxt is not None:
            job = Job(nxt[0], 1, nxt[1])  # what up_front reserves for: the request's max_new_tokens
            target[job] = nxt[2]
            s.add(job)

    def done(job: Job) -> None:
        nonlocal answered
        s.finish(job)
        answered += 1
        send()

    for _ in range(concurrency):
        send()
    while s.busy:
        if steps >= max_steps:
            raise RuntimeError(f"{reservation} at c={concurrency}: not done after {max_steps} steps")
        step = s.schedule()
        steps += 1
        for _ in step.refused:
            refused += 1
            answered += 1
            send()
        sequences += s.sequences
        max_sequences = max(max_sequences, s.sequences)
        for job, _, take in step.prefill:
            computed += take
            if s.computed(job, take):
                if job.resumed:
                    s.fork(job)
                elif job.forks:
                    s.fork(job)
                    generated[job] = 1
                else:
                    done(job)
        for job, _, take in step.recompute:
            recomputed += take * job.n
            s.recomputed(job, take)
        batch = [job for job in s.running if job.state == "decode"]
        if batch:
            decode_steps += 1
            decoded += sum(job.n for job in batch)
        for job in batch:
            job.pos += 1
            generated[job] += 1
            if generated[job] >= target[job]:
                done(job)
    if pool.held:
        raise RuntimeError(f"{reservation} at c={concurrency}: {pool.held} KV blocks still held after the trace")
    return {
        "steps": steps,
        "mean_sequences_in_flight": round(sequences / steps, 2),
        "max_sequences_in_flight": max_sequences,
        "mean_decode_batch": round(decoded / max(decode_steps, 1), 2),
        "decode_steps": decode_steps,
        "preemptions": s.preemptions,
        "prompt_tokens_computed": computed,
        "generated_tokens_recomputed": recomputed,
        "answered": answered,
        "refused": refused,
    }


def main(
    out_dir: Path = Path("out/bench"),
    requests: int = 60,
    cap_new_tokens: int | None = 64,
    seed: int = 0,
    concurrency: list[int] = [HELM_RUN_THREADS, HELM_CONCURRENCY],
    pool_tokens: int = LLAMA2_24GIB_TOKENS,
    block_size: int = 16,
    max_batch: int = 32,
    prefill_tokens: int = 4096,
    lengths: Literal["max", "expected"] = "max",
) -> dict:
    """Replay the trace under ``up_front`` and ``lazy``; print and write ``kv_reservation_sim.json``.

    Args:
        out_dir: where the JSON goes.
        requests: trace length per concurrency (as ``bench.serve_tracks --requests``).
        cap_new_tokens: cap on generated tokens (as ``bench.serve_tracks``; random weights never stop); None:
            HELM's own max_tokens per request type (up to 400: summarization, math_cot).
        seed: trace seeds are seed+3 (c=4), seed+2 (c=30), seed+1 (c=1), as in ``bench.serve``.
        concurrency: the closed-loop client counts to replay.
        pool_tokens: the KV pool's size in tokens (default: Llama-2-7B bf16 at 24 GiB).
        block_size: tokens per KV block (the server's --kv_block_size).
        max_batch: sequences in flight at most (the server's --max_batch).
        prefill_tokens: prompt tokens per step (the server's --prefill_tokens).
        lengths: "max" (every request generates its max_new_tokens, as random weights do) or
            "expected" (HELM's expected new tokens, as a trained model that stops would).
    """
    from bench.serve import SEED_OFFSETS

    unknown = [c for c in concurrency if c not in SEED_OFFSETS]
    if unknown:
        raise ValueError(f"concurrency: {unknown} has no trace seed in bench.serve; choose from {sorted(SEED_OFFSETS)}")
    report = {"date": time.strftime("%Y-%m-%d"), "requests": requests, "cap_new_tokens": cap_new_tokens, "lengths": lengths,
              "pool_tokens": pool_tokens, "block_size": block_size, "max_batch": max_batch, "prefill_tokens": prefill_tokens,
              "results": {}}  # fmt: skip
    for c in concurrency:
        trace = build_trace(requests, seed + SEED_OFFSETS[c], workload="all", cap_new_tokens=cap_new_tokens, max_prompt_tokens=HELM_WINDOW)
        jobs = trace_jobs(trace, lengths)
        runs = {r: simulate(jobs, c, r, pool_tokens, block_size, max_batch, prefill_tokens) for r in KV_RESERVATIONS}
        up, lazy = runs["up_front"], runs["lazy"]
        runs["lazy_vs_up_front"] = {
            "steps": round(lazy["steps"] / up["steps"], 3),
            "mean_sequences_in_flight": round(lazy["mean_sequences_in_flight"] / up["mean_sequences_in_flight"], 3),
            "mean_decode_batch": round(lazy["mean_decode_batch"] / up["mean_decode_batch"], 3),
        }
        report["results"][f"c{c}"] = runs
        print(f"c={c}: " + "; ".join(f"{name} {json.dumps(v)}" for name, v in runs.items()), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kv_reservation_sim.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
