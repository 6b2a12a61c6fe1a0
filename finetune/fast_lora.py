"""litgpt's fused q/k/v LoRA layer with one matmul where it runs grouped 1x1 convolutions.

``LoRAQKVLinear`` applies its B matrices with ``F.conv1d`` (one call per q/k/v part when the model
has grouped queries), which is slow on GPUs and opaque to torch.compile. A block-diagonal B does
the same product as one matmul. Same parameters, same state dict, same result; only the class of
existing modules changes (``use_matmul_qkv_lora``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from litgpt.lora import LoRAQKVLinear


class MatmulQKVLoRA(LoRAQKVLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pretrained = self.linear(x)
        if self.r == 0 or not any(self.enable_lora) or self.merged:
            return pretrained
        after_a = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r * parts)
        b = torch.block_diag(*self.lora_B.split(self.qkv_shapes))  # (sum of part sizes, r * parts)
        return pretrained + self.zero_pad(F.linear(after_a, b)) * self.scaling


def use_matmul_qkv_lora(model: torch.nn.Module) -> int:
    """Switch every ``LoRAQKVLinear`` in ``model`` to ``MatmulQKVLoRA``; returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is LoRAQKVLinear:
            module.__class__ = MatmulQKVLoRA
            changed += 1
    return changed
