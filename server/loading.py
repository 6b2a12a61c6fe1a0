"""Load a checkpoint for serving: model on the right device and dtype, its codec and template."""

from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoints import load_model, verify_checkpoint
from core.prompts import load_style
from server.generate import Generator
from server.text import Codec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_dtype(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_generator(checkpoint_dir: Path, device: str = "auto", dtype: str | None = None, use_template: bool = False) -> Generator:
    """A ready ``Generator`` for a merged (or base) checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    verify_checkpoint(checkpoint_dir)
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dtype = dtype or default_dtype(torch_device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: choose one of {sorted(DTYPES)}, got {dtype!r}")
    model = load_model(checkpoint_dir, device=torch_device, dtype=DTYPES[dtype])
    return Generator(model, Codec(checkpoint_dir), prompt_style=load_style(checkpoint_dir), use_template=use_template)
