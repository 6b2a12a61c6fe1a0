"""Serve each track's models on the track's memory: the HELM-like trace at concurrency 4 and 30 under a true cap.

    python -m bench.serve_tracks --out_dir $OUT --cases '[llama2-7b@24]'      (one case a device command, < 10 min)
    python -m bench.serve_tracks --out_dir $OUT --cases '[mistral-7b-uncapped]'  (the no-regression run, < 10 min)
    python -m bench.serve_tracks --out_dir $OUT --cases '[llama2-7b@24]' --kv_reservation '[up_front, lazy]'   (both, side by side)
    python -m bench.serve_tracks --out_dir $OUT --cases '[llama2-7b@24]' --attention_tokens '[0, 16384]'   (unbounded vs bounded attention)
    python -m bench.serve_tracks --out_dir $OUT --cases '[mistral-7b@24]' --compile_decode '[false, true]'   (eager vs compiled decode)

Each case is a litgpt config with random bf16 weights (speed and memory don't depend on values)
served by ``python -m server --gpu_memory_gib N`` in its own process: the server caps its CUDA
allocator at N GiB (``torch.cuda.set_per_process_memory_fraction``) before loading the weights, so
it cannot use more than an N GiB card would give it, and sizes its KV pool from a measured
worst-case step (``server.step_memory``); the server's one-line memory breakdown is kept.

Per case: requests/s and errors of the trace at c=4 (``helm-run``'s default) and c=30 (the
challenge's ``-n 30``), batch-1 decode tokens/s, the most sequences in flight at once, the pool's
size, and peak memory three ways: the allocator's peak (allocated and reserved, from the server's
/health) and the process's peak as ``nvidia-smi`` sees it (CUDA context included). The case's
work directory (its random checkpoint, 14-30 GB) is deleted afterwards, so one device disk holds
any case. Results go to ``$OUT/<case>.json`` with ``@`` written as ``_`` and a ``gib`` suffix
(``llama2-7b_24gib.json``: names with ``@`` don't come back from the device) and ``$OUT/serve_tracks.json``.

``mistral-7b-uncapped`` is the no-regression run instead: ``bench.serve`` on Mistral-7B uncapped,
ours against upstream litgpt (HF and the projection left out for time), checked against
``NO_REGRESSION`` (c=30 at least 15x litgpt, batch-1 decode at least 148 tokens/s).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx

from bench.serve import CONCURRENCIES, Server, _device_name, _free_port, batch1_decode, build_traces, prepare_checkpoint, replay, server_command
from core.gpu_memory import CUDA_CONTEXT_GIB
from core.workload import HELM_CONCURRENCY, HELM_RUN_THREADS
from server.scheduler import KVReservation

# case name -> (litgpt config, GiB): the track's card
CASES = {
    "llama2-7b@24": ("Llama-2-7b-hf", 24),
    "mistral-7b@24": ("Mistral-7B-v0.1", 24),
    "qwen2.5-14b@40": ("Qwen2.5-14B", 40),
    "qwen2.5-7b@24": ("Qwen2.5-7B", 24),
}
UNCAPPED = "mistral-7b-uncapped"  # the no-regression run of bench.serve
NO_REGRESSION = {"c30_vs_litgpt": 15.0, "batch1_decode_tokens_per_s": 148.0}


def file_stem(case: str) -> str:
    """``llama2-7b@24`` -> ``llama2-7b_24gib`` (the device's file transfer drops names with ``@``)."""
    name, _, gib = case.partition("@")
    return f"{name}_{gib}gib" if gib else name


class GpuMemoryPeak:
    """The largest GPU memory ``nvidia-smi`` reports for one process while a ``with`` block runs (MiB)."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s, self.peak_mib, self.error = pid, every_s, None, None
        self._stop = threading.Event()

    def __enter__(self) -> GpuMemoryPeak:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10, check=True,
                ).stdout  # fmt: skip
                for line in out.splitlines():
                    pid, used = (x.strip() for x in line.split(","))
                    if pid == str(self.pid):
                        self.peak_mib = max(self.peak_mib or 0, int(used))
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.every_s)


def run_case(case: str, out_dir: Path, work_dir: Path, requests: int, cap_new_tokens: int, decode_tokens: int, seed: int, device: str,
             kv_reservations: list[KVReservation] = ["lazy"], concurrency: tuple[int, ...] = (HELM_RUN_THREADS, HELM_CONCURRENCY),
             attention_tokens: list[int] | None = None, compile_decode: list[bool] | None = None) -> dict:  # fmt: skip
    """One case: its random checkpoint and traces built once, then one server per variant: each KV reservation
    policy, with each of ``attention_tokens`` and of ``compile_decode`` if given (None: the server's default, no flag).

    With one variant the entry is that server's; with several, ``by_reservation`` (policies only) or ``by_variant``
    holds each (named by ``variant_name``), served the same checkpoint and traces one after another in this
    process, and ``ratios`` compares each to the first."""
    variants = {
        variant_name(policy, tokens, compiled, kv_reservations, attention_tokens, compile_decode): (policy, tokens, compiled)
        for policy in kv_reservations for tokens in (attention_tokens or [None]) for compiled in (compile_decode or [None])
    }  # fmt: skip
    config_name, gib = CASES[case]
    case_dir = work_dir / case
    entry: dict = {"case": case, "model": f"{config_name} (random bf16 weights)", "gpu_memory_gib": gib}
    t0 = time.perf_counter()
    try:
        ckpt = prepare_checkpoint(config_name, None, case_dir)
        entry["prepare_s"] = round(time.perf_counter() - t0, 1)
        traces = build_traces(ckpt, requests, cap_new_tokens, seed)
        served = {
            name: serve_case(case, ckpt, traces, out_dir, case_dir, decode_tokens, device, policy, concurrency,
                             **({} if tokens is None else {"attention_tokens": tokens}),
                             **({} if compiled is None else {"compile_decode": compiled}))
            for name, (policy, tokens, compiled) in variants.items()
        }  # fmt: skip
    except Exception as e:  # one case failing still reports the others
        entry["error"] = f"{type(e).__name__}: {e}"
        served = {}
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
    first = next(iter(variants))
    if len(variants) == 1 and served:
        entry.update(served[first])
    elif served:
        entry["by_reservation" if attention_tokens is None and compile_decode is None else "by_variant"] = served
        entry["ratios"] = variant_ratios(served, first)
    entry["total_s"] = round(time.perf_counter() - t0, 1)
    return entry


def option_tags(tokens: int | None, compiled: bool | None) -> list[str]:
    """``att<N>`` for a --attention_tokens (``att0``: unbounded), ``compiled`` or ``eager`` for a --compile_decode; none unset."""
    return ([] if tokens is None else [f"att{tokens}"]) + ([] if compiled is None else ["compiled" if compiled else "eager"])


def variant_name(policy: KVReservation, tokens: int | None, compiled: bool | None, policies: list[KVReservation],
                 attention_tokens: list[int] | None, compile_decode: list[bool] | None = None) -> str:  # fmt: skip
    """A variant's name in the report: the policy (unless only the other options vary), then its ``option_tags``."""
    parts = [policy] if (attention_tokens is None and compile_decode is None) or len(policies) > 1 else []
    return "_".join(parts + option_tags(tokens, compiled))


def variant_ratios(served: dict[str, dict], base: str) -> dict:
    """requests/s and batch-1 decode of each variant over ``base``'s (served the same checkpoint and traces)."""

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    ratios = {}
    for policy, entry in served.items():
        if policy == base or "summary" not in entry or "summary" not in served[base]:
            continue
        mine, theirs = entry["summary"], served[base]["summary"]
        ratios[f"{policy}_vs_{base}"] = {
            **{c: ratio(mine["requests_per_s"][c], theirs["requests_per_s"][c]) for c in mine["requests_per_s"]},
            "batch1_decode": ratio(mine["batch1_decode_tokens_per_s"], theirs["batch1_decode_tokens_per_s"]),
        }
    return ratios


def serve_case(case: str, ckpt: Path, traces: dict, out_dir: Path, case_dir: Path, decode_tokens: int, device: str,
               kv_reservation: KVReservation, concurrency: tuple[int, ...] = (HELM_RUN_THREADS, HELM_CONCURRENCY),
               attention_tokens: int | None = None, compile_decode: bool | None = None) -> dict:  # fmt: skip
    """Start the capped server with one KV reservation policy (and ``--attention_tokens``, ``--compile_decode``
    unless None: the server's default), replay the traces, read its memory; its entry."""
    gib = CASES[case][1]
    entry: dict = {"kv_reservation": kv_reservation}
    args = ["--gpu_memory_gib", str(gib), "--kv_reservation", kv_reservation]
    if attention_tokens is not None:
        entry["attention_tokens"] = attention_tokens
        args += ["--attention_tokens", str(attention_tokens)]
    if compile_decode is not None:
        entry["compile_decode"] = compile_decode
        args += ["--compile_decode", str(compile_decode).lower()]
    try:
        port = _free_port()
        command = server_command("ours", ckpt, port, device, case_dir, ours_args=args)
        log = out_dir / ("_".join(["server", file_stem(case), kv_reservation, *option_tags(attention_tokens, compile_decode)]) + ".log")
        with Server(command, port, log) as server, GpuMemoryPeak(server.process.pid) as smi:
            entry["startup_s"] = round(server.startup_s, 1)
            asyncio.run(replay(server.url, traces[1][:2], 1))  # warm-up
            entry["batch1_decode"] = batch1_decode(server.url, decode_tokens)
            for c in concurrency:
                result = asyncio.run(replay(server.url, traces[c], c))
                result.pop("_texts", None)
                entry[f"c{c}"] = result
            engine = httpx.get(server.url + "/health", timeout=30).json().get("engine", {})
        block = engine.get("kv_block_size", 0)
        entry["engine"] = engine
        entry["summary"] = {
            "requests_per_s": {f"c{c}": entry[f"c{c}"]["requests_per_s"] for c in concurrency},
            "errors": sum(entry[f"c{c}"]["errors"] for c in concurrency),
            "batch1_decode_tokens_per_s": entry["batch1_decode"]["tokens_per_s"],
            "max_sequences_in_flight": engine.get("max_sequences"),
            "preempted": engine.get("preempted"),
            "kv_pool_tokens": engine.get("kv_blocks", 0) * block,
            "peak_allocated_gib": engine.get("gpu_peak_allocated_gib"),
            "peak_reserved_gib": engine.get("gpu_peak_reserved_gib"),
            "peak_process_gib_nvidia_smi": round(smi.peak_mib / 1024, 2) if smi.peak_mib else None,
            # the whole process must fit the card: nvidia-smi's peak (CUDA context included), else reserved + context
            "under_cap": (smi.peak_mib / 1024 if smi.peak_mib else (engine.get("gpu_peak_reserved_gib") or 0) + CUDA_CONTEXT_GIB) <= gib,
        }
        if smi.error:
            entry["summary"]["nvidia_smi_error"] = smi.error
        entry["summary"]["memory"] = next((line for line in log.read_text().splitlines() if line.startswith("memory: ")), None)
    except Exception as e:  # one policy failing still reports the other
        entry["error"] = f"{type(e).__name__}: {e}"
    return entry


def no_regression(out_dir: Path, work_dir: Path, decode_tokens: int, seed: int, device: str) -> dict:
    """``bench.serve`` uncapped on Mistral-7B, ours against upstream litgpt, checked against ``NO_REGRESSION``."""
    from bench.serve import main as serve

    t0 = time.perf_counter()
    try:
        report = serve(out_dir=out_dir, model="Mistral-7B-v0.1", work_dir=work_dir, servers=["ours", "litgpt"], requests=32,
                       decode_tokens=decode_tokens, projection_requests_per_type=0, device=device, seed=seed)  # fmt: skip
        measured = {
            "c30_vs_litgpt": report["ratios"].get(f"c{HELM_CONCURRENCY}_requests_per_s_vs_litgpt"),
            "batch1_decode_tokens_per_s": (report["servers"]["ours"].get("batch1_decode") or {}).get("tokens_per_s"),
        }
        met = {k: v is not None and v >= NO_REGRESSION[k] for k, v in measured.items()}
        entry = {"case": UNCAPPED, "summary": {"target": NO_REGRESSION, "measured": measured, "met": met}, "serve": report}
    except Exception as e:
        entry = {"case": UNCAPPED, "error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    entry["total_s"] = round(time.perf_counter() - t0, 1)
    return entry


def main(
    out_dir: Path = Path("out/bench"),
    cases: list[str] = list(CASES),
    work_dir: Path = Path("/tmp/bench_serve_tracks"),
    requests: int = 60,
    cap_new_tokens: int = 64,
    decode_tokens: int = 128,
    seed: int = 0,
    device: str = "cuda",
    kv_reservation: list[KVReservation] = ["lazy"],
    concurrency: list[int] = [HELM_RUN_THREADS, HELM_CONCURRENCY],
    attention_tokens: list[int] | None = None,
    compile_decode: list[bool] | None = None,
) -> dict:
    """Run the cases one after another; print and write the JSON.

    Args:
        out_dir: where the JSON and the servers' logs go.
        cases: which of ``CASES`` (or ``mistral-7b-uncapped``) to run; one case per device command stays under 10 min.
        work_dir: scratch space for each case's random checkpoint (deleted after the case).
        requests: trace length per concurrency.
        cap_new_tokens: cap on generated tokens in the traces (random weights never stop on their own).
        decode_tokens: new tokens for the batch-1 decode measurement.
        seed: trace seeds, as in ``bench.serve``.
        device: passed to the server.
        kv_reservation: the server's --kv_reservation for the capped cases: one policy, or several served one after
            another on the same checkpoint and traces, with ratios to the first (``'[up_front, lazy]'``).
        concurrency: the closed-loop client counts each capped server replays, from ``bench.serve``'s traces
            (HELM's default 4 and the challenge's 30; ``'[30]'`` where only the full pool matters).
        attention_tokens: the server's --attention_tokens for the capped cases: unset, its default (no flag); a list,
            each served (with each --kv_reservation) one after another on the same checkpoint and traces, with
            ratios to the first (``'[0, 16384]'``: unbounded, then bounded; named ``att0``, ``att16384``).
        compile_decode: the server's --compile_decode for the capped cases, like ``attention_tokens`` (``'[false, true]'``:
            eager, then compiled; named ``eager``, ``compiled``).
    """
    unknown = [c for c in cases if c not in CASES and c != UNCAPPED]
    if unknown:
        raise ValueError(f"cases: unknown {unknown}; choose from {[*CASES, UNCAPPED]}")
    if not concurrency or not set(concurrency) <= set(CONCURRENCIES):
        raise ValueError(f"concurrency: choose from {list(CONCURRENCIES)} (the traces bench.serve builds), got {concurrency}")
    if not kv_reservation or len(set(kv_reservation)) != len(kv_reservation):
        raise ValueError(f"kv_reservation: give one or more distinct policies, got {kv_reservation}")
    if attention_tokens is not None and (not attention_tokens or len(set(attention_tokens)) != len(attention_tokens) or min(attention_tokens) < 0):
        raise ValueError(f"attention_tokens: give one or more distinct budgets, each at least 0 (0: unbounded), got {attention_tokens}")
    if compile_decode is not None and (not compile_decode or len(set(compile_decode)) != len(compile_decode)):
        raise ValueError(f"compile_decode: give false, true or both, each once, got {compile_decode}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": _device_name(device), "date": time.strftime("%Y-%m-%d"), "requests": requests, "cap_new_tokens": cap_new_tokens,
              "kv_reservation": kv_reservation, "attention_tokens": attention_tokens, "compile_decode": compile_decode, "cases": {}}  # fmt: skip
    for case in cases:
        if case == UNCAPPED:
            entry = no_regression(out_dir / file_stem(case), work_dir / case, decode_tokens, seed, device)
        else:
            entry = run_case(case, out_dir, work_dir, requests, cap_new_tokens, decode_tokens, seed, device, kv_reservation, tuple(concurrency),
                             attention_tokens, compile_decode)  # fmt: skip
        report["cases"][case] = entry
        (out_dir / f"{file_stem(case)}.json").write_text(json.dumps(entry, indent=2))
        variants = entry.get("by_variant") or entry.get("by_reservation") or {}
        shown = entry.get("summary") or entry.get("error") or {p: e.get("summary") or e.get("error") for p, e in variants.items()}
        print(f"{case}: {json.dumps(shown)}" + (f" ratios {json.dumps(entry['ratios'])}" if "ratios" in entry else ""), flush=True)
    (out_dir / "serve_tracks.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
