"""How ``helm-run`` spends its time, so that ``make eval-time`` projects the eval as it really runs.

helm-run works through one run spec at a time. Within a spec, ``-n/--num-threads`` threads (default
4; the organizers' command does not set it) send the spec's requests, and the next spec starts only
after the spec's slowest request has answered: a barrier per spec. With many small specs (the 600-budget
conf has 88 entries of 3 to 19 instances; BIG-bench entries expand to 4 specs, 0 to 3 shots) the tail of
each spec, where fewer than ``threads`` requests are in flight, adds up.

This module holds no measurements and talks to no server:

* ``SETS_SPECS``: the run specs of each eval set. The sample set is derived from the shipped conf
  (``data/helm/run_specs_challenge.conf``, the organizers' run_specs_full_coarse_600_budget.conf); the
  open set is its specs with the per-type instance counts of ``core.workload.SETS["open"]``; the
  closed set is ``core.workload``'s closed-set specs with their instances split evenly.
* ``project``: the wall time of a set given each request's latency at ``threads`` in flight: per spec,
  requests go to the first free thread in order (helm-run's executor), the spec ends with its last
  request, and specs add up. ``project_without_barriers`` pools every request of the set instead.
* ``CARDS`` and ``scale_to_card``: an estimate for another GPU, prefill scaled by bf16 dense compute and
  decode by memory bandwidth (datasheet numbers). An estimate, labelled as one: it ignores everything
  else that differs (kernels, clocks, PCIe, the host).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.run_specs import HELM_CONF_DIR, read_conf
from core.workload import CLOSED_SET_INSTANCES, CLOSED_SET_SPECS, SETS, TYPES

SAMPLE_CONF = HELM_CONF_DIR / "run_specs_challenge.conf"
# BIG-bench tasks whose answers are generated text (max_tokens 64), not a choice among options: the
# tasks' own metadata (BIG-bench task.json "generative" metrics); every other conf task is multiple choice.
BIG_BENCH_GENERATIVE = frozenset({"auto_debugging", "linguistics_puzzles", "operators", "repeat_copy_logic"})
BIG_BENCH_SHOTS = (0, 1, 2, 3)  # max_train_instances=big_bench_few_shot_setting: HELM's run expander
SCENARIO_TYPES = {t: t for t in ("mmlu", "bbq", "truthful_qa", "gsm", "summarization_cnndm")}


@dataclass(frozen=True)
class RunSpec:
    """One run spec as helm-run executes it: its requests all of one type, then a barrier."""

    name: str
    type: str  # a core.workload request type
    instances: int
    requests: int  # instances x augmentation (MMLU's canonical perturbations send 5 per instance)


def _request_type(scenario: str, args: dict[str, str], where: str) -> str:
    if scenario == "big_bench":
        return "big_bench_gen" if args.get("task") in BIG_BENCH_GENERATIVE else "big_bench_mc"
    if scenario not in SCENARIO_TYPES:
        raise ValueError(
            f"{where}: scenario {scenario!r} has no request type in submission.helm_model (known: big_bench, {', '.join(SCENARIO_TYPES)})"
        )
    return SCENARIO_TYPES[scenario]


def conf_specs(conf: Path = SAMPLE_CONF) -> list[RunSpec]:
    """The run specs a conf makes helm-run execute, in its order (BIG-bench entries expanded by shots)."""
    specs = []
    for entry in read_conf(conf):
        where = f"{entry.conf}:{entry.line}"
        if "max_eval_instances" not in entry.args:
            raise ValueError(f"{where}: entry has no max_eval_instances")
        t = _request_type(entry.scenario, entry.args, where)
        instances = int(entry.args["max_eval_instances"])
        name = entry.scenario + ":" + ",".join(f"{k}={v}" for k, v in entry.args.items() if k != "max_eval_instances")
        shots = BIG_BENCH_SHOTS if entry.args.get("max_train_instances") == "big_bench_few_shot_setting" else (None,)
        for k in shots:
            augmentation = TYPES[t].augmentation if entry.args.get("data_augmentation") == "canonical" else 1
            specs.append(RunSpec(name + (f",shots={k}" if k is not None else ""), t, instances, instances * augmentation))
    return specs


def _split(total: int, parts: Sequence[int]) -> list[int]:
    """``total`` split over ``parts`` in proportion to their sizes (largest remainder), each at least 1."""
    weight = sum(parts)
    shares = [total * p / weight for p in parts]
    out = [max(1, int(s)) for s in shares]
    for i in sorted(range(len(parts)), key=lambda i: -(shares[i] - int(shares[i])))[: max(0, total - sum(out))]:
        out[i] += 1
    return out


def scaled_specs(specs: list[RunSpec], instances_by_type: dict[str, int]) -> list[RunSpec]:
    """The same specs with each type's instances rescaled to ``instances_by_type`` (the open set's larger caps)."""
    out = list(specs)
    for t, total in instances_by_type.items():
        idx = [i for i, s in enumerate(specs) if s.type == t]
        if not idx:
            raise ValueError(f"no run spec of type {t!r} to scale")
        per_entry = _split(
            total, [specs[i].instances for i in idx[:: len(BIG_BENCH_SHOTS)]] if t.startswith("big_bench") else [specs[i].instances for i in idx]
        )
        if t.startswith("big_bench"):  # the 4 shot settings of one entry share its instances
            per_entry = [n for n in per_entry for _ in BIG_BENCH_SHOTS]
        for i, n in zip(idx, per_entry):
            s = specs[i]
            out[i] = RunSpec(s.name, t, n, n * (s.requests // s.instances))
    return out


def closed_specs() -> list[RunSpec]:
    """The closed set: each type's instances split evenly over its specs (core.workload's counts)."""
    out = []
    for t, total in CLOSED_SET_INSTANCES.items():
        for k, n in enumerate(_split(total, [1] * CLOSED_SET_SPECS[t])):
            out.append(RunSpec(f"{t}/{k}", t, n, n * TYPES[t].requests_per_instance))
    return out


def sets_specs(conf: Path = SAMPLE_CONF) -> dict[str, list[RunSpec]]:
    sample = conf_specs(conf)
    return {"sample": sample, "open": scaled_specs(sample, SETS["open"].instances), "closed": closed_specs()}


def requests_by_type(specs: list[RunSpec]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for s in specs:
        counts[s.type] += s.requests
    return dict(counts)


def spec_makespan(latencies: Sequence[float], threads: int) -> float:
    """Wall time of one spec: each request, in order, goes to the first free thread; the spec ends with its last."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    free = [0.0] * min(threads, max(1, len(latencies)))
    end = 0.0
    for latency in latencies:
        start = heapq.heappop(free)
        end = max(end, start + latency)
        heapq.heappush(free, start + latency)
    return end


LatencyOf = Callable[[str, int], float]  # (request type, index within the spec) -> seconds at `threads` in flight


def _check(specs: list[RunSpec], latency_of: LatencyOf) -> None:
    for t in {s.type for s in specs}:
        value = latency_of(t, 0)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"latency of {t!r} requests must be finite and >= 0 seconds, got {value}")


def project(specs: list[RunSpec], latency_of: LatencyOf, threads: int) -> float:
    """helm-run's wall time for ``specs``: spec after spec, ``threads`` in flight within one, a barrier after each."""
    _check(specs, latency_of)
    return sum(spec_makespan([latency_of(s.type, i) for i in range(s.requests)], threads) for s in specs)


def project_without_barriers(specs: list[RunSpec], latency_of: LatencyOf, threads: int) -> float:
    """The same requests with no barriers: one pool kept ``threads`` in flight (what helm-run does not do)."""
    _check(specs, latency_of)
    return spec_makespan([latency_of(s.type, i) for s in specs for i in range(s.requests)], threads)


@dataclass(frozen=True)
class Card:
    """A GPU's datasheet numbers the estimate scales by."""

    name: str
    title: str
    bf16_tflops: float  # dense bf16 tensor throughput
    memory_gb_s: float  # memory bandwidth
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() (upper case) that identify it
    min_memory_gib: float = 0.0  # to tell the A100 40 GB from the 80 GB


CARDS: dict[str, Card] = {
    c.name: c
    for c in (
        Card("rtx4090", "RTX 4090 (24 GB)", 165.0, 1008.0, ("4090",)),
        Card("a100_40gb", "A100 40 GB", 312.0, 1555.0, ("A100",)),
        Card("a100_80gb", "A100 80 GB", 312.0, 2039.0, ("A100",), min_memory_gib=60.0),
        Card("h100", "H100 SXM (80 GB)", 989.0, 3350.0, ("H100",)),
        Card("h200", "H200 (141 GB)", 989.0, 4800.0, ("H200",)),
    )
}
TRACK_CARDS = ("rtx4090", "a100_40gb")  # the challenge's two tracks


def card_from_device(name: str, memory_gib: float) -> str | None:
    """The ``CARDS`` key of a CUDA device (its name and memory), or None when it is not one of them."""
    found = [c for c in CARDS.values() if any(m in name.upper() for m in c.match) and memory_gib >= c.min_memory_gib]
    return max(found, key=lambda c: c.min_memory_gib).name if found else None


def other_cards(ran_on: str | None) -> list[str]:
    """The track cards to estimate for: every track card but the one it ran on (the other track's, or both)."""
    return [c for c in TRACK_CARDS if c != ran_on]


def scale_to_card(prefill_s: float, decode_s: float, ran_on: str, target: str) -> float:
    """A request's estimated latency on ``target``: prefill by bf16 compute, decode by memory bandwidth."""
    a, b = CARDS[ran_on], CARDS[target]
    return prefill_s * a.bf16_tflops / b.bf16_tflops + decode_s * a.memory_gb_s / b.memory_gb_s
