"""Random-weight checkpoints of real architectures for GPU benchmarks (speed and memory don't depend on values)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from litgpt import GPT

from core.checkpoints import WEIGHTS, save_checkpoint
from core.configs import config_from_name


def write_random_checkpoint(config_name: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A litgpt checkpoint of ``config_name`` with random bf16 weights, built on the GPU (fast).

    The tokenizer comes from ``tokenizer_dir`` (e.g. the tiny model's); its vocabulary only has to be
    no larger than the model's.
    """
    if (out_dir / WEIGHTS).is_file():
        return out_dir
    config = config_from_name(config_name)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(seed)
        model = GPT(config).to(torch.bfloat16)
    save_checkpoint({k: v.cpu() for k, v in model.state_dict().items()}, config, out_dir, side_files_from=tokenizer_dir)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out_dir
