"""Progress a person can read: a tqdm bar only in a terminal, an ETA from the first step (after a resume too),
and a loss plot with a moving average and the validation points."""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

import lightning as L
import pytest
from litgpt import Tokenizer

from core.methods import METHODS
from core.prompts import get_style
from finetune.budget import BudgetPlanner, Schedule
from finetune.config import EvalArgs, TrainArgs
from finetune.data import Collate, encode_row, load_rows
from finetune.loop import Progress, fit, format_seconds, progress_bar
from finetune.lora import LoRAArgs
from finetune.plot import plot_metrics, smooth, smoothing_span
from finetune.run import build_model, build_optimizer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_only_when_stdout_is_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert progress_bar(10, 0).disable
    monkeypatch.setattr(sys, "stdout", _Terminal())
    bar = progress_bar(10, 3)
    assert not bar.disable and bar.n == 3 and bar.total == 10
    bar.close()
    assert progress_bar(10, 0, main_process=False).disable


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600 * 3 + 7 * 60 + 5, "3h07m")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_moving_average_equals_pandas_ewm() -> None:
    import pandas as pd

    values = [4.0, 3.5, 3.9, 2.0, 2.5, 1.0, 1.2, 0.9, 1.1, 0.7]
    for span in (1, 3, 7):
        assert smooth(values, span) == pytest.approx(pd.Series(values).ewm(span=span, adjust=True).mean().tolist())
    assert smoothing_span(30) == 1 and smoothing_span(2000) == 100 and smoothing_span(10**6) == 200


def test_plot_writes_a_png_with_validation_points(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("step", "loss", "lr", "tokens", "elapsed_s", "val_loss"))
        writer.writeheader()
        for step in range(1, 101):
            writer.writerow(
                {"step": step, "loss": 3 / step**0.5, "lr": 1e-3, "tokens": 100 * step, "elapsed_s": step, "val_loss": 2.0 if step % 25 == 0 else ""}
            )
    out = plot_metrics(path, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(tmp_path / "absent.csv", tmp_path / "x.png") is None


def test_resumed_run_logs_an_eta_from_its_first_step(make_tiny_checkpoint, capsys) -> None:
    base = make_tiny_checkpoint()
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    fabric.seed_everything(0, verbose=False)
    model = build_model(fabric, METHODS["lora"], LoRAArgs(r=2, alpha=4).as_config(), base, quantize=None)
    optimizer = build_optimizer(fabric, model, 1e-3, 0.0)
    tokenizer = Tokenizer(base)
    batch = Collate()([encode_row(r, tokenizer, get_style("qa"), 32) for r in load_rows(base.parent / "data" / "train.jsonl")[:4]])
    train = TrainArgs(log_interval=1, global_batch_size=4, micro_batch_size=4, max_steps=6, save_interval=None, lr_warmup_steps=1)
    resumed = Progress(step=3, elapsed_s=500.0, total_steps=6)  # as after --resume: the planner has not measured
    fit(fabric, model, optimizer, lambda: batch, Schedule(6, 1), 1e-3, BudgetPlanner(float("inf"), 6), resumed, train, EvalArgs(interval=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 3
    assert all(re.search(r"\| eta \d+s$", line) for line in lines), lines
    assert "elapsed 8m" in lines[0]  # the budget used before the resume counts
