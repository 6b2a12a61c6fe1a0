"""The matmul q/k/v LoRA layer computes what litgpt's conv1d one does (outputs and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from litgpt.lora import GPT, Config

from finetune.fast_lora import AddmmLoRALinear, AddmmQKVLoRA, MatmulQKVLoRA, use_lora_addmm, use_matmul_qkv_lora


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("enabled", [(True, True, True), (True, False, True), (False, True, False)], ids=["qkv", "qv", "k"])
def test_matmul_qkv_lora_equals_litgpts(groups: int, enabled: tuple[bool, bool, bool]) -> None:
    torch.manual_seed(0)
    q, k, v = enabled
    config = Config(
        name="t",
        n_layer=1,
        n_embd=32,
        n_head=4,
        n_query_groups=groups,
        block_size=16,
        vocab_size=50,
        padded_vocab_size=50,
        lora_r=3,
        lora_alpha=6,
        lora_query=q,
        lora_key=k,
        lora_value=v,
    )
    litgpt_model = GPT(config).double()
    for name, p in litgpt_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ours = copy.deepcopy(litgpt_model)
    assert use_matmul_qkv_lora(ours) == 1 and isinstance(ours.transformer.h[0].attn.qkv, MatmulQKVLoRA)
    assert ours.state_dict().keys() == litgpt_model.state_dict().keys()
    idx = torch.randint(0, 50, (2, 16))
    litgpt_model(idx).square().mean().backward()
    ours(idx).square().mean().backward()
    torch.testing.assert_close(ours(idx), litgpt_model(idx), rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(ours.named_parameters(), litgpt_model.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_addmm_lora_equals_litgpts(dropout: float) -> None:
    """``add_lora`` layers: same outputs and LoRA gradients as litgpt's, on every kind of LoRA layer."""
    torch.manual_seed(1)
    config = Config(
        name="t",
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_query_groups=2,
        block_size=16,
        vocab_size=50,
        padded_vocab_size=50,
        intermediate_size=48,
        mlp_class_name="LLaMAMLP",
        lora_r=3,
        lora_alpha=6,
        lora_dropout=dropout,
        lora_query=True,
        lora_key=True,
        lora_value=True,
        lora_projection=True,
        lora_mlp=True,
        lora_head=True,
    )
    litgpt_model = GPT(config).double()
    for name, p in litgpt_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ours = copy.deepcopy(litgpt_model)
    use_matmul_qkv_lora(ours)
    assert use_lora_addmm(ours) == 2 * (2 + 3) + 1  # per block: qkv, proj, three MLP linears; and the head
    assert isinstance(ours.transformer.h[0].attn.qkv, AddmmQKVLoRA) and isinstance(ours.lm_head, AddmmLoRALinear)
    idx = torch.randint(0, 50, (2, 16))
    outputs = []
    for model in (litgpt_model, ours):
        torch.manual_seed(2)  # the same dropout masks: both draw them in the same order
        out = model(idx)
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(ours.named_parameters(), litgpt_model.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_addmm_leaves_partial_qkv_lora_alone() -> None:
    config = Config(
        name="t",
        n_layer=1,
        n_embd=32,
        n_head=4,
        block_size=8,
        vocab_size=50,
        padded_vocab_size=50,
        lora_r=2,
        lora_alpha=4,
        lora_query=True,
        lora_value=True,
    )
    model = GPT(config)
    use_matmul_qkv_lora(model)
    assert use_lora_addmm(model) == 0 and type(model.transformer.h[0].attn.qkv) is MatmulQKVLoRA
