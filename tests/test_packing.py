"""Sequence packing: packed rows train exactly like the same rows padded (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
from litgpt.lora import GPT as LoRAGPT
from litgpt.lora import Config as LoRAConfig
from litgpt.lora import mark_only_lora_as_trainable
from litgpt.model import GPT, Config

from finetune.attention import document_mask, unsupported_reason, use_document_attention
from finetune.data import IGNORE_INDEX, Collate
from finetune.forward import hidden_states, next_token_loss, training_loss
from finetune.packing import PackCollate, PackedBatches, pack_rows

ARCHS = {
    "gqa-llama": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=96, mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm"),
    "mha-neox-partial-rope": dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=4, rotary_percentage=0.5, parallel_residual=True, bias=True),
}


def _rows(vocab: int, lengths: list[int], seed: int = 0, prompt: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: min(prompt, n - 1)] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _model(arch: str, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(name="t", block_size=64, vocab_size=101, padded_vocab_size=101, **ARCHS[arch])
    if lora:
        model = LoRAGPT(
            LoRAConfig(
                **kwargs, lora_r=4, lora_alpha=8, lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True, lora_head=True
            )
        )
        mark_only_lora_as_trainable(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapters matter
                torch.nn.init.normal_(p, std=0.1)
    else:
        model = GPT(Config(**kwargs))
    use_document_attention(model)
    return model.double()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_packed_loss_and_grads_equal_padded(arch: str, lora: bool) -> None:
    model = _model(arch, lora)
    rows = _rows(101, [5, 17, 9, 30, 2, 12])
    padded = Collate()(rows)
    loss_padded = training_loss(model, padded)
    loss_padded.backward()
    grads_padded = _grads(model)
    model.zero_grad()

    packed = PackCollate(length=48)([[rows[0], rows[1], rows[2]], [rows[3], rows[4], rows[5]]])
    assert int(packed["mask"].sum()) == sum(len(r["input_ids"]) for r in rows)
    loss_packed = training_loss(model, packed)
    loss_packed.backward()
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-12, atol=1e-12)
    grads_packed = _grads(model)
    assert grads_packed.keys() == grads_padded.keys() and grads_packed
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-6, atol=1e-8, msg=name)  # litgpt norms run in fp32


def test_one_row_per_packed_row_needs_no_document_mask() -> None:
    """Rows alone in their packed row (plus padding) take plain causal attention; the loss is the padded one."""
    model = _model("gqa-llama", lora=True)
    rows = _rows(101, [5, 17, 30])
    packed = PackCollate(length=32)([[r] for r in rows])
    assert "documents" not in packed and "positions" not in packed
    torch.testing.assert_close(training_loss(model, packed), training_loss(model, Collate()(rows)), rtol=1e-12, atol=1e-12)


def test_the_loss_matches_litgpts_logits() -> None:
    """``next_token_loss`` (head on labelled rows only, chunked) equals cross-entropy of GPT.forward's logits."""
    import finetune.forward as forward

    model = _model("gqa-llama", lora=True)
    batch = Collate()(_rows(101, [20, 33, 7], seed=3, prompt=5))
    logits = model(batch["input_ids"])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    hidden = hidden_states(model, batch["input_ids"])
    direct = next_token_loss(model, hidden, batch["labels"])
    old = forward.LOGITS_DIRECT, forward.HEAD_CHUNK_ROWS
    forward.LOGITS_DIRECT, forward.HEAD_CHUNK_ROWS = 0, 7  # force the recomputed chunks
    try:
        chunked = next_token_loss(model, hidden, batch["labels"], batch["target_index"])
    finally:
        forward.LOGITS_DIRECT, forward.HEAD_CHUNK_ROWS = old
    torch.testing.assert_close(direct, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)


def test_checkpointed_blocks_give_the_same_gradients() -> None:
    model = _model("gqa-llama", lora=True)
    batch = PackCollate(length=40)([_rows(101, [11, 20, 6], seed=5)])
    training_loss(model, batch).backward()
    plain = _grads(model)
    model.zero_grad()
    training_loss(model, batch, checkpoint_blocks=True).backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_flex_block_mask_allows_what_the_dense_mask_allows() -> None:
    """The CUDA path's FlexAttention mask (forward only: no CPU backward) against the dense one."""
    from torch.nn.attention.flex_attention import flex_attention

    documents = PackCollate(length=24)([_rows(50, [5, 9, 4]), _rows(50, [20, 3], seed=1)])["documents"]
    flex, dense = document_mask(documents, use_flex=True), document_mask(documents, use_flex=False)
    q, k, v = (torch.randn(2, 2, 24, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=flex), expected, rtol=1e-5, atol=1e-5)


def test_packing_fills_rows_keeps_every_row_once_and_resumes() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(20, 400, (2000,), generator=g)]
    bins = pack_rows(lengths, list(range(len(lengths))), capacity=512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sum(lengths) / (len(bins) * 512) > 0.95
    with pytest.raises(ValueError, match="max_seq_length"):
        pack_rows([600], [0], capacity=512)

    batches = PackedBatches(lengths, batch_size=3, capacity=512, seed=7)
    taken = [batches.next() for _ in range(batches.batches_per_epoch + 5)]  # into the second epoch
    resumed = PackedBatches(lengths, batch_size=3, capacity=512, seed=7)
    resumed.load_state_dict(batches.state_dict())
    again = PackedBatches(lengths, batch_size=3, capacity=512, seed=7)
    for _ in taken:
        again.next()
    assert resumed.next() == again.next()
    with pytest.raises(ValueError, match="packed_length"):
        PackedBatches(lengths, batch_size=3, capacity=1024, seed=7).load_state_dict(batches.state_dict())


def test_models_that_cannot_pack_say_why() -> None:
    from litgpt.adapter import GPT as AdapterGPT
    from litgpt.adapter import Config as AdapterConfig

    kwargs = dict(name="t", block_size=64, vocab_size=101, padded_vocab_size=101, **ARCHS["gqa-llama"])
    assert unsupported_reason(GPT(Config(**kwargs))) is None
    assert "adapter" in unsupported_reason(AdapterGPT(AdapterConfig(**kwargs, adapter_prompt_length=4, adapter_start_layer=0)))
    assert "window" in unsupported_reason(GPT(Config(**kwargs, sliding_window_size=8)))
    assert "softcapping" in unsupported_reason(GPT(Config(**kwargs, attention_logit_softcapping=30.0)))
