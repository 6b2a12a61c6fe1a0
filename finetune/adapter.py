"""LLaMA-Adapter finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.adapter --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Trains learned prompt prefixes (with zero-init gating) in the upper layers; ``final/`` holds
``lit_model.pth.adapter``. Adapters cannot be folded into the base weights: serve the run directory
itself (``make serve CKPT=<out_dir>/final``), which loads base + adapter.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from finetune.adapter_args import AdapterArgs
from finetune.config import Quantize, RunConfig, main


@dataclass
class AdapterRun(RunConfig):
    """Finetune checkpoint_dir with LLaMA-Adapter. --config <run>/final/hyperparameters.yaml replays a run."""

    method: ClassVar[str] = "adapter"
    group: ClassVar[str | None] = "adapter"
    out_dir: Path = Path("out/finetune/adapter-tiny")
    lr: float = 3e-3
    quantize: Quantize | None = None
    """keep the frozen base in 4 or 8 bit with bitsandbytes (CUDA only), as for QLoRA"""
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    """prefix length and first layer with an adapter"""


def setup(**options) -> Path:
    """Finetune with LLaMA-Adapter; ``options`` are ``AdapterRun``'s fields. Returns the final directory."""
    from finetune.run import run

    return run(AdapterRun(**options))


if __name__ == "__main__":
    main(AdapterRun)
