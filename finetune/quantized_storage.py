"""QLoRA weights quantized from the compute dtype (bf16) instead of Lightning's float16.

Lightning's ``BitsandbytesPrecision`` casts every weight to float16 before quantizing it, so the stored
``quant_state.dtype`` is float16: each step then dequantizes to float16 and casts to bf16 (on an H200,
40 of a Mistral-7B QLoRA step's 272 ms went to that cast, ``direct_copy_kernel``), and the weight is
rounded twice. Quantized from bf16 (a bf16 checkpoint's own values), it dequantizes straight to bf16,
and bitsandbytes' dequantization op asked for bf16 is then bit-identical to bitsandbytes' layer.
Same packed bytes per weight, same memory.
"""

from __future__ import annotations

import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.plugins.precision.bitsandbytes import _replace_param


class ComputeDtypeStorage(BitsandbytesPrecision):
    """``BitsandbytesPrecision`` whose 4-bit layers quantize from ``dtype`` (int8 modes: unchanged)."""

    def __init__(self, mode: str, dtype: torch.dtype) -> None:
        super().__init__(mode, dtype)
        import bitsandbytes as bnb

        base = self._linear_cls
        if issubclass(base, bnb.nn.Linear4bit):
            self._linear_cls = type(base.__name__, (base,), {"quantize": staticmethod(quantizer(dtype))})


def quantizer(storage_dtype: torch.dtype):
    """The ``quantize(params4bit, weight, device)`` of Lightning's 4-bit layer, casting to ``storage_dtype``."""

    def quantize(params4bit, weight: torch.Tensor, device: torch.device | None):
        import bitsandbytes as bnb

        w = weight.contiguous().to(device=device or torch.device("cuda"), dtype=storage_dtype)
        w_4bit, quant_state = bnb.functional.quantize_4bit(
            w,
            blocksize=params4bit.blocksize,
            compress_statistics=params4bit.compress_statistics,
            quant_type=params4bit.quant_type,
            quant_storage=params4bit.quant_storage,
        )
        return _replace_param(params4bit, w_4bit, quant_state)

    return quantize
