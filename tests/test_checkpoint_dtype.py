"""Checkpointed blocks are recomputed under the forward's default dtype (Fabric's bf16-true sets it only inside
``fabric.autocast()``, and the backward runs outside it). On CUDA the recompute of compiled blocks under float32
saved other tensors than the forward (CheckpointError); here the dtype each run of a block sees is recorded."""

from __future__ import annotations

import lightning as L
import torch
from litgpt import GPT, Config

from finetune.forward import training_loss


def test_a_checkpointed_block_is_recomputed_under_the_forwards_default_dtype() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    config = Config(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100, padded_vocab_size=128, bias=False,
                    norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128)  # fmt: skip
    with fabric.init_module():
        gpt = GPT(config)
    model = fabric.setup(gpt)
    seen: list[torch.dtype] = []
    gpt.transformer.h[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_default_dtype()))
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    with fabric.autocast():
        loss = training_loss(model.module, {"input_ids": ids, "labels": ids}, checkpoint_blocks=True)
    assert seen == [torch.bfloat16]  # the forward, inside Fabric's bf16-true context
    fabric.backward(loss)
    assert torch.get_default_dtype() == torch.float32  # the backward's own default is untouched afterwards
    assert seen == [torch.bfloat16, torch.bfloat16]  # the recompute ran under the forward's dtype, not float32
    assert all(p.grad is not None for p in gpt.transformer.h[0].parameters())
