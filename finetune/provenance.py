"""``submission.json``: what the organizers need to rebuild a finetuned model, written with every run.

Base model and license (from the manifest), method and its recorded config, data (recipe or file,
with the data card and its hashes), seed, software versions (our git sha, litgpt, torch, CUDA),
the GPU, and the training time actually used. ``make submission`` packs it; ``Dockerfile.train``
replays it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from core.manifest import UnlistedModelError, lookup
from core.paths import CHECKPOINTS_DIR, REPO_ROOT

SCHEMA = "onegpu-submission/1"


def base_model_id(checkpoint_dir: Path) -> tuple[str, str]:
    """The base checkpoint's hub repo id and where it was read: its ``checkpoint_source.json``
    (written by download, convert and the tiny build), or, for a checkpoint converted before there
    were records, its ``checkpoints/<org>/<name>`` path (else its directory name)."""
    from core.checkpoints import read_source

    if (record := read_source(Path(checkpoint_dir))) is not None:
        return record["repo_id"], "checkpoint_source.json"
    path = Path(checkpoint_dir).resolve()
    try:
        return path.relative_to(CHECKPOINTS_DIR.resolve()).as_posix(), "path"
    except ValueError:
        return path.name, "path"


def git_revision() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def versions() -> dict:
    out = {"onegpu": git_revision(), "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("litgpt", "lightning", "bitsandbytes", "datasets", "tokenizers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def hardware() -> dict:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    return {"gpu": None, "cpu": platform.processor() or platform.machine()}


def build_manifest(method: str, hparams: dict, trained: dict, card: dict) -> dict:
    """``hparams``: the run's config as recorded (``hyperparameters.yaml``, what ``--config`` replays); ``trained``: what it did."""
    repo_id, read_from = base_model_id(Path(hparams["checkpoint_dir"]))
    try:
        entry = lookup(repo_id)
        base = {"repo_id": repo_id, "litgpt_config": entry.litgpt_config, "license": entry.license, "in_manifest": True}
    except UnlistedModelError:
        from core.checkpoints import load_config

        config = load_config(Path(hparams["checkpoint_dir"])).name  # what was finetuned; the manifest knows no license
        base = {"repo_id": repo_id, "litgpt_config": config, "license": None, "in_manifest": False}
    base["repo_id_from"] = read_from
    data = hparams["data"]
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base,
        "method": method,
        "quantize": hparams.get("quantize"),
        "template": trained.get("template"),
        "data": {"recipe": data.get("recipe"), "train_file": None if data.get("recipe") else data.get("train_file"), "card": card},
        "seed": hparams["seed"],
        "finetune": hparams,
        "versions": versions(),
        "hardware": hardware(),
        "training": trained,
    }
