"""Merge a LoRA adapter into its base model: a standalone checkpoint the server (or vLLM) can load.

A full finetune is already standalone (linked or copied as is); adapter methods cannot be merged (served unmerged).

    python -m finetune.merge --checkpoint_dir out/finetune/lora-tiny/final [--out_dir checkpoints/my-model]

Uses litgpt's own ``merge_lora``, and writes the merged weights once: into ``--out_dir`` when it is
given (the run directory is left as it was), else next to the adapter. Then verifies the result.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from litgpt.scripts.merge_lora import merge_lora

from core.checkpoints import CONFIG, WEIGHTS, CheckpointError, copy_side_files, verify_checkpoint
from core.methods import unmerged_method

LORA = f"{WEIGHTS}.lora"
HPARAMS = "hyperparameters.yaml"  # litgpt's merge_lora reads the base directory, precision and LoRA config from it


def merge(checkpoint_dir: Path, out_dir: Path | None = None, base_checkpoint_dir: Path | None = None) -> Path:
    """Merge the adapter in ``checkpoint_dir``; returns the directory holding the merged checkpoint.

    Args:
        checkpoint_dir: a finetune output directory holding ``lit_model.pth.lora`` and ``hyperparameters.yaml``.
        out_dir: optional clean directory the merged checkpoint is written to (instead of ``checkpoint_dir``).
        base_checkpoint_dir: the base model, if it moved since training (default: as recorded at training).
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = {p.name for p in checkpoint_dir.iterdir()} if checkpoint_dir.is_dir() else set()
    method = unmerged_method(files)
    if method is None and WEIGHTS in files and LORA not in files:
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
    elsewhere = target.resolve() != checkpoint_dir.resolve()
    if elsewhere:
        # litgpt merges in the directory it is given: hand it a fresh one with the config and tokenizer
        # (small copies) and links to the adapter and its hyperparameters, removed once merged.
        target.mkdir(parents=True, exist_ok=True)
        (target / WEIGHTS).unlink(missing_ok=True)  # an earlier merge's output: litgpt would keep it
        shutil.copy2(checkpoint_dir / CONFIG, target / CONFIG)
        copy_side_files(checkpoint_dir, target)
        for name in (LORA, HPARAMS):
            (target / name).unlink(missing_ok=True)
            (target / name).symlink_to((checkpoint_dir / name).resolve())
    else:
        merged, adapter = target / WEIGHTS, target / LORA
        if merged.is_file() and merged.stat().st_mtime < adapter.stat().st_mtime:
            merged.unlink()  # merged from an older adapter; litgpt would skip the merge and keep it
    try:
        merge_lora(target, pretrained_checkpoint_dir=base_checkpoint_dir)
    finally:
        if elsewhere:
            for name in (LORA, HPARAMS):
                (target / name).unlink(missing_ok=True)
    verify_checkpoint(target)
    return target


def _link_out(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Put a standalone checkpoint in a clean serving directory: weights hard-linked (copied across file systems)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WEIGHTS).unlink(missing_ok=True)
    try:
        os.link(checkpoint_dir / WEIGHTS, out_dir / WEIGHTS)  # the same bytes on disk once
    except OSError:
        shutil.copy2(checkpoint_dir / WEIGHTS, out_dir / WEIGHTS)
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
