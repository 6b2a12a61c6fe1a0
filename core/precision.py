"""The one place that decides the default compute dtype, for training and serving alike."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FABRIC_PRECISION = {"bf16": "bf16-true", "fp16": "16-true", "fp32": "32-true"}


def default_dtype(device: torch.device) -> str:
    """bf16 on GPUs that support it (Ampere and later), fp16 on older ones, fp32 on CPU."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
