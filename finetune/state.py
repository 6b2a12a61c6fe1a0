"""Training state for exact resume: trainable weights, optimizer, schedule, data position, RNG.

Each periodic save writes ``step-NNNNNN/``: the method's servable weights file (as ``final/`` has)
plus ``training_state.pth``, built in a temporary sibling and renamed into place whole
(``core.integrity.atomic_dir``), every file with its sha256. ``--resume auto`` picks the newest step
that loads and matches its hashes, and says why it passed over any newer one.

The state holds only tensors and primitives, so it loads with ``torch.load(weights_only=True)``:
a crafted ``training_state.pth`` can't run code.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from core.integrity import IntegrityError, load_torch, save_torch, verify

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


def find_resume_dir(resume: bool | str | Path, out_dir: Path, weights_file: str, log: Callable[[str], None] = print) -> Path | None:
    """``False``: none. ``"auto"``: the newest sound step directory if any. ``True``: one must exist. A path: that one, sound."""
    if resume is False or resume in ("false", "False"):
        return None
    if isinstance(resume, (str, Path)) and str(resume) not in ("auto", "true", "True"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume: {path} has no {STATE_FILE}")
        if problem := unsound(path, weights_file):
            raise IntegrityError(f"resume: {problem}")
        return path
    for step_dir in sorted((p for p in out_dir.glob("step-*") if p.is_dir()), reverse=True):
        if problem := unsound(step_dir, weights_file):
            log(f"resume: skipping {step_dir.name}: {problem}")
            continue
        return step_dir
    if resume is True or resume in ("true", "True"):
        raise FileNotFoundError(f"resume: no complete step-*/{STATE_FILE} in {out_dir} to resume from")
    return None


def unsound(step_dir: Path, weights_file: str) -> str | None:
    """Why ``step_dir`` can't be resumed from (a file missing, damaged or unreadable), or None."""
    for name in (STATE_FILE, weights_file):
        if not (step_dir / name).is_file():
            return f"{name} is missing (the save was interrupted)"
    try:
        verify(step_dir / weights_file)
        state = load_torch(step_dir / STATE_FILE)
        if not {"model", "optimizer", "progress", "rng"} <= set(state):
            return f"{STATE_FILE} lacks {sorted({'model', 'optimizer', 'progress', 'rng'} - set(state))}"
    except IntegrityError as e:
        return str(e)
    return None


def save_state(path: Path, model_state: dict, optimizer_state: dict, progress: dict, keep, rng_ranks: list[dict] | None = None) -> None:
    """Only the weights ``keep`` accepts are saved (the adapter for PEFT methods, everything for full).

    The state dicts are whole (``finetune.distributed.full_state``: FSDP's shards gathered). ``rng_ranks``:
    every rank's RNG state, from a run on several devices.
    """
    weights = {k: v for k, v in model_state.items() if keep(k, v)}
    state = {"model": weights, "optimizer": optimizer_state, "progress": progress, "rng": rng_state()}
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    save_torch(state, path / STATE_FILE)


def saved_micro_batch_size(path: Path) -> int:
    """The micro-batch size a saved run used (a resumed run must keep it); reads no weights (mmap)."""
    state = load_torch(path / STATE_FILE)
    return int(state["progress"]["batches"]["batch_size"])


def load_state(path: Path, model, optimizer, rank: int = 0, world_size: int = 1, loader=None) -> dict:
    """Restore weights, optimizer and RNG in place; returns the saved progress dict.

    A rank takes its own saved RNG state when the run was saved by as many ranks, else rank 0's.
    ``loader(model_state, optimizer_state)``: loads both and returns (missing, unexpected) keys, for
    FSDP's sharded model (``finetune.distributed.state_loader``); None: the plain ``load_state_dict``.
    """
    state = load_torch(path / STATE_FILE)
    if loader is not None:
        missing, unexpected = loader(state["model"], state["optimizer"])
    else:
        result = model.load_state_dict(state["model"], strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    if unexpected:
        raise IntegrityError(f"resume: {path / STATE_FILE} holds weights this model lacks, e.g. {list(unexpected)[:3]}")
    if absent := sorted(_trainable(model) & set(missing)):
        raise IntegrityError(f"resume: {path / STATE_FILE} lacks trainable weights, e.g. {absent[:3]}")
    if loader is None:
        optimizer.load_state_dict(state["optimizer"])
    check_adamw_state(optimizer, path / STATE_FILE)
    ranks = state.get("rng_ranks")
    set_rng_state(ranks[rank] if ranks and len(ranks) == world_size else state["rng"])
    return state["progress"]


def _trainable(model) -> set[str]:
    """Trainable parameter names as ``state_dict`` spells them (Fabric's wrapper forwards that to the inner module)."""
    inner = getattr(model, "module", model)
    return {name for name, p in inner.named_parameters() if p.requires_grad}


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
