"""``--devices``/``--strategy``: a 2-process DDP run (gloo, CPU) is the 1-process run with the same global batch,
an interrupted 2-process run resumes exactly, and what cannot work here is refused naming the option.

The 2-process runs are real command lines (Fabric re-runs the command once per extra device), each in its
own process group under a timeout, on a free port, so a stuck rank fails the test instead of hanging it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoints import WEIGHTS
from finetune import distributed
from finetune.config import main
from finetune.lora import LoRARun

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny(tiny_40_rows):
    """The tiny base and 40 of its rows (packed into 64-token rows)."""
    return tiny_40_rows


def args(tiny, out_dir: Path, *extra: str) -> list[str]:
    """8 rows a step (micro-batches of 2: 4 accumulated on one process, 2 on each of two), 4 steps, saves at 2."""
    base, train_file = tiny
    return [
        *("--checkpoint_dir", str(base), "--out_dir", str(out_dir), "--data.train_file", str(train_file), "--data.max_seq_length", "64"),
        *("--train.global_batch_size", "8", "--train.micro_batch_size", "2", "--train.max_steps", "4", "--train.save_interval", "2"),
        *("--train.lr_warmup_steps", "1", "--eval.interval", "2", "--eval.max_iters", "2", "--lr", "3e-3", "--lora.r", "4"),
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m finetune.lora argv`` in its own process group, killed whole (every rank) after TIMEOUT_S."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune.lora", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"finetune.lora {' '.join(argv)} ran past {TIMEOUT_S}s:\n{out[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind by the parent's exit
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def rows(out_dir: Path) -> list[dict]:
    return list(csv.DictReader((out_dir / "metrics.csv").open()))


def adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "final" / f"{WEIGHTS}.lora", weights_only=True)["model"]


two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need two cores (--devices is refused above the core count)")


@two_cores
def test_two_ddp_processes_train_as_one_with_the_same_global_batch(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main(LoRARun, args(tiny, one))
    out = cli(args(tiny, two, "--devices", "2", "--strategy", "ddp")).stdout
    assert "Starting with 2 processes" in out and "distributed_backend=gloo" in out
    a, b = rows(one), rows(two)
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]  # rank 0 alone wrote the metrics
    for ra, rb in zip(a, b, strict=True):
        assert (ra["lr"], ra["tokens"]) == (rb["lr"], rb["tokens"])  # the same rows each step, all ranks counted
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-5, abs=1e-6)
        assert bool(ra["val_loss"]) == bool(rb["val_loss"])
        if ra["val_loss"]:
            assert float(rb["val_loss"]) == pytest.approx(float(ra["val_loss"]), rel=1e-5, abs=1e-6)
    wa, wb = adapter(one), adapter(two)
    # AdamW moves an element by about lr * sign(grad) at first, so a gradient that is zero up to rounding (summed
    # in another order by the all-reduce) can move it by a share of lr (3e-3) either way: a tolerance of lr / 30.
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    assert sum(int((wa[k] - wb[k]).abs().gt(1e-6).sum()) for k in wa) < 1e-3 * sum(v.numel() for v in wa.values())  # nearly all agree to 1e-6
    assert any(not torch.equal(wa[k], torch.load(one / "step-000002" / f"{WEIGHTS}.lora", weights_only=True)["model"][k]) for k in wa)
    trained = json.loads((two / "final" / "trained.json").read_text())
    assert trained["steps"] == 4 and trained["tokens"] == int(a[-1]["tokens"])

    # The data position is the global batch's, so a 1-process checkpoint resumes on two processes where it left off.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(one / "step-000002", moved / "step-000002")
    cli(args(tiny, moved, "--devices", "2", "--resume", "auto"))
    assert [(r["step"], r["lr"], r["tokens"]) for r in rows(moved)] == [(r["step"], r["lr"], r["tokens"]) for r in a[2:]]
    assert [float(r["loss"]) for r in rows(moved)] == pytest.approx([float(r["loss"]) for r in a[2:]], rel=1e-5, abs=1e-6)


@two_cores
def test_an_interrupted_two_process_run_resumes_exactly(tiny, tmp_path):
    dropout = ("--devices", "2", "--lora.dropout", "0.1")  # each rank draws its own masks: resume restores every rank's RNG
    full = tmp_path / "full"
    cli(args(tiny, full, *dropout))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "step-000002", interrupted / "step-000002")  # "crashed" after step 2
    state = torch.load(interrupted / "step-000002" / "training_state.pth", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    out = cli(args(tiny, interrupted, *dropout, "--resume", "auto")).stdout
    assert "resumed from" in out and "at step 2" in out
    a, b = rows(full), rows(interrupted)
    assert [r["step"] for r in b] == ["3", "4"]
    assert [(r["loss"], r["lr"], r["tokens"], r["val_loss"]) for r in a[2:]] == [(r["loss"], r["lr"], r["tokens"], r["val_loss"]) for r in b]
    wa, wb = adapter(full), adapter(interrupted)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@two_cores
def test_the_time_budget_stops_every_rank_at_the_same_step(tiny, tmp_path):
    """Each rank checks its own clock; the stop is voted (the least steps that fit) and the plan is rank 0's, else one rank
    would wait forever in the next step's all-reduce. The run ends in time with its final save and exits cleanly."""
    out_dir = tmp_path / "budget"
    out = cli([*args(tiny, out_dir, "--devices", "2"), "--train.max_steps", "100000", "--train.save_interval", "null", "--max_time", "6s"]).stdout
    trained = json.loads((out_dir / "final" / "trained.json").read_text())
    assert 0 < trained["steps"] < 100000
    # Stopped by the clock, or earlier where the budget plan (rank 0's, printed once) ended the LR schedule.
    assert trained["stopped_by_time"] or "The LR schedule now ends at step" in out
    assert out.count("budget plan:") <= 1 and out.count("Stopping at step") <= 1
    assert [int(r["step"]) for r in rows(out_dir)] == list(range(1, trained["steps"] + 1))
    # The ranks vote every few steps (finetune.budget.BudgetStop), on the steps that fit: still inside the budget,
    # up to one unforeseeably slow step, as on one process.
    elapsed = [float(r["elapsed_s"]) for r in rows(out_dir)]
    assert trained["seconds"] <= 6.0 + max(b - a for a, b in zip([0.0] + elapsed, elapsed))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--devices", "0"], "error: devices: a number of devices (processes) >= 1, got 0"),
        (["--devices", "100000"], "error: devices: 100000 "),
        (
            ["--devices", "2", "--train.global_batch_size", "6"],
            "error: train.global_batch_size: 6 rows per step do not split into --devices 2 x train.micro_batch_size 2 (4)",
        ),
        (["--devices", "2", "--eval.score_interval", "2"], "error: eval.score_interval: scoring checkpoints while training runs on one device"),
        (["--strategy", "zero3"], "error: --strategy: 'zero3' is not one of auto, ddp, fsdp"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_option(tiny, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        main(LoRARun, [*args(tiny, tmp_path / "run"), *extra])
    assert capsys.readouterr().err.strip().startswith(message)
    assert not (tmp_path / "run").exists()  # refused before anything ran or launched


def test_refusals_that_depend_on_the_machine():
    check = lambda devices=2, strategy="ddp", quantize=None, cuda=0, cpus=2: distributed.check(devices, strategy, quantize, 8, 2, None, cuda, cpus)  # noqa: E731
    check()  # two CPU processes over gloo
    check(devices=4, cuda=4)
    with pytest.raises(ValueError, match=r"^devices: 3 asked for, this machine has 2 CUDA device\(s\)$"):
        check(devices=3, cuda=2)
    with pytest.raises(ValueError, match=r"^devices: 4 CPU processes asked for, this machine has 2 CPU core\(s\)$"):
        check(devices=4)
    with pytest.raises(ValueError, match=r"^strategy: fsdp shards over CUDA GPUs .*--strategy ddp$"):
        check(strategy="fsdp")
    check(strategy="fsdp", cuda=2)
    with pytest.raises(ValueError, match=r"^quantize: bnb.nf4 \(QLoRA\) runs on one device"):
        check(quantize="bnb.nf4", cuda=2)
    check(devices=1, strategy="auto", quantize="bnb.nf4", cuda=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_fsdp_is_refused_on_the_cpu_before_anything_runs(tiny, tmp_path, capsys):
    """Lightning's FSDP is GPU-only (its connector refuses accelerator="cpu"): we say so, naming what works."""
    with pytest.raises(SystemExit):
        main(LoRARun, [*args(tiny, tmp_path / "run"), "--devices", "2", "--strategy", "fsdp"])
    assert (
        capsys.readouterr().err.strip() == "error: strategy: fsdp shards over CUDA GPUs (Lightning's FSDP is GPU-only); on the CPU use --strategy ddp"
    )


def test_fsdp_wraps_each_block_and_the_planner_counts_the_whole_model(tiny):
    """What --strategy fsdp hands Fabric on GPUs (litgpt's policy), and the unsharded shape its memory plan uses."""
    from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
    from litgpt.model import Block

    from core.checkpoints import load_config
    from core.methods import METHODS
    from finetune.memory_plan import ModelShape
    from finetune.speed import unsharded_shape

    fsdp = distributed.fabric_strategy("fsdp", 2, trains_everything=False)
    assert isinstance(fsdp, FSDPStrategy) and fsdp._fsdp_kwargs["use_orig_params"]  # frozen and trainable weights share a block
    assert Block in fsdp._fsdp_kwargs["auto_wrap_policy"]._module_classes
    assert isinstance(distributed.fabric_strategy("auto", 2, False), DDPStrategy) and distributed.fabric_strategy("auto", 1, False) == "auto"
    base, _ = tiny
    method = METHODS["lora"]
    config = method.litgpt.Config(**{**dataclasses.asdict(load_config(base)), "lora_r": 4, "lora_query": True, "lora_value": True})
    model = method.litgpt.GPT(config)
    method.freeze_all_but_trainable(model)
    assert unsharded_shape(config, "lora") == ModelShape.of(model)
