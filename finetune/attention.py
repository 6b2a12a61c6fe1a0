"""Attention that stays inside each packed row: FlexAttention document masks on CUDA, a dense mask elsewhere.

litgpt's ``CausalSelfAttention`` passes whatever ``mask`` the block got to its
``scaled_dot_product_attention``. A dense boolean mask it already handles. ``use_document_attention``
gives each attention module a version that also takes a FlexAttention ``BlockMask`` and hands every
other mask to litgpt's own code, so unpacked batches, validation and serving are untouched.

On CUDA the mask is a FlexAttention ``BlockMask``: blocks that cross rows are skipped, so packed rows
cost about what the rows cost alone. FlexAttention has no CPU backward, so on the CPU (tests, the
tiny demo) the same mask is a dense boolean one for ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import functools
import math

import torch
from litgpt.model import CausalSelfAttention
from torch.nn.attention.flex_attention import BlockMask


def document_mask(documents: torch.Tensor, use_flex: bool | None = None):
    """Causal attention among tokens of the same packed row; ``documents``: (B, T) row number per token.

    A FlexAttention ``BlockMask`` on CUDA (or with ``use_flex``), else a dense (B, 1, T, T) bool mask,
    which litgpt's own attention already takes.
    """
    use_flex = documents.is_cuda if use_flex is None else use_flex
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q, kv):
            return (q >= kv) & (documents[b, q] == documents[b, kv])

        B, T = documents.shape
        return create_block_mask(
            same_document, B, None, T, T, device=documents.device, _compile=documents.is_cuda
        )  # uncompiled: ~35 ms a call on an H100
    T = documents.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal).unsqueeze(1)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a model can't attend by document mask (it then trains on padded batches), or None."""
    config = model.config
    for module in model.modules():
        if (
            isinstance(module, CausalSelfAttention)
            and type(module).scaled_dot_product_attention is not CausalSelfAttention.scaled_dot_product_attention
        ):
            return f"adapter prefixes in its attention ({type(module).__module__})"
    if config.attention_logit_softcapping is not None:
        return "attention logit softcapping"
    if config.sliding_window_size is not None:
        return f"a sliding window ({config.sliding_window_size}) shorter than data.max_seq_length"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _attend(attn: CausalSelfAttention, litgpt_attend, q, k, v, mask=None) -> torch.Tensor:
    if not isinstance(mask, BlockMask):
        return litgpt_attend(q, k, v, mask)
    scale = attn.mscale * attn.mscale / math.sqrt(attn.config.attention_scores_scalar or attn.config.head_size)
    return _compiled_flex()(q, k, v, block_mask=mask, scale=scale).transpose(1, 2)  # (B, T, nh, hs), as litgpt's


def use_document_attention(model: torch.nn.Module) -> int:
    """Let every attention module of ``model`` take a ``DocumentMask``; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, CausalSelfAttention) and not isinstance(module.scaled_dot_product_attention, functools.partial):
            module.scaled_dot_product_attention = functools.partial(_attend, module, module.scaled_dot_product_attention)
            changed += 1
    return changed
