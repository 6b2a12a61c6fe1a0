"""bench.kv_reservation_sim, briefly: the HELM-like trace through both reservations answers every request and holds no block after.

On a pool where ``max_new_tokens`` up front starves concurrency, lazy gets more sequences in flight
and fewer steps (with preemptions); ``simulate`` itself raises if a block is still held afterwards.
"""

from __future__ import annotations

import json

import pytest

from bench.kv_reservation_sim import main, simulate, trace_jobs
from core.workload import build_trace


def test_both_policies_serve_the_trace_and_lazy_runs_more_at_once(tmp_path) -> None:
    report = main(out_dir=tmp_path, requests=40, cap_new_tokens=400, concurrency=[30], pool_tokens=3000)
    runs = report["results"]["c30"]
    assert runs["up_front"]["answered"] == runs["lazy"]["answered"] == 40
    assert runs["up_front"]["preemptions"] == 0 and runs["lazy"]["preemptions"] > 0
    assert runs["lazy_vs_up_front"]["mean_sequences_in_flight"] > 1.1 and runs["lazy_vs_up_front"]["steps"] < 0.95
    assert json.loads((tmp_path / "kv_reservation_sim.json").read_text())["results"]["c30"]["lazy"] == runs["lazy"]


def test_the_trace_in_tokens_shares_a_run_spec_prefix_and_fits_the_window() -> None:
    trace = build_trace(20, 3, workload="all", cap_new_tokens=64)
    jobs = trace_jobs(trace, "max")
    for r, (ids, max_new, new) in zip(trace, jobs):
        assert len(ids) + max_new <= 2048 and new == max_new == r.body["max_new_tokens"]
    expected = trace_jobs(trace, "expected")
    assert all(new <= max_new for _, max_new, new in expected) and any(new < max_new for _, max_new, new in expected)
    same = [i for i in range(1, len(trace)) if trace[i].group == trace[0].group and trace[0].prefix_tokens]
    assert same and jobs[same[0]][0][: trace[0].prefix_tokens] == jobs[0][0][: trace[0].prefix_tokens]
    with pytest.raises(RuntimeError, match="not done after"):
        simulate(jobs, 4, "lazy", 5008, 16, 32, 4096, max_steps=3)
