"""Training state for exact resume: trainable weights, optimizer, schedule, data position, RNG.

Each periodic save writes ``step-NNNNNN/``: the method's servable weights file (as ``final/`` has)
plus ``training_state.pth``. ``--resume auto`` picks the newest one in ``out_dir``.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch

STATE_FILE = "training_state.pth"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume_dir(resume: bool | str | Path, out_dir: Path) -> Path | None:
    """``False``: none. ``"auto"``: the newest step directory if any. ``True``: it must exist. A path: that one."""
    if resume is False or resume in ("false", "False"):
        return None
    if isinstance(resume, (str, Path)) and str(resume) not in ("auto", "true", "True"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume: {path} has no {STATE_FILE}")
        return path
    candidates = sorted(out_dir.glob(f"step-*/{STATE_FILE}"))
    if not candidates:
        if resume is True or resume in ("true", "True"):
            raise FileNotFoundError(f"resume: no step-*/{STATE_FILE} in {out_dir} to resume from")
        return None
    return candidates[-1].parent


def save_state(fabric: L.Fabric, path: Path, model, optimizer, progress: dict, keep) -> None:
    """Only the weights ``keep`` accepts are saved (the adapter for PEFT methods, everything for full)."""
    state = {"model": model, "optimizer": optimizer, "progress": progress, "rng": rng_state()}
    fabric.save(path / STATE_FILE, state, filter={"model": keep})


def saved_micro_batch_size(path: Path) -> int:
    """The micro-batch size a saved run used (a resumed run must keep it); reads no weights (mmap)."""
    state = torch.load(path / STATE_FILE, mmap=True, weights_only=False, map_location="cpu")
    return int(state["progress"]["batches"]["batch_size"])


def load_state(fabric: L.Fabric, path: Path, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved progress dict."""
    state = {"model": model, "optimizer": optimizer, "progress": {}, "rng": {}}
    fabric.load(path / STATE_FILE, state, strict=False)
    check_adamw_state(optimizer, path / STATE_FILE)
    set_rng_state(state["rng"])
    return state["progress"]


def check_adamw_state(optimizer, path: Path) -> None:
    """Refuse optimizer state written by another optimizer (QLoRA runs once used bitsandbytes' paged AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.AdamW):
        return
    for param_state in inner.state.values():
        if param_state and "exp_avg" not in param_state:
            raise ValueError(
                f"resume: {path} holds another optimizer's state (keys {sorted(param_state)}), not torch AdamW's; "
                "start a fresh run (--resume false), or resume with the version that wrote it"
            )
