"""The one place that decides the compute dtype and the bitsandbytes modes, for training and serving alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch

if TYPE_CHECKING:
    import lightning as L

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FABRIC_PRECISION = {"bf16": "bf16-true", "fp16": "16-true", "fp32": "32-true"}
PRECISION_DTYPE = {FABRIC_PRECISION[name]: dtype for name, dtype in DTYPES.items()}  # "bf16-true" -> torch.bfloat16

# Lightning's BitsandbytesPrecision modes (prefixed "bnb."): the 4-bit ones serve and train (QLoRA); int8 differs,
# LLM.int8() inference for serving and its trainable variant for finetuning.
Bnb4bit = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]
ServeQuantize = Literal[Bnb4bit, "bnb.int8"]
TrainQuantize = Literal[Bnb4bit, "bnb.int8-training"]
SERVE_QUANTIZE: tuple[str, ...] = get_args(ServeQuantize)
TRAIN_QUANTIZE: tuple[str, ...] = get_args(TrainQuantize)


def default_dtype(device: torch.device) -> str:
    """bf16 on GPUs that support it (Ampere and later), fp16 on older ones, fp32 on CPU."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_fabric(precision: str, quantize: str | None = None, plugin: type | None = None, **fabric_kwargs) -> L.Fabric:
    """A Fabric in ``precision``; with ``quantize`` (``bnb.<mode>``) Lightning's bitsandbytes plugin (or ``plugin``, a
    subclass) swaps the linear layers and computes in the dtype of ``precision``, which must then be a ``-true`` one."""
    import lightning as L

    if quantize is None:
        return L.Fabric(precision=precision, **fabric_kwargs)
    if precision not in PRECISION_DTYPE:
        raise ValueError(f"precision: quantization needs a '-true' precision ({list(PRECISION_DTYPE)}), got {precision!r}")
    if plugin is None:
        from lightning.fabric.plugins import BitsandbytesPrecision as plugin
    return L.Fabric(precision=None, plugins=plugin(quantize[4:], PRECISION_DTYPE[precision]), **fabric_kwargs)
