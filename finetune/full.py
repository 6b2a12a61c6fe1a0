"""Full finetuning (every weight trains) of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.full --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Needs weights, gradients and AdamW state for the whole model: fine for the tiny model and for ~1B
models on one GPU, too much for 7B on a 24 GB card (use ``finetune.lora --quantize bnb.nf4``).
``final/lit_model.pth`` is a complete checkpoint the server loads directly.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from finetune.config import RunConfig, main


@dataclass
class FullRun(RunConfig):
    """Finetune every weight of checkpoint_dir (no --quantize: 4/8-bit weights cannot train). --config <run>/final/hyperparameters.yaml replays a run."""

    method: ClassVar[str] = "full"
    out_dir: Path = Path("out/finetune/full-tiny")
    lr: float = 2e-5


def setup(**options) -> Path:
    """Finetune every weight; ``options`` are ``FullRun``'s fields. Returns the final (standalone) checkpoint directory."""
    from finetune.run import run

    return run(FullRun(**options))


if __name__ == "__main__":
    main(FullRun)
