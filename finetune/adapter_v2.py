"""LLaMA-Adapter v2 finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.adapter_v2 --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Trains the adapter prefixes plus per-layer bias and scale terms and the norms; ``final/`` holds
``lit_model.pth.adapter_v2``. Options are those of ``finetune.adapter``. Adapters cannot be folded
into the base weights: serve the run directory itself (``make serve CKPT=<out_dir>/final``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from finetune.adapter import AdapterRun
from finetune.config import main


@dataclass
class AdapterV2Run(AdapterRun):
    """Finetune checkpoint_dir with LLaMA-Adapter v2. --config <run>/final/hyperparameters.yaml replays a run."""

    method: ClassVar[str] = "adapter_v2"
    out_dir: Path = Path("out/finetune/adapter_v2-tiny")


def setup(**options) -> Path:
    """Finetune with LLaMA-Adapter v2; ``options`` are ``AdapterV2Run``'s fields. Returns the final directory."""
    from finetune.run import run

    return run(AdapterV2Run(**options))


if __name__ == "__main__":
    main(AdapterV2Run)
