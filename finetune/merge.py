"""Merge a LoRA adapter into its base model: a standalone checkpoint the server (or vLLM) can load.

A full finetune is already standalone (copied as is); adapter methods cannot be merged (served unmerged).

    python -m finetune.merge --checkpoint_dir out/finetune/lora-tiny/final [--out_dir checkpoints/my-model]

Uses litgpt's own ``merge_lora``; then verifies the result and, with ``--out_dir``, copies the merged
checkpoint (weights, config, tokenizer, prompt style) to a clean directory for serving.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from litgpt.scripts.merge_lora import merge_lora

from core.checkpoints import CONFIG, WEIGHTS, CheckpointError, copy_side_files, verify_checkpoint
from core.methods import unmerged_method


def merge(checkpoint_dir: Path, out_dir: Path | None = None, base_checkpoint_dir: Path | None = None) -> Path:
    """Merge the adapter in ``checkpoint_dir``; returns the directory holding the merged checkpoint.

    Args:
        checkpoint_dir: a finetune output directory holding ``lit_model.pth.lora`` and ``hyperparameters.yaml``.
        out_dir: optional clean directory to copy the merged checkpoint into.
        base_checkpoint_dir: the base model, if it moved since training (default: as recorded at training).
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = {p.name for p in checkpoint_dir.iterdir()} if checkpoint_dir.is_dir() else set()
    method = unmerged_method(files)
    if method is None and WEIGHTS in files and f"{WEIGHTS}.lora" not in files:
        verify_checkpoint(checkpoint_dir)  # already standalone (full finetune or base): just copy
        return _copy_out(checkpoint_dir, out_dir) if out_dir is not None else checkpoint_dir
    if method is not None and not method.mergeable:
        raise CheckpointError(
            f"{checkpoint_dir}: {method.name} adds attention prefixes that cannot be folded into the base weights; "
            f"serve the run directory as it is (make serve CKPT={checkpoint_dir}), which loads base + {method.weights_file}"
        )
    if f"{WEIGHTS}.lora" not in files:
        raise CheckpointError(f"{checkpoint_dir}: no finetuned weights here; point --checkpoint_dir at a run's final/ or step-*/ directory")
    merged, adapter = checkpoint_dir / WEIGHTS, checkpoint_dir / f"{WEIGHTS}.lora"
    if merged.is_file() and merged.stat().st_mtime < adapter.stat().st_mtime:
        merged.unlink()  # merged from an older adapter; litgpt would skip the merge and keep it
    merge_lora(checkpoint_dir, pretrained_checkpoint_dir=base_checkpoint_dir)
    verify_checkpoint(checkpoint_dir)
    return _copy_out(checkpoint_dir, out_dir) if out_dir is not None else checkpoint_dir


def _copy_out(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Copy weights, config, tokenizer and prompt style to a clean serving directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        shutil.copy2(checkpoint_dir / name, out_dir / name)
    copy_side_files(checkpoint_dir, out_dir)
    verify_checkpoint(out_dir)
    return out_dir


def main(checkpoint_dir: Path, out_dir: Path | None = None, base_checkpoint_dir: Path | None = None) -> None:
    """Merge a LoRA adapter into its base model (see ``merge``)."""
    print(f"merged checkpoint: {merge(checkpoint_dir, out_dir, base_checkpoint_dir)}")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
