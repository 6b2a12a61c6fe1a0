"""QLoRA's 4-bit linear layers as one torch custom op, so torch.compile traces them inside each block.

bitsandbytes' own layer is an autograd function that torch.compile cannot trace; left outside the
compiled blocks (``finetune.speed.keep_quantized_layers_eager``) it splits every block into eager
pieces, and on an H200 a Mistral-7B QLoRA step left the GPU idle ~99 of its 272 ms. Here the layer is
``finetune::linear_4bit``: bitsandbytes' own dequantization op (``torch.ops.bitsandbytes.dequantize_4bit``,
double-quantized scales included) then ``F.linear``, opaque to the compiler, with a backward that
dequantizes again (``finetune::linear_4bit_grad_input``) and saves only the packed bytes and scales,
as bitsandbytes does. The graph around it stays whole.

Same kernels, same order, so the result is bitsandbytes' bit for bit, when the weight is dequantized to
its stored dtype; stored as float16 (Lightning's default) and computed in bf16, the op casts after, as
bitsandbytes does (a pass over the weight). Stored in the compute dtype (``finetune.quantized_storage``)
there is no cast. ``check_in_block`` compares it with bitsandbytes' layer on the real weights.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _weight(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    out_features: int,
    in_features: int,
    storage_dtype: torch.dtype,
    dtype: torch.dtype,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    blocksize2: int,
    offset: torch.Tensor | None,
) -> torch.Tensor:
    """bitsandbytes' ``functional.dequantize_4bit`` op for op, asked for the flat weight (its AVX-512 CPU
    kernel misreads 2-D shapes whose rows are not whole blocks; CUDA is flat either way), then cast as
    its ``MatMul4Bit`` does."""
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, blocksize2, torch.float32) + offset
    flat = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, [out_features * in_features], storage_dtype)
    w = flat.view(out_features, in_features)
    return w if storage_dtype == dtype else w.to(dtype)


@torch.library.custom_op("finetune::linear_4bit", mutates_args=())
def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    out_features: int,
    in_features: int,
    storage_dtype: torch.dtype,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    blocksize2: int,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x W^T + b with W the 4-bit weight dequantized to x's dtype (the bias inside the GEMM, as bitsandbytes has it)."""
    w = _weight(packed, absmax, blocksize, quant_type, out_features, in_features, storage_dtype, x.dtype, absmax2, code2, blocksize2, offset)
    return F.linear(x, w, bias)


@linear_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, out_features, in_features, storage_dtype, absmax2, code2, blocksize2, offset, bias):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("finetune::linear_4bit_grad_input", mutates_args=())
def linear_4bit_grad_input(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    out_features: int,
    in_features: int,
    storage_dtype: torch.dtype,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    blocksize2: int,
    offset: torch.Tensor | None,
) -> torch.Tensor:
    """grad W, W dequantized again (as bitsandbytes' backward does: no float weight is kept)."""
    w = _weight(packed, absmax, blocksize, quant_type, out_features, in_features, storage_dtype, grad.dtype, absmax2, code2, blocksize2, offset)
    return torch.matmul(grad, w)


@linear_4bit_grad_input.register_fake
def _(grad, packed, absmax, blocksize, quant_type, out_features, in_features, storage_dtype, absmax2, code2, blocksize2, offset):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx, inputs, output) -> None:
    _, packed, absmax, blocksize, quant_type, out_features, in_features, storage_dtype, absmax2, code2, blocksize2, offset, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(packed, absmax, absmax2, code2, offset)  # the packed weight only, as bitsandbytes keeps it
    ctx.args = (blocksize, quant_type, out_features, in_features, storage_dtype, blocksize2)


def _backward(ctx, grad: torch.Tensor):
    packed, absmax, absmax2, code2, offset = ctx.saved_tensors
    blocksize, quant_type, out_features, in_features, storage_dtype, blocksize2 = ctx.args
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_4bit_grad_input(
            grad, packed, absmax, blocksize, quant_type, out_features, in_features, storage_dtype, absmax2, code2, blocksize2, offset
        )
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[12]:  # summed in bitsandbytes' order: its sum(0), then autograd's to the bias shape
        grad_bias = grad.sum(0).sum_to_size(out_features)
    return (grad_x,) + (None,) * 11 + (grad_bias,)


linear_4bit.register_autograd(_backward, setup_context=_setup_context)


def op_arguments(weight) -> tuple:
    """Everything but ``x`` that ``linear_4bit`` takes, from a ``bitsandbytes.nn.Params4bit``."""
    state = weight.quant_state
    packed = weight.data if weight.data.dtype == torch.uint8 else weight.data.view(torch.uint8)
    out_features, in_features = state.shape
    nested = (state.state2.absmax, state.state2.code, state.state2.blocksize, state.offset) if state.nested else (None, None, 0, None)
    return (packed, state.absmax, state.blocksize, state.quant_type, out_features, in_features, state.dtype, *nested)


def in_block_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bitsandbytes.nn.Linear4bit.forward``'s dtype handling around ``linear_4bit``, traceable."""
    compute_dtype = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(compute_dtype)
    return linear_4bit(x.to(compute_dtype), *self.linear_4bit_arguments, bias).to(x.dtype)


def use_in_block_linear_4bit(layers: list[torch.nn.Module]) -> int:
    """Route each bitsandbytes ``Linear4bit`` through ``linear_4bit``; returns how many.

    The arguments are read from the weight once, here (after the weights are loaded and quantized);
    the layer's ``forward`` is replaced on the instance, its weights and state dict stay.
    """
    for layer in layers:
        layer.linear_4bit_arguments = op_arguments(layer.weight)
        layer.forward = types.MethodType(in_block_forward, layer)
        layer.traced_in_block = True  # keep_quantized_layers_eager leaves it inside the compiled block
    return len(layers)


def check_in_block(layer: torch.nn.Module, tokens: int = 8) -> str:
    """Compare ``linear_4bit`` with bitsandbytes' own layer on ``layer``'s real weight: output and input
    gradient, in the dtype training uses. Returns a verdict; raises ``ValueError`` unless bit-identical."""
    dtype = getattr(layer, "compute_dtype", None) or layer.weight.quant_state.dtype
    generator = torch.Generator(device=layer.weight.device).manual_seed(0)
    x = torch.randn(tokens, layer.in_features, device=layer.weight.device, generator=generator).to(dtype)
    results = []
    for forward in (type(layer).forward, in_block_forward):
        if forward is in_block_forward and not hasattr(layer, "linear_4bit_arguments"):
            layer.linear_4bit_arguments = op_arguments(layer.weight)
        xi = x.clone().requires_grad_(True)
        y = forward(layer, xi)
        (grad,) = torch.autograd.grad(y, xi, torch.ones_like(y))  # the input gradient only: no .grad is touched
        results.append((y.detach(), grad))
    (y_bnb, g_bnb), (y_op, g_op) = results
    if torch.equal(y_bnb, y_op) and torch.equal(g_bnb, g_op):
        return "bit-identical to bitsandbytes"
    diff = max((y_bnb.float() - y_op.float()).abs().max().item(), (g_bnb.float() - g_op.float()).abs().max().item())
    raise ValueError(
        f"in-block 4-bit layer differs from bitsandbytes' (max |diff| {diff:.3e}; stored as {layer.weight.quant_state.dtype}, computed in {dtype})"
    )
