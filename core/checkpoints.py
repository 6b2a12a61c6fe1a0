"""Checkpoint I/O in litgpt's converted format, shared by finetuning and serving.

A checkpoint directory holds ``lit_model.pth`` (a plain state dict), ``model_config.yaml``
(litgpt's ``Config``), the tokenizer files, and optionally ``prompt_style.yaml``. These helpers
add what litgpt leaves out: errors that say which file is wrong, a verification that the weights
really match the config, a content hash that does not depend on how the file was pickled, and
(through ``core.integrity``) atomic saves whose file sha256 is recorded and checked at every load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from litgpt import GPT, Config
from litgpt.utils import save_config

import core.configs  # noqa: F401  (registers our local configs with litgpt)
from core.integrity import IntegrityError, clean_stale_temps, load_torch, save_torch

WEIGHTS = "lit_model.pth"
CONFIG = "model_config.yaml"
# Where a base checkpoint came from (its hub repo id, litgpt config), written when it is downloaded,
# converted or built, so that what was finetuned is read from the checkpoint, never from its path.
SOURCE = "checkpoint_source.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
# Files worth carrying along with the weights when a checkpoint is copied or merged.
SIDE_FILES = (*TOKENIZER_FILES, "prompt_style.yaml", "chat_template.jinja", "config.json")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not match its config."""


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and values: equal for equal weights however they were saved."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, prompt-style and HF config files that exist in ``src`` to ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)


def write_source(checkpoint_dir: Path, repo_id: str, litgpt_config: str, how: str) -> Path:
    """Record ``checkpoint_dir``'s origin in ``checkpoint_source.json``; ``how``: downloaded, converted or built."""
    path = Path(checkpoint_dir) / SOURCE
    path.write_text(json.dumps({"repo_id": repo_id, "litgpt_config": litgpt_config, "how": how}, indent=2) + "\n")
    return path


def read_source(checkpoint_dir: Path) -> dict | None:
    """The record ``write_source`` wrote, or None where there is none; a malformed one is a CheckpointError."""
    path = Path(checkpoint_dir) / SOURCE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("repo_id"), str) or not record["repo_id"]:
        raise CheckpointError(f"{path}: expected an object with a non-empty 'repo_id'")
    return record


def save_checkpoint(state_dict: dict[str, torch.Tensor], config: Config, out_dir: Path, side_files_from: Path | None = None) -> Path:
    """Write a complete checkpoint directory (weights saved atomically with their sha256); returns the weights path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    save_torch(state_dict, out_dir / WEIGHTS)
    save_config(config, out_dir)
    if side_files_from is not None:
        copy_side_files(side_files_from, out_dir)
    return out_dir / WEIGHTS


def missing_files(checkpoint_dir: Path, weights: str = WEIGHTS) -> list[str]:
    missing = [name for name in (weights, CONFIG) if not (checkpoint_dir / name).is_file()]
    if not any((checkpoint_dir / t).is_file() for t in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json or tokenizer.model")
    return missing


def load_config(checkpoint_dir: Path) -> Config:
    path = checkpoint_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: missing {CONFIG}; is this a converted litgpt checkpoint?")
    return Config.from_file(path)


def shape_mismatches(expected: dict[str, tuple], got: dict[str, tuple], shown: int = 4) -> str:
    """Every way ``got`` differs from ``expected`` (name -> shape), each kind with its first tensors named; "" if none."""
    wrong = [k for k in expected if k in got and expected[k] != got[k]]
    absent = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))

    def listed(names: list[str], describe) -> str:
        more = f", and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(describe(k) for k in names[:shown]) + more

    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensors with the wrong shape: " + listed(wrong, lambda k: f"{k} expected {expected[k]} got {got[k]}"))
    if absent:
        parts.append(f"{len(absent)} tensors missing: " + listed(absent, lambda k: f"{k} {expected[k]}"))
    if extra:
        parts.append(f"{len(extra)} unexpected tensors: " + listed(extra, lambda k: f"{k} {got[k]}"))
    return "; ".join(parts)


def verify_checkpoint(checkpoint_dir: Path) -> Config:
    """Check that every file is there, the weights match the config exactly, and the tokenizer fits.

    Returns the config. Raises CheckpointError naming the directory and what is wrong.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    if missing := missing_files(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: missing {', '.join(missing)}")
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    try:
        weights = load_torch(checkpoint_dir / WEIGHTS)  # sha256 checked against its record
    except IntegrityError as e:  # a truncated, damaged or foreign file
        raise CheckpointError(str(e)) from None
    weights = weights.get("model", weights)
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if problems := shape_mismatches(expected, got):
        raise CheckpointError(f"{checkpoint_dir / WEIGHTS} does not match {CONFIG} ({config.name}): {problems}")

    from litgpt import Tokenizer

    from core.tokenizer_check import check_sentencepiece_file

    check_sentencepiece_file(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise CheckpointError(f"{checkpoint_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.padded_vocab_size}")
    return config


def load_model(checkpoint_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """A ready-to-run GPT in eval mode from a (merged or base) checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    if missing := missing_files(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: missing {', '.join(missing)}")
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = GPT(config)
    state = load_torch(checkpoint_dir / WEIGHTS)
    model.load_state_dict(state.get("model", state), assign=True)
    # The RoPE caches were built on the meta device; build them for real before moving.
    model.cos, model.sin = model.rope_cache(device=torch.device(device))
    return model.to(device=device, dtype=dtype).eval()
