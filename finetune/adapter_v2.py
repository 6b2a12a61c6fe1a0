"""LLaMA-Adapter v2 finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.adapter_v2 --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Trains the adapter prefixes plus per-layer bias and scale terms and the norms; ``final/`` holds
``lit_model.pth.adapter_v2``. Options are those of ``finetune.adapter``. Adapters cannot be folded
into the base weights: serve the run directory itself (``make serve CKPT=<out_dir>/final``).
"""

from finetune.adapter import setup_for

setup = setup_for("adapter_v2")

if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(setup)
