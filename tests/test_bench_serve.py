"""``bench/serve.py`` end to end on the tiny model (CPU): real server processes, real HTTP, the JSON."""

from __future__ import annotations

import pytest

from bench.serve import DEFAULT_SERVERS, main


def test_bench_serve_runs_on_the_tiny_model(make_tiny_checkpoint, tmp_path) -> None:
    report = main(
        out_dir=tmp_path / "out", checkpoint_dir=make_tiny_checkpoint(), work_dir=tmp_path / "work",
        requests=6, cap_new_tokens=4, decode_tokens=4, projection_requests_per_type=1, device="cpu",
    )  # fmt: skip
    assert (tmp_path / "out" / "serve.json").is_file()
    for kind in DEFAULT_SERVERS:
        entry = report["servers"][kind]
        assert "error" not in entry, entry
        for phase in ("c1", "c4", "c30"):
            assert entry[phase]["requests"] == 6 and entry[phase]["errors"] == 0, entry[phase]
            assert entry[phase]["requests_per_s"] > 0
            assert set(entry[phase]["latency_s"]) >= {"multiple_choice"}
        assert entry["batch1_decode"]["new_tokens"] == 4
    ours = report["servers"]["ours"]
    assert ours["engine"]["requests"] > 0
    assert ours["projection"]["final_eval_s"] > 0
    assert set(report["ratios"]) >= {
        "c4_requests_per_s_vs_litgpt",
        "c30_requests_per_s_vs_litgpt",
        "c30_requests_per_s_vs_hf",
        "batch1_decode_vs_litgpt",
    }
    assert report["targets"]["measured"]["c30_speedup_vs_litgpt"] == report["ratios"]["c30_requests_per_s_vs_litgpt"]
    # same weights in fp32, greedy: every baseline answers the trace exactly as ours does
    assert report["greedy_agreement"] == {"vs_litgpt": 1.0, "vs_hf": 1.0}


def _ours_beside(checkpoint, tmp_path, variant: str, decode_tokens: int) -> dict:
    """bench.serve on the tiny model with ours and one of its variants; both served every request."""
    report = main(
        out_dir=tmp_path / "out", checkpoint_dir=checkpoint, work_dir=tmp_path / "work", servers=["ours", variant],
        requests=3, cap_new_tokens=3, decode_tokens=decode_tokens, projection_requests_per_type=0, device="cpu",
    )  # fmt: skip
    for kind in ("ours", variant):
        entry = report["servers"][kind]
        assert "error" not in entry, entry
        assert entry["batch1_decode"]["new_tokens"] == decode_tokens and entry["c30"]["errors"] == 0
    return report


def test_bench_serve_runs_ours_with_and_without_compile_decode(make_tiny_checkpoint, tmp_path) -> None:
    """The "ours-compiled" variant: the same server with --compile_decode, side by side with ours in one run."""
    report = _ours_beside(make_tiny_checkpoint(), tmp_path, "ours-compiled", decode_tokens=4)
    assert "compile_decode: compiling decode_before" in (tmp_path / "out" / "server_ours-compiled.log").read_text()
    assert "compile_decode" not in (tmp_path / "out" / "server_ours.log").read_text()
    ratio = report["ratios"]["batch1_decode_compiled_vs_ours"]
    ours, compiled = (report["servers"][k]["batch1_decode"]["tokens_per_s"] for k in ("ours", "ours-compiled"))
    assert ratio == round(compiled / ours, 3)
    assert report["greedy_agreement"] == {"vs_ours-compiled": 1.0}  # fp32: the compiled decode answers as the eager one


def test_bench_serve_runs_ours_with_and_without_overlap_decode(make_tiny_checkpoint, tmp_path) -> None:
    """The "ours-overlap" variant: the same server with --overlap_decode, side by side with ours in one run."""
    report = _ours_beside(make_tiny_checkpoint(), tmp_path, "ours-overlap", decode_tokens=6)
    assert report["servers"]["ours-overlap"]["engine"]["overlap_decode"] and report["servers"]["ours-overlap"]["engine"]["overlapped_steps"] > 0
    assert report["servers"]["ours"]["engine"]["overlapped_steps"] == 0 and not report["servers"]["ours"]["engine"]["overlap_decode"]
    ratio = report["ratios"]["batch1_decode_overlap_vs_ours"]
    ours, overlap = (report["servers"][k]["batch1_decode"]["tokens_per_s"] for k in ("ours", "ours-overlap"))
    assert ratio == round(overlap / ours, 3) and "c30_requests_per_s_overlap_vs_ours" in report["ratios"]
    assert report["greedy_agreement"] == {"vs_ours-overlap": 1.0}  # the same answers


def test_serve_tracks_cases_are_litgpt_configs_and_unknown_ones_are_refused(tmp_path) -> None:
    from bench.serve_tracks import CASES, UNCAPPED, file_stem
    from bench.serve_tracks import main as tracks
    from core.configs import config_from_name

    for case, (name, gib) in CASES.items():
        assert config_from_name(name).name == name and case.endswith(f"@{gib}")
        assert "@" not in file_stem(case) and file_stem(case).endswith(f"_{gib}gib")  # '@' names don't come back from the device
    assert file_stem("llama2-7b@24") == "llama2-7b_24gib" and file_stem(UNCAPPED) == UNCAPPED
    with pytest.raises(ValueError, match="cases: unknown"):
        tracks(out_dir=tmp_path, cases=["gpt-5@80"])


@pytest.mark.parametrize("compile_decode", [False, True], ids=["eager", "compiled"])
def test_paged_check_logic_holds_on_the_cpu(compile_decode: bool) -> None:
    """bench.paged_check is meant for a GPU (graphs on); its comparison runs the same on the CPU."""
    import torch

    from bench.paged_check import check

    assert check("sliding_window", torch.device("cpu"), compile_decode)["ok"]  # every architecture: tests/test_batch_engine.py


def refused_server(commands: list) -> type:
    """A stand-in for ``bench.serve.Server`` that records the command and log name serve_case would start, then fails."""

    class Refused:
        def __init__(self, command, port, log) -> None:
            commands.append((command, log.name))

        def __enter__(self):
            raise RuntimeError("not started")

        def __exit__(self, *exc) -> None:
            pass

    return Refused


def test_serve_tracks_compares_reservations_side_by_side_and_refuses_bad_lists(tmp_path, monkeypatch) -> None:
    """Several --kv_reservation policies serve one checkpoint and one set of traces; ratios are to the first."""
    import bench.serve_tracks as tracks

    calls = []

    def fake_serve(case, ckpt, traces, out_dir, case_dir, decode_tokens, device, policy, concurrency):
        calls.append((ckpt, id(traces), policy, concurrency))
        rate = {"up_front": 2.0, "lazy": 3.0}[policy]
        return {
            "kv_reservation": policy,
            "summary": {"requests_per_s": {f"c{c}": rate * c for c in concurrency}, "batch1_decode_tokens_per_s": 100.0},
        }

    monkeypatch.setattr(tracks, "prepare_checkpoint", lambda name, _, case_dir: case_dir / "ckpt")
    monkeypatch.setattr(tracks, "build_traces", lambda *a: {1: [], 4: [], 30: []})
    monkeypatch.setattr(tracks, "serve_case", fake_serve)
    report = tracks.main(out_dir=tmp_path, work_dir=tmp_path / "w", cases=["llama2-7b@24"], kv_reservation=["up_front", "lazy"], concurrency=[30])
    entry = report["cases"]["llama2-7b@24"]
    assert [c[2] for c in calls] == ["up_front", "lazy"] and len({(c[0], c[1]) for c in calls}) == 1  # same checkpoint, same traces
    assert calls[0][3] == (30,) and set(entry["by_reservation"]) == {"up_front", "lazy"}
    assert entry["ratios"] == {"lazy_vs_up_front": {"c30": 1.5, "batch1_decode": 1.0}}
    for bad in ([], ["lazy", "lazy"]):
        with pytest.raises(ValueError, match="kv_reservation"):
            tracks.main(out_dir=tmp_path, cases=["llama2-7b@24"], kv_reservation=bad)
    with pytest.raises(ValueError, match="concurrency"):
        tracks.main(out_dir=tmp_path, cases=["llama2-7b@24"], concurrency=[8])


def test_serve_tracks_compares_attention_budgets_side_by_side_and_refuses_bad_lists(tmp_path, monkeypatch) -> None:
    """--attention_tokens '[0, 16384]': unbounded then bounded servers on one checkpoint and one set of traces, each
    started with its flag (with every --kv_reservation); ratios are to the first; bad lists are refused naming the option."""
    import pytest

    import bench.serve_tracks as tracks

    calls, commands = [], []

    def fake_serve(case, ckpt, traces, out_dir, case_dir, decode_tokens, device, policy, concurrency, attention_tokens=None):
        calls.append((ckpt, id(traces), policy, attention_tokens))
        rate = {0: 2.0, 16384: 3.0}[attention_tokens] + (policy == "up_front")
        return {"summary": {"requests_per_s": {f"c{c}": rate for c in concurrency}, "batch1_decode_tokens_per_s": 100.0}}

    monkeypatch.setattr(tracks, "prepare_checkpoint", lambda name, _, case_dir: case_dir / "ckpt")
    monkeypatch.setattr(tracks, "build_traces", lambda *a: {1: [], 4: [], 30: []})
    monkeypatch.setattr(tracks, "serve_case", fake_serve)
    report = tracks.main(out_dir=tmp_path, work_dir=tmp_path / "w", cases=["llama2-7b@24"], attention_tokens=[0, 16384], concurrency=[30])
    entry = report["cases"]["llama2-7b@24"]
    assert [c[2:] for c in calls] == [("lazy", 0), ("lazy", 16384)] and len({c[:2] for c in calls}) == 1
    assert set(entry["by_variant"]) == {"att0", "att16384"} and entry["ratios"] == {"att16384_vs_att0": {"c30": 1.5, "batch1_decode": 1.0}}
    calls.clear()
    both = tracks.main(out_dir=tmp_path, cases=["llama2-7b@24"], kv_reservation=["up_front", "lazy"], attention_tokens=[0, 16384], concurrency=[30])
    assert [c[2:] for c in calls] == [("up_front", 0), ("up_front", 16384), ("lazy", 0), ("lazy", 16384)]
    assert list(both["cases"]["llama2-7b@24"]["ratios"]) == [
        "up_front_att16384_vs_up_front_att0",
        "lazy_att0_vs_up_front_att0",
        "lazy_att16384_vs_up_front_att0",
    ]
    for bad in ([], [0, 0], [-1]):
        with pytest.raises(ValueError, match="attention_tokens"):
            tracks.main(out_dir=tmp_path, cases=["llama2-7b@24"], attention_tokens=bad)

    monkeypatch.undo()
    monkeypatch.setattr(tracks, "Server", refused_server(commands))
    entry = tracks.serve_case("llama2-7b@24", tmp_path / "ckpt", {}, tmp_path, tmp_path, 4, "cpu", "lazy", (30,), attention_tokens=0)
    ((command, log),) = commands
    assert entry["attention_tokens"] == 0 and "not started" in entry["error"] and log == "server_llama2-7b_24gib_lazy_att0.log"
    assert command[-6:] == ["--gpu_memory_gib", "24", "--kv_reservation", "lazy", "--attention_tokens", "0"]
    tracks.serve_case("llama2-7b@24", tmp_path / "ckpt", {}, tmp_path, tmp_path, 4, "cpu", "lazy", (30,))
    assert "--attention_tokens" not in commands[-1][0] and commands[-1][1] == "server_llama2-7b_24gib_lazy.log"  # unset: the server's default


def test_serve_tracks_compares_compiled_decode_side_by_side(tmp_path, monkeypatch) -> None:
    """--compile_decode '[false, true]': eager then compiled servers on one checkpoint and traces, each started with
    its flag, named ``eager``/``compiled``; a repeated or empty list is refused naming the option."""
    import pytest

    import bench.serve_tracks as tracks

    calls, commands = [], []

    def fake_serve(case, ckpt, traces, out_dir, case_dir, decode_tokens, device, policy, concurrency, compile_decode=None):
        calls.append((ckpt, id(traces), compile_decode))
        return {
            "summary": {
                "requests_per_s": {f"c{c}": 2.0 + compile_decode for c in concurrency},
                "batch1_decode_tokens_per_s": 100.0 * (1 + compile_decode),
            }
        }

    monkeypatch.setattr(tracks, "prepare_checkpoint", lambda name, _, case_dir: case_dir / "ckpt")
    monkeypatch.setattr(tracks, "build_traces", lambda *a: {1: [], 4: [], 30: []})
    monkeypatch.setattr(tracks, "serve_case", fake_serve)
    report = tracks.main(out_dir=tmp_path, work_dir=tmp_path / "w", cases=["mistral-7b@24"], compile_decode=[False, True], concurrency=[30])
    entry = report["cases"]["mistral-7b@24"]
    assert [c[2] for c in calls] == [False, True] and len({c[:2] for c in calls}) == 1
    assert set(entry["by_variant"]) == {"eager", "compiled"} and entry["ratios"] == {"compiled_vs_eager": {"c30": 1.5, "batch1_decode": 2.0}}
    for bad in ([], [True, True]):
        with pytest.raises(ValueError, match="compile_decode"):
            tracks.main(out_dir=tmp_path, cases=["mistral-7b@24"], compile_decode=bad)

    monkeypatch.undo()
    monkeypatch.setattr(tracks, "Server", refused_server(commands))
    entry = tracks.serve_case("mistral-7b@24", tmp_path / "ckpt", {}, tmp_path, tmp_path, 4, "cpu", "lazy", (30,), compile_decode=True)
    ((command, log),) = commands
    assert entry["compile_decode"] is True and log == "server_mistral-7b_24gib_lazy_compiled.log"
    assert command[-2:] == ["--compile_decode", "true"]
