"""``--eval.score_interval``: score saved checkpoints with ``make eval`` while training, keep the best.

Validation loss says little about what HELM will score, so every ``score_interval`` steps the step's
saved checkpoint (and ``final/``) is scored by ``python -m evals`` on ``score_tasks`` (default: the
run's own held-out rows, ``heldout.jsonl``) through the server's ``/process`` contract. Scores go to
``<out_dir>/scores.json`` (with each step's ``eval.json`` beside its weights), and ``<out_dir>/best``
links to the best-scoring checkpoint so far (ties: the earlier one).

The scorer runs as a subprocess (``finetune/`` never imports ``server/``) that loads the saved
checkpoint on the training device: it needs room for a second copy of the model there while training
holds the first (fine for small models, and for LoRA on an 80 GB card; on a 24 GB card score on the
CPU with ``--eval.score_device cpu``, or after training with ``make eval``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core.paths import REPO_ROOT
from finetune.config import EvalArgs

SCORES_FILE = "scores.json"
BEST_LINK = "best"
HELDOUT_FILE = "heldout.jsonl"


SCORING_ONLY = ("score_tasks", "score_max_items", "score_device")  # read only when eval.score_interval scores checkpoints


def check(eval: EvalArgs, save_interval: int | None) -> None:
    """Refuse scoring options that cannot work, or would not be used (no --eval.score_interval), naming the flag."""
    interval = eval.score_interval
    if interval is None:
        defaults = EvalArgs()
        for name in SCORING_ONLY:
            if getattr(eval, name) != getattr(defaults, name):
                raise ValueError(
                    f"eval.{name}: only read when checkpoints are scored while training, and --eval.score_interval is not set; "
                    "give it (a multiple of train.save_interval) or score after training with make eval"
                )
        return
    if interval < 1:
        raise ValueError(f"eval.score_interval: must be a positive number of steps, got {interval}")
    if not save_interval or interval % save_interval:
        raise ValueError(
            f"eval.score_interval: {interval} steps must be a multiple of train.save_interval ({save_interval}): only saved checkpoints are scored"
        )
    for task in eval.score_tasks or []:
        if not Path(task).is_file():
            raise ValueError(f"eval.score_tasks: {task} not found")


def write_heldout(rows: list[dict], out_dir: Path) -> Path:
    """The held-out rows the scorer uses by default (rows in instruction/output shape only)."""
    usable = [{k: r.get(k, "") for k in ("instruction", "input", "output")} for r in rows if "instruction" in r and "output" in r]
    if not usable:
        raise ValueError("eval.score_interval: the held-out rows are chat messages, which the scorer cannot render; give --eval.score_tasks")
    path = Path(out_dir) / HELDOUT_FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in usable), encoding="utf-8")
    return path


def score_command(checkpoint: Path, tasks: list[Path], eval: EvalArgs) -> list[str]:
    cmd = [sys.executable, "-m", "evals", "--checkpoint_dir", str(checkpoint), "--tasks", json.dumps([str(t) for t in tasks])]
    cmd += ["--out", str(Path(checkpoint) / "eval.json"), "--device", eval.score_device]
    if eval.score_max_items is not None:
        cmd += ["--max_items", str(eval.score_max_items)]
    return cmd


class Scoreboard:
    """Scores of the run's checkpoints in ``scores.json``, and ``best`` pointing at the top one."""

    def __init__(self, out_dir: Path, tasks: list[Path], eval: EvalArgs) -> None:
        self.out_dir, self.tasks, self.eval = Path(out_dir), list(tasks), eval
        path = self.out_dir / SCORES_FILE
        self.scores: list[dict] = json.loads(path.read_text())["checkpoints"] if path.is_file() else []  # survives resume

    def score(self, checkpoint: Path, step: int) -> float:
        """Score one saved checkpoint; returns its overall score (the mean of each task's primary metric)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(score_command(checkpoint, self.tasks, self.eval), cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"eval.score_interval: scoring {checkpoint} failed:\n{(done.stderr or done.stdout)[-2000:]}")
        report = json.loads((Path(checkpoint) / "eval.json").read_text())
        entry = {
            "step": step,
            "checkpoint": Path(checkpoint).name,
            "overall": report["overall"],
            "tasks": {name: {m: v["value"] for m, v in t["metrics"].items()} for name, t in report["tasks"].items()},
        }
        self.scores = [s for s in self.scores if s["checkpoint"] != entry["checkpoint"]] + [entry]
        self._write()
        return report["overall"]

    def best(self) -> dict | None:
        return max(self.scores, key=lambda s: (s["overall"], -s["step"]), default=None)

    def _write(self) -> None:
        best = self.best()
        (self.out_dir / SCORES_FILE).write_text(json.dumps({"best": best, "checkpoints": self.scores}, indent=2) + "\n")
        link = self.out_dir / BEST_LINK
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(best["checkpoint"], target_is_directory=True)
