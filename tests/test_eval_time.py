"""make eval-time: the HELM-like trace (core.workload), the projection, and the CLI against the tiny server."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core.paths import REPO_ROOT
from core.workload import (
    GREEDY_TEMPERATURE,
    HELM_WINDOW,
    SAMPLE_CONF_INSTANCES,
    SAMPLE_CONF_SPECS,
    SETS,
    TYPES,
    allocate,
    build_trace,
    calibrate_tokens_per_word,
    project,
)
from submission import eval_time, helm_model

HELM_FIELDS = {
    "prompt", "temperature", "num_return_sequences", "max_new_tokens",
    "top_p", "echo_prompt", "top_k_per_token", "stop_sequences",
}  # fmt: skip
LIMITS = {"sample": 120 * 60, "open": 300 * 60, "closed": 600 * 60}
FIXTURES = Path(__file__).parent / "fixtures"
BIG_BENCH_GENERATIVE = {"auto_debugging", "linguistics_puzzles", "operators", "repeat_copy_logic"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# The trace


def test_set_counts_follow_their_derivation():
    sample, open_, closed = SETS["sample"], SETS["open"], SETS["closed"]
    assert sum(sample.instances.values()) == 600  # the conf's "600 budget"
    assert sample.requests["mmlu"] == 5 * 216  # canonical augmentation
    assert sample.requests["big_bench_mc"] == 4 * 257 and sample.requests["big_bench_gen"] == 4 * 72  # shots 0-3
    assert sample.total_requests == 2451
    assert sum(open_.instances.values()) == 2000 and open_.instances["gsm"] == 61
    assert closed.instances == {
        "summarization_samsum": 1000, "corr2cause": 1000, "ethics": 1000, "math_cot": 994, "summarization_cnndm": 1000,
    }  # fmt: skip
    assert closed.total_requests == 4994
    assert {name: s.limit_s for name, s in SETS.items()} == LIMITS


def test_sample_counts_match_the_shipped_conf():
    """The embedded constants equal what the repo's copy of the sample conf says."""
    copies = (REPO_ROOT / "data/helm/run_specs_challenge.conf", FIXTURES / "run_specs_full_coarse_600_budget.conf")
    conf = next((p for p in copies if p.exists()), None)
    if conf is None:
        pytest.skip("no copy of the sample conf in this checkout")
    instances: Counter[str] = Counter()
    specs: Counter[str] = Counter()
    for description in re.findall(r'description: "([^"]+)"', conf.read_text()):
        name, args = description.split(":", 1)
        kv = dict(a.split("=", 1) for a in args.split(","))
        if name == "big_bench":
            assert kv["max_train_instances"] == "big_bench_few_shot_setting"
            name = "big_bench_gen" if kv["task"] in BIG_BENCH_GENERATIVE else "big_bench_mc"
        if name == "mmlu":
            assert kv["data_augmentation"] == "canonical"
        instances[name] += int(kv["max_eval_instances"])
        specs[name] += 1
    assert dict(instances) == SAMPLE_CONF_INSTANCES
    assert dict(specs) == SAMPLE_CONF_SPECS


def test_allocate_is_proportional_and_exact():
    assert allocate({"a": 3, "b": 1}, 8) == {"a": 6, "b": 2}
    assert allocate({"a": 3, "b": 1, "c": 0}, 10, min_per_type=1) == {"a": 7, "b": 3}  # 1 each, then 6:2
    assert sum(allocate(SETS["open"].requests, 997).values()) == 997
    with pytest.raises(ValueError):
        allocate({"a": 1, "b": 1}, 3, min_per_type=2)


def test_build_trace_proportions_and_bodies():
    full = build_trace(SETS["sample"].total_requests, seed=0, workload="sample")
    assert Counter(r.type for r in full) == SETS["sample"].requests

    trace = build_trace(1000, seed=3, workload="closed", cap_new_tokens=16)
    counts = Counter(r.type for r in trace)
    total = SETS["closed"].total_requests
    for t, n in SETS["closed"].requests.items():
        assert abs(counts[t] - 1000 * n / total) <= 1
    for r in trace:
        t = TYPES[r.type]
        assert set(r.body) == HELM_FIELDS
        assert r.body["num_return_sequences"] == 1 and r.body["echo_prompt"] is False and r.body["top_p"] == 1.0
        assert r.body["stop_sequences"] == list(t.stop_sequences)
        assert r.body["temperature"] == (GREEDY_TEMPERATURE if t.temperature == 0 else t.temperature)
        assert r.body["max_new_tokens"] == min(t.max_new_tokens, 16) and r.max_new_tokens == t.max_new_tokens
        assert r.prompt_tokens <= HELM_WINDOW - t.max_new_tokens  # fitted as HELM fits it
        assert 0 < r.prefix_tokens < r.prompt_tokens
    assert {r.body["temperature"] for r in trace if r.type.startswith("summarization")} == {0.3}


def test_build_trace_is_deterministic():
    a = build_trace(200, seed=7, workload="open")
    b = build_trace(200, seed=7, workload="open")
    c = build_trace(200, seed=8, workload="open")
    assert [r.body for r in a] == [r.body for r in b]
    assert [r.body["prompt"] for r in a] != [r.body["prompt"] for r in c]
    shuffled = build_trace(200, seed=7, workload="open", order="shuffled")
    assert sorted(r.body["prompt"] for r in shuffled) == sorted(r.body["prompt"] for r in a)
    assert [r.body["prompt"] for r in shuffled] != [r.body["prompt"] for r in a]


def test_build_trace_min_per_type_covers_every_type():
    trace = build_trace(3 * len(TYPES), seed=0, workload="all", min_per_type=3)
    assert Counter(r.type for r in trace) == {t: 3 for t in TYPES}


def test_groups_share_their_prefix_and_augmented_copies_come_together():
    trace = build_trace(400, seed=1, workload="sample")
    by_group: dict[tuple[str, int], list[str]] = {}
    for r in trace:
        head = r.body["prompt"].rsplit("\n\n", 1)[0] if r.shots else ""
        by_group.setdefault((r.group, r.shots), []).append(head)
    shared = [heads for heads in by_group.values() if len(heads) > 1 and heads[0]]
    assert shared, "some run spec should have several requests"
    assert all(len(set(heads)) == 1 for heads in shared)
    # MMLU: each instance is sent 5 times (canonical augmentation), as slight variants.
    mmlu = [r for r in trace if r.type == "mmlu"]
    per_instance = Counter((r.group, r.instance) for r in mmlu)
    assert max(per_instance.values()) == 5
    first = next(k for k, v in per_instance.items() if v == 5)
    variants = [r.body["prompt"] for r in mmlu if (r.group, r.instance) == first]
    assert len(set(variants)) > 1 and len({len(v.split()) for v in variants}) == 1


def test_prompt_sizes_match_their_targets_with_the_tiny_tokenizer(make_tiny_checkpoint):
    from server.text import Codec

    codec = Codec(make_tiny_checkpoint())
    tpw = calibrate_tokens_per_word(lambda text: len(codec.encode(text)))
    assert 1.0 <= tpw < 4.0
    trace = build_trace(4 * len(TYPES), seed=0, workload="all", tokens_per_word=tpw, min_per_type=4)
    for r in trace:
        actual = len(codec.encode(r.body["prompt"]))
        assert abs(actual - r.prompt_tokens) <= 0.1 * r.prompt_tokens + 10, (r.type, actual, r.prompt_tokens)
    means = {t: sum(r.prompt_tokens for r in trace if r.type == t) / 4 for t in TYPES}
    assert means["math_cot"] > 1000 and means["summarization_cnndm"] > 1000  # 8-shot / long articles
    assert means["big_bench_gen"] < means["gsm"] < means["math_cot"]


# --------------------------------------------------------------------------------------------------
# The projection


def test_project_arithmetic():
    assert project({"mc": 0.05, "gen": 2.0}, {"mc": 1000, "gen": 30}) == pytest.approx(50 + 60)
    assert project({"mc": 0.05}, {"mc": 10, "unused": 0}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gen"):
        project({"mc": 0.05}, {"mc": 10, "gen": 1})
    with pytest.raises(ValueError):
        project({"mc": math.nan}, {"mc": 1})


def _phase(latency_mean_s: float, generated: float, max_new: int) -> dict:
    return {"latency_mean_s": latency_mean_s, "mean_generated_tokens": generated, "max_new_tokens": max_new}


def test_request_cost_extrapolates_per_generated_token():
    # GSM8K: 0.1 s at 1 token, 0.41 s at 32 tokens -> 10 ms per extra token.
    cost = eval_time.request_cost("gsm", _phase(0.1, 1, 1), _phase(0.41, 32, 32))
    assert cost["seconds_per_generated_token"] == pytest.approx(0.01)
    assert cost["prefill_s"] == 0.1 and cost["decode_expected_s"] == pytest.approx(0.01 * (120 - 1))
    assert cost["expected_s"] == pytest.approx(0.1 + 0.01 * (120 - 1))
    assert cost["worst_case_s"] == pytest.approx(0.1 + 0.01 * (400 - 1))
    assert not cost["notes"]
    mc = eval_time.request_cost("mmlu", _phase(0.2, 1, 1), None)
    assert mc["expected_s"] == mc["worst_case_s"] == 0.2 and mc["decode_expected_s"] == 0.0
    stopped = eval_time.request_cost("gsm", _phase(0.1, 1, 1), _phase(0.12, 1, 32))  # model stopped at once
    assert stopped["seconds_per_generated_token"] == pytest.approx(0.12) and stopped["notes"]


# --------------------------------------------------------------------------------------------------
# helm-run's schedule (submission.helm_model)


def test_run_specs_are_derived_from_the_shipped_conf(tmp_path):
    """The sample set is the shipped 600-budget conf as helm-run expands it: 88 entries of 3 to 19
    instances, BIG-bench x4 shot settings, MMLU x5 canonical perturbations."""
    from core.run_specs import read_conf

    entries = read_conf(helm_model.SAMPLE_CONF)
    assert len(entries) == 88
    assert {int(e.args["max_eval_instances"]) for e in entries} <= set(range(3, 20))
    assert min(int(e.args["max_eval_instances"]) for e in entries) == 3 and max(int(e.args["max_eval_instances"]) for e in entries) == 19
    assert helm_model.BIG_BENCH_GENERATIVE <= {e.args["task"] for e in entries if e.scenario == "big_bench"}
    specs = helm_model.sets_specs()
    big_bench = sum(e.scenario == "big_bench" for e in entries)
    assert len(specs["sample"]) == len(entries) - big_bench + 4 * big_bench
    for name, set_specs in specs.items():  # the same requests as core.workload's counts for each set
        assert helm_model.requests_by_type(set_specs) == {t: n for t, n in SETS[name].requests.items() if n}
    conf = tmp_path / "x.conf"
    conf.write_text('entries: [\n  {description: "wikifact:k=v,max_eval_instances=3", priority: 1}\n]\n')
    with pytest.raises(ValueError, match=r"x\.conf:2: scenario 'wikifact'"):
        helm_model.conf_specs(conf)


def test_spec_makespan_is_helm_runs_thread_pool():
    assert helm_model.spec_makespan([1.0] * 5, threads=4) == 2.0  # 4 at once, then the fifth alone
    assert helm_model.spec_makespan([3.0, 1.0, 1.0, 1.0], threads=2) == 3.0  # the slow one holds the barrier
    assert helm_model.spec_makespan([], threads=4) == 0.0
    specs = [helm_model.RunSpec(f"s{i}", "mmlu", 5, 5) for i in range(3)]
    flat = lambda t, i: 1.0  # noqa: E731
    assert helm_model.project(specs, flat, threads=4) == 6.0  # 3 specs x 2 rounds
    assert helm_model.project_without_barriers(specs, flat, threads=4) == 4.0  # 15 requests pooled: ceil(15/4)
    with pytest.raises(ValueError, match="threads"):
        helm_model.spec_makespan([1.0], threads=0)


def test_cards_and_the_estimate():
    assert helm_model.card_from_device("NVIDIA GeForce RTX 4090", 23.6) == "rtx4090"
    assert helm_model.card_from_device("NVIDIA A100-SXM4-40GB", 39.4) == "a100_40gb"
    assert helm_model.card_from_device("NVIDIA A100-SXM4-80GB", 79.2) == "a100_80gb"
    assert helm_model.card_from_device("NVIDIA H200", 139.8) == "h200" and helm_model.card_from_device("Tesla T4", 15) is None
    assert helm_model.other_cards("rtx4090") == ["a100_40gb"] and helm_model.other_cards("h200") == ["rtx4090", "a100_40gb"]
    # prefill scales by compute (312/165), decode by bandwidth (1555/1008)
    assert helm_model.scale_to_card(1.0, 1.0, "a100_40gb", "rtx4090") == pytest.approx(312 / 165 + 1555 / 1008)
    assert set(eval_time.GPU.__args__) == {"auto", "none", *helm_model.CARDS}


# --------------------------------------------------------------------------------------------------
# Against the tiny model's server (real app, CPU)


def _check_report(report: dict) -> None:
    assert set(report["sets"]) == set(LIMITS) and report["threads"] == 4  # helm-run's default
    for name, s in report["sets"].items():
        assert s["limit_s"] == LIMITS[name]
        assert math.isfinite(s["projected_s"]) and s["projected_s"] > 0
        assert s["worst_case_s"] >= s["projected_s"]
        assert s["total_requests"] == SETS[name].total_requests == sum(s["requests"].values())
        assert s["within_limit"] == (s["projected_s"] <= s["limit_s"])
    assert set(report["types"]) == set(TYPES)
    for name, r in report["types"].items():
        first = r["phases"]["first_token"]
        assert first["ok"] == first["requests"] >= 1 and first["requests_per_s"] > 0
        assert 0 < first["latency_p50_s"] <= first["latency_p99_s"]
        assert math.isfinite(r["cost"]["expected_s"]) and r["cost"]["expected_s"] > 0
        if TYPES[name].max_new_tokens > 1:
            capped = r["phases"]["capped"]
            assert capped["max_new_tokens"] == 4 and capped["mean_generated_tokens"] > 1
            assert r["cost"]["seconds_per_generated_token"] >= 0
        else:
            assert "capped" not in r["phases"]
    assert report["errors"] == 0 and report["tokens_per_word"] > 0
    json.dumps(report, allow_nan=False)


def test_eval_time_against_the_tiny_server(make_tiny_checkpoint, serve, tmp_path, monkeypatch, capsys):
    app = serve(make_tiny_checkpoint()).app
    evaluate = eval_time.evaluate

    def through_app(*args, **kwargs):
        return evaluate(*args, **kwargs, transport=httpx.ASGITransport(app=app))

    monkeypatch.setattr(eval_time, "evaluate", through_app)
    out = tmp_path / "eval_time.json"
    report = eval_time.main(url="http://test", requests_per_type=1, cap_new_tokens=4, gpu="h200", out=out)
    _check_report(report)
    assert report["requests_sent"] == len(TYPES) + sum(t.max_new_tokens > 1 for t in TYPES.values())
    assert json.loads(out.read_text())["sets"].keys() == report["sets"].keys()
    printed = capsys.readouterr().out
    for s in report["sets"].values():
        line = next(line for line in printed.splitlines() if line.startswith(s["title"]))
        assert ("OK" if s["within_limit"] else "OVER") in line
        # The measured requests, scheduled as helm-run does: many small specs, each waiting for its slowest
        # request, take longer than the same requests in one pool; 4 threads take longer than 30.
        assert s["projected_s"] > s["no_barrier_s"]
        assert set(s["estimates"]) == {"rtx4090", "a100_40gb"}
        for e in s["estimates"].values():
            assert e["label"].startswith("estimate") and e["projected_s"] > s["projected_s"]  # both slower than an H200
    at_30 = eval_time.project_sets(report["types"], threads=30)
    for name, s in report["sets"].items():
        assert s["projected_s"] > at_30[name]["projected_s"], name
    assert "assumption:" in printed and "GSM8K ~120" in printed and "ESTIMATE (estimate, not a measurement" in printed
    assert "helm-run with -n 4 on H200" in printed


def test_measure_runs_concurrently_through_the_app(make_tiny_checkpoint, serve):
    app = serve(make_tiny_checkpoint()).app
    trace = build_trace(6, seed=0, workload="sample", types=["gsm"], cap_new_tokens=3, max_prompt_tokens=600)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await eval_time.measure(client, trace, concurrency=30, cap_new_tokens=3)

    results = asyncio.run(go())
    gsm = results["gsm"]
    assert gsm["requests"] == 6 and gsm["phases"]["first_token"]["in_flight"] == 6
    assert gsm["phases"]["capped"]["mean_generated_tokens"] <= 3


def test_unreachable_server_is_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exc:
        eval_time.main(url=url, out=out)
    assert "cannot reach the server" in str(exc.value.code) and url in str(exc.value.code)
    assert not out.exists()
    cli = subprocess.run(
        [sys.executable, "-m", "submission.eval_time", "--url", url, "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 1
    assert "cannot reach the server" in cli.stderr and "Traceback" not in cli.stderr
