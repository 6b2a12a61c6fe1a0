"""Merge a LoRA adapter into its base model: a standalone checkpoint the server (or vLLM) can load.

A full finetune is already standalone (linked or copied as is); adapter methods cannot be merged (served unmerged).

    python -m finetune.merge --checkpoint_dir out/finetune/lora-tiny/final [--out_dir checkpoints/my-model]

Uses litgpt's own ``merge_lora``, and writes the merged weights once: into ``--out_dir`` when it is
given (the run directory is left as it was), else next to the adapter. The inputs' sha256 must match
their records; litgpt writes into a scratch directory inside the target, and the result is hashed and
renamed into place (a kill leaves no half-written ``lit_model.pth``). Then verifies the result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml
from litgpt.scripts.merge_lora import merge_lora

from core.checkpoints import CONFIG, WEIGHTS, CheckpointError, copy_side_files, verify_checkpoint
from core.integrity import SUFFIX, TEMP_MARK, IntegrityError, clean_stale_temps, copy_file, move, record, sidecar, verify
from core.methods import METHODS, unmerged_method

LORA = f"{WEIGHTS}.lora"
HPARAMS = "hyperparameters.yaml"  # litgpt's merge_lora reads the base directory, precision and LoRA config from it


def merge(checkpoint_dir: Path, out_dir: Path | None = None, base_checkpoint_dir: Path | None = None) -> Path:
    """Merge the adapter in ``checkpoint_dir``; returns the directory holding the merged checkpoint.

    Args:
        checkpoint_dir: a finetune output directory holding ``lit_model.pth.lora`` and ``hyperparameters.yaml``.
        out_dir: optional clean directory the merged checkpoint is written to (instead of ``checkpoint_dir``).
        base_checkpoint_dir: the base model, if it moved since training (default: as recorded at training); given,
            an earlier merge next to the adapter is redone from it; refused for a standalone checkpoint.
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = {p.name for p in checkpoint_dir.iterdir()} if checkpoint_dir.is_dir() else set()
    method = unmerged_method(files)
    if method is None and WEIGHTS in files and LORA not in files:
        if base_checkpoint_dir is not None:
            raise ValueError(f"base_checkpoint_dir: {checkpoint_dir} is already standalone ({WEIGHTS}, no adapter), so no base is read; drop it")
        verify_checkpoint(checkpoint_dir)  # already standalone (full finetune or base): link or copy
        return _link_out(checkpoint_dir, out_dir) if out_dir is not None else checkpoint_dir
    if method is not None and not method.mergeable:
        raise CheckpointError(
            f"{checkpoint_dir}: {method.name} adds attention prefixes that cannot be folded into the base weights; "
            f"serve the run directory as it is (make serve CKPT={checkpoint_dir}), which loads base + {method.weights_file}"
        )
    if LORA not in files:
        raise CheckpointError(f"{checkpoint_dir}: no finetuned weights here; point --checkpoint_dir at a run's final/ or step-*/ directory")
    target = checkpoint_dir if out_dir is None else Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    merged = target / WEIGHTS
    if target.resolve() != checkpoint_dir.resolve():
        shutil.copy2(checkpoint_dir / CONFIG, target / CONFIG)  # small files; the weights come from the merge
        copy_side_files(checkpoint_dir, target)
        _merge_atomically(checkpoint_dir, target, base_checkpoint_dir)  # an earlier merge's output is replaced
    else:
        if merged.is_file() and (base_checkpoint_dir is not None or merged.stat().st_mtime < (target / LORA).stat().st_mtime):
            merged.unlink()  # merged from an older adapter (or another base); litgpt would skip the merge and keep it
            sidecar(merged).unlink(missing_ok=True)
        if not merged.is_file():
            _merge_atomically(checkpoint_dir, target, base_checkpoint_dir)
    verify_checkpoint(target)
    return target


def _merge_atomically(checkpoint_dir: Path, target: Path, base_checkpoint_dir: Path | None) -> None:
    """litgpt's ``merge_lora`` on checked inputs, in a scratch directory inside ``target``; the result moves in with its sha256."""
    hparams_file = checkpoint_dir / HPARAMS
    hparams = (yaml.safe_load(hparams_file.read_text()) if hparams_file.is_file() else None) or {}
    base_dir = Path(base_checkpoint_dir or hparams.get("checkpoint_dir", ""))
    try:
        verify(checkpoint_dir / LORA)
        if (base_dir / WEIGHTS).is_file():
            verify(base_dir / WEIGHTS)
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None
    scratch = Path(tempfile.mkdtemp(dir=target, prefix=f".merge{TEMP_MARK}{os.getpid()}-"))
    try:
        for f in checkpoint_dir.iterdir():  # litgpt reads the adapter, config and tokenizer here
            if f.is_file() and f.name not in (WEIGHTS, HPARAMS) and not f.name.endswith(SUFFIX):
                (scratch / f.name).symlink_to(f.resolve())
        # ... and, from hyperparameters.yaml, the base directory, precision and flat lora_* keys (ours nests them: lora: {r: 8})
        litgpt_hparams = {"checkpoint_dir": str(base_dir), "precision": hparams.get("precision"), **METHODS["lora"].config_kwargs(hparams)}
        (scratch / HPARAMS).write_text(yaml.safe_dump(litgpt_hparams))
        merge_lora(scratch, pretrained_checkpoint_dir=base_checkpoint_dir)
        record(scratch / WEIGHTS)  # hashed once, as it is made
        move(scratch / WEIGHTS, target / WEIGHTS)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_out(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Put a standalone checkpoint in a clean serving directory: weights hard-linked (copied, hash checked, across file systems)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    for path in (out_dir / WEIGHTS, sidecar(out_dir / WEIGHTS)):
        path.unlink(missing_ok=True)
    try:
        os.link(checkpoint_dir / WEIGHTS, out_dir / WEIGHTS)  # the same bytes on disk once
        if sidecar(checkpoint_dir / WEIGHTS).is_file():
            shutil.copy2(sidecar(checkpoint_dir / WEIGHTS), sidecar(out_dir / WEIGHTS))
    except OSError:
        try:
            copy_file(checkpoint_dir / WEIGHTS, out_dir / WEIGHTS)  # atomic, hashed on the way, checked against the record
        except IntegrityError as e:
            raise CheckpointError(str(e)) from None
    shutil.copy2(checkpoint_dir / CONFIG, out_dir / CONFIG)
    copy_side_files(checkpoint_dir, out_dir)
    verify_checkpoint(out_dir)
    return out_dir


def main(checkpoint_dir: Path, out_dir: Path | None = None, base_checkpoint_dir: Path | None = None) -> None:
    """Merge a LoRA adapter into its base model (see ``merge``)."""
    print(f"merged checkpoint: {merge(checkpoint_dir, out_dir, base_checkpoint_dir)}")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
