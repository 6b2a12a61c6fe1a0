"""QLoRA's 4-bit linear layers with a dequantization that torch.compile fuses into one kernel.

A frozen 4-bit weight is turned back into bf16 twice a step: in the forward, and again in the
backward for the input gradient (QLoRA keeps no bf16 copy: that is where its memory goes). On an H100,
bitsandbytes' kernels spent ~170 of the 305 ms of a Mistral-7B QLoRA step at 2048 tokens on those two
passes. Here the same dequantization is written in plain torch ops and compiled once (one dynamic-shape
kernel for every layer), and the layer runs it inside an autograd function that keeps only the packed
weight for the backward.

Same storage (bitsandbytes' packed bytes and ``QuantState``, double quantization included), so saving,
merging and serving are untouched; the numbers are those of bitsandbytes' CUDA kernel (code x absmax in
float32, then rounded), which ``check_against_bitsandbytes`` checks on the real weights before training.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Packed4bit:
    """What dequantizing one bitsandbytes 4-bit weight needs, as flat tensors."""

    data: torch.Tensor  # uint8, two 4-bit codes a byte, the first in the high nibble
    absmax: torch.Tensor  # float32 scale per block; uint8 when double-quantized
    code: torch.Tensor  # the 16 values of nf4 or fp4, float32
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    absmax_absmax: torch.Tensor | None = None  # double quantization: float32 scale per block of absmax
    absmax_code: torch.Tensor | None = None  # its 256-value 8-bit code
    absmax_blocksize: int = 256
    absmax_offset: torch.Tensor | None = None  # mean subtracted before quantizing absmax

    @classmethod
    def of(cls, weight) -> Packed4bit:
        """From a ``bitsandbytes.nn.Params4bit`` (its ``quant_state`` holds everything but the bytes)."""
        state = weight.quant_state
        data = weight.data if weight.data.dtype == torch.uint8 else weight.data.view(torch.uint8)
        nested = {}
        if state.nested:
            nested = dict(
                absmax_absmax=state.state2.absmax, absmax_code=state.state2.code, absmax_blocksize=state.state2.blocksize, absmax_offset=state.offset
            )
        return cls(data.reshape(-1), state.absmax, state.code, state.blocksize, tuple(state.shape), state.dtype, **nested)


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize], for any length (the last block may be short).

    Padded to whole blocks by the scale count (a pad of 0 is a no-op), so the compiled kernel needs no
    modulo guard on the symbolic length.
    """
    n = values.numel()
    values = F.pad(values, (0, scales.numel() * blocksize - n))
    return (values.view(-1, blocksize) * scales.view(-1, 1)).reshape(-1)[:n]


def dequantize_flat(
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    absmax_absmax: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_blocksize: int = 256,
    absmax_offset: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The flat weight: code[nibble] * absmax[block] in float32, rounded to the weight's ``dtype``.

    ``out_dtype``: then cast to this compute dtype, as bitsandbytes' matmul does (Lightning quantizes
    from float16, so a bf16 run rounds twice). Plain torch ops, so inductor makes one kernel of it all,
    double-quantized scales included.
    """
    if absmax_absmax is not None:  # double quantization: the scales are themselves 8-bit blockwise
        absmax = _blockwise(absmax_code[absmax.to(torch.int32)], absmax_absmax, absmax_blocksize) + absmax_offset
    packed = data.to(torch.int32)
    nibbles = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)
    weight = _blockwise(code[nibbles], absmax, blocksize).to(dtype)
    return weight if out_dtype is None or out_dtype == dtype else weight.to(out_dtype)


# How a layer dequantizes. "compiled": one kernel, the cast to the compute dtype included (inductor is
# asked to keep the float16 rounding before it: emulate_precision_casts). "compiled+cast": one kernel to
# the stored dtype, then a plain cast (one more pass over the weight), in case the first won't build or
# match. "eager": the same torch ops uncompiled (the reference; CPU tests).
FORMS = ("compiled", "compiled+cast", "eager")


@functools.cache
def _compiled_dequantize():
    return torch.compile(dequantize_flat, dynamic=True, options={"emulate_precision_casts": True})


def dequantize(packed: Packed4bit, form: str = "compiled", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of ``packed``, shaped as the original, in its own dtype or in ``out_dtype``."""
    if form not in FORMS:
        raise ValueError(f"dequantize form: one of {FORMS}, got {form!r}")
    fn = dequantize_flat if form == "eager" else _compiled_dequantize()
    cast_after = form == "compiled+cast" and out_dtype not in (None, packed.dtype)
    flat = fn(
        packed.data,
        packed.absmax,
        packed.code,
        packed.blocksize,
        packed.dtype,
        packed.absmax_absmax,
        packed.absmax_code,
        packed.absmax_blocksize,
        packed.absmax_offset,
        None if cast_after else out_dtype,
    )
    return (flat.to(out_dtype) if cast_after else flat).view(packed.shape)


class _Dequantized4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in the forward and again in the backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight_of):
        ctx.weight_of = weight_of
        ctx.has_bias = bias is not None
        return F.linear(x, weight_of(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ ctx.weight_of(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.size(-1)).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def _weight_of(module: torch.nn.Module, form: str, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(Packed4bit.of(module.weight), form, out_dtype=dtype)


def dequantized_forward(module: torch.nn.Module, weight_of, x: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.nn.Linear4bit.forward``'s dtype handling around ``_Dequantized4bitLinear``.

    ``weight_of(dtype)``: the layer's weight dequantized (read from the module at each call, so a
    re-quantized weight is picked up).
    """
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(module)
    compute_dtype = getattr(module, "compute_dtype", None) or x.dtype
    bias = None if module.bias is None else module.bias.to(compute_dtype)
    return _Dequantized4bitLinear.apply(x.to(compute_dtype), bias, weight_of).to(x.dtype)


def four_bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's bitsandbytes ``Linear4bit`` layers (nf4/fp4, with or without double quantization)."""
    if "bitsandbytes" not in sys.modules:  # a model with 4-bit layers has imported it; don't pay the import otherwise
        return []
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit) and getattr(m.weight, "quant_state", None) is not None]


def use_compiled_dequantize(model: torch.nn.Module, form: str = "compiled") -> int:
    """Route every 4-bit layer of ``model`` through ``dequantized_forward``; returns how many.

    The layers' own ``forward`` (bitsandbytes') is replaced on the instance; weights and state dict stay.
    """
    layers = four_bit_layers(model)
    for layer in layers:
        layer.forward = functools.partial(dequantized_forward, layer, functools.partial(_weight_of, layer, form))
    return len(layers)


def check_against_bitsandbytes(layer: torch.nn.Module, form: str = "compiled") -> str:
    """Compare our dequantization of ``layer``'s weight, in the dtype training uses, with bitsandbytes'.

    Returns a short verdict; raises ``ValueError`` when they differ by more than one rounding step of
    that dtype (then training should use bitsandbytes' kernels).
    """
    dtype = getattr(layer, "compute_dtype", None) or layer.weight.quant_state.dtype
    with torch.no_grad():  # as in training (inside the autograd function): the same compiled graph
        ours = dequantize(Packed4bit.of(layer.weight), form, out_dtype=dtype)
        theirs = bitsandbytes_dequantize_flat(layer.weight).view(ours.shape).to(dtype)
    if torch.equal(ours, theirs):
        return "bit-identical to bitsandbytes"
    diff = (ours.float() - theirs.float()).abs()
    tolerance = theirs.float().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
    if bool((diff <= tolerance).all()):
        return f"within one rounding step of bitsandbytes (max |diff| {diff.max().item():.2e})"
    raise ValueError(f"{form} dequantization differs from bitsandbytes' (max |diff| {diff.max().item():.3e})")


def bitsandbytes_dequantize_flat(weight) -> torch.Tensor:
    """bitsandbytes' dequantization of a ``Params4bit``, asked for as one flat vector, then shaped back.

    Its CUDA kernel treats every weight as flat (element i scaled by absmax[i // blocksize]), which is
    what the quantizer wrote. Its AVX-512 CPU kernel (0.49) instead restarts the block count on each row
    of a 2-D shape, so for rows that are not a multiple of the blocksize it reads the wrong scales; asked
    for the flat vector, every kernel (CUDA, AVX-512, AVX2, the generic torch one) agrees.
    """
    import copy

    import bitsandbytes.functional as bnbF

    state = copy.copy(weight.quant_state)
    state.shape = torch.Size([weight.quant_state.shape.numel()])
    return bnbF.dequantize_4bit(weight.data, state).view(weight.quant_state.shape)
