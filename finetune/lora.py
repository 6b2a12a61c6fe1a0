"""LoRA and QLoRA finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.lora --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl
    python -m finetune.lora --checkpoint_dir checkpoints/mistralai/Mistral-7B-v0.1 --quantize bnb.nf4 \\
        --data.recipe data/recipes/rtx4090_mix.yaml --max_time 23h          # QLoRA on a 4090
    python -m finetune.lora --config out/finetune/lora-tiny/final/hyperparameters.yaml   # replay a run

``final/`` holds ``lit_model.pth.lora`` (adapter only) and what merge and serving need;
``python -m finetune.merge`` writes a standalone checkpoint.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from finetune.config import Quantize, RunConfig, main


@dataclass
class LoRAArgs:
    """Rank, alpha, dropout and which layers get adapters (all linear layers and the head by default)."""

    r: int = 16
    """rank of each adapter"""
    alpha: int = 32
    """the adapter's output is scaled by alpha / r"""
    dropout: float = 0.0
    """dropout on the adapter's input"""
    query: bool = True
    """adapt the attention's query projection"""
    key: bool = True
    """adapt the key projection"""
    value: bool = True
    """adapt the value projection"""
    projection: bool = True
    """adapt the attention's output projection"""
    mlp: bool = True
    """adapt the MLP's linear layers"""
    head: bool = True
    """adapt the LM head"""

    def as_config(self) -> dict:
        """The litgpt ``Config`` fields these set (``lora_r``, ``lora_query``, ...)."""
        return {f"lora_{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclass
class LoRARun(RunConfig):
    """Finetune checkpoint_dir with LoRA (QLoRA with --quantize). --config <run>/final/hyperparameters.yaml replays a run."""

    method: ClassVar[str] = "lora"
    group: ClassVar[str | None] = "lora"
    out_dir: Path = Path("out/finetune/lora-tiny")
    lr: float = 2e-4
    quantize: Quantize | None = None
    """QLoRA: keep the frozen base in 4 or 8 bit with bitsandbytes (CUDA only)"""
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    """rank, alpha, dropout and which layers get adapters"""


def setup(**options) -> Path:
    """Finetune with LoRA; ``options`` are ``LoRARun``'s fields. Returns the final adapter directory."""
    from finetune.run import run

    return run(LoRARun(**options))


if __name__ == "__main__":
    main(LoRARun)
