"""Faster forms of litgpt's LoRA layers: same parameters, same state dict, same function.

- ``MatmulQKVLoRA``: ``LoRAQKVLinear`` applies its B matrices with ``F.conv1d`` (one call per q/k/v part
  when the model has grouped queries), which is slow on GPUs and opaque to torch.compile. A
  block-diagonal B does the same product as one matmul (``use_matmul_qkv_lora``, always on).
- ``add_lora``: litgpt adds the LoRA term with three passes over the layer's output (B's product,
  the scaling, the sum). ``torch.addmm`` accumulates ``scaling * (x A^T) B^T`` into the base output in
  the GEMM itself (``use_lora_addmm``, ``--speed.lora_addmm``).

Only the class of existing modules changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from litgpt.lora import LoRALinear, LoRAQKVLinear


def add_lora(pretrained: torch.Tensor, after_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``pretrained + scaling * after_a @ lora_b.T`` as one GEMM that reads and writes the output once."""
    if pretrained.dtype != after_a.dtype:  # e.g. an 8-bit base layer's float16 output: addmm takes one dtype
        return pretrained + F.linear(after_a, lora_b) * scaling
    out = torch.addmm(pretrained.reshape(-1, pretrained.size(-1)), after_a.reshape(-1, after_a.size(-1)), lora_b.t(), alpha=scaling)
    return out.view(pretrained.shape)


class MatmulQKVLoRA(LoRAQKVLinear):
    def lora_b(self) -> torch.Tensor:
        """B as one block-diagonal matrix: (sum of part sizes, r * parts)."""
        return torch.block_diag(*self.lora_B.split(self.qkv_shapes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pretrained = self.linear(x)
        if self.r == 0 or not any(self.enable_lora) or self.merged:
            return pretrained
        after_a = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r * parts)
        return pretrained + self.zero_pad(F.linear(after_a, self.lora_b())) * self.scaling


class _AddmmForward:
    """The forward of a LoRA layer whose B (``lora_b()``) is applied by ``add_lora``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pretrained = self.linear(x)
        if self.r == 0 or self.merged:
            return pretrained
        return add_lora(pretrained, F.linear(self.lora_dropout(x), self.lora_A), self.lora_b(), self.scaling)


class AddmmQKVLoRA(_AddmmForward, MatmulQKVLoRA):
    """``MatmulQKVLoRA`` with ``add_lora``; only for q, k and v all adapted (no zero padding between parts)."""


class AddmmLoRALinear(_AddmmForward, LoRALinear):
    def lora_b(self) -> torch.Tensor:
        return self.lora_B


def use_matmul_qkv_lora(model: torch.nn.Module) -> int:
    """Switch every ``LoRAQKVLinear`` in ``model`` to ``MatmulQKVLoRA``; returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is LoRAQKVLinear:
            module.__class__ = MatmulQKVLoRA
            changed += 1
    return changed


def use_lora_addmm(model: torch.nn.Module) -> int:
    """Switch LoRA layers to their ``add_lora`` forms (after ``use_matmul_qkv_lora``); returns how many."""
    changed = 0
    for module in model.modules():
        if getattr(module, "r", 0) == 0:  # litgpt's LoRA layers with LoRA switched off: plain linears
            continue
        if type(module) is LoRALinear:
            module.__class__ = AddmmLoRALinear
        elif type(module) is MatmulQKVLoRA and all(module.enable_lora):
            module.__class__ = AddmmQKVLoRA
        else:
            continue
        changed += 1
    return changed
