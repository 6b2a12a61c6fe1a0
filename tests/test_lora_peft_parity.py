"""One LoRA optimizer step with litgpt (what ``finetune.lora`` trains) equals the same step with HF PEFT.

Both sides start from the same weights: the tiny HF Llama checkpoint, and litgpt's conversion of it
(``core.hub.convert``). Both get the same LoRA weights (random A *and* nonzero random B, so that the
gradients of A are nonzero and the step is not trivial), mapped between the two layouts by
``litgpt_lora_to_peft`` below; the same right-padded batch with masked labels; the same AdamW step.

Checked:
- the losses (``finetune.loop.batch_loss`` vs HF's own ``labels=`` loss) agree: |diff| < LOSS_ATOL;
- every LoRA gradient agrees: ||g_lit - g_peft|| / ||g_peft|| < GRAD_RTOL (per tensor);
- every updated LoRA weight agrees: max |w_lit - w_peft| < WEIGHT_ATOL;
- no base weight moved on either side (bit-identical to before the step);
- after the step, merging (litgpt's ``merge_lora_weights`` vs PEFT's ``merge_and_unload``) gives logits
  that agree: max |diff| < LOGIT_ATOL.

Tolerances: everything runs in float32 on the CPU, but the two implementations order their
operations differently (fused qkv matmul plus a grouped conv1d for the LoRA branch vs three separate
projections, SDPA vs eager attention, different reductions), so they agree to float32 rounding, not
bit for bit. Observed over several seeds: loss diff 0-5e-7, gradient relative diff ~2e-6 (max
absolute ~5e-8), updated-weight diff ~5e-8, merged-logit diff ~1.5e-6. The bounds leave 20-100x
headroom and are still far below what a mapping error produces (``test_mapping_catches_a_swapped_slice``).

AdamW's eps is 1e-2, not the usual 1e-8, on purpose. On the first step AdamW moves each weight by
lr * g / (|g| + eps), whose slope in g is up to lr / eps (at g ~ 0); a rounding difference d in a
gradient element near zero therefore becomes up to lr * d / eps in the weight. With d ~ 5e-8 and
eps = 1e-8 that is unbounded in practice (observed: 1.4e-5 at an element with |g| = 1.5e-7, and a
sign flip of a ~0 gradient would give 2 * lr); with eps = 1e-2 it is at most 5e-8, safely below
WEIGHT_ATOL. eps does not weaken what is checked here (same gradients reach the same parameters, and
per-parameter optimizer state lines up); each LoRA tensor still moves by > 100 * WEIGHT_ATOL
(its largest element change).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4
WEIGHT_ATOL = 1e-6
LOGIT_ATOL = 1e-4

R, ALPHA = 4, 8
LR, BETAS, EPS = 1e-2, (0.9, 0.95), 1e-2  # eps: see the module docstring
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM


# ----------------------------------------------------------------------------- the layout mapping


def litgpt_lora_to_peft(named: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Map litgpt LoRA tensors (weights or their gradients) to PEFT's per-projection names.

    Keys of the result are PEFT's parameter names without the ``base_model.model.`` prefix and the
    adapter name, e.g. ``model.layers.0.self_attn.q_proj.lora_A.weight`` (the names PEFT's
    ``get_peft_model_state_dict`` writes to ``adapter_model.safetensors``). The values are views.

    Both libraries store ``lora_A`` as (r, in_features) and ``lora_B`` as (out_features, r), and
    both scale by ``alpha / r``, so single linear layers map one to one:

        litgpt                          PEFT (Llama)
        transformer.h.{i}.attn.proj  -> model.layers.{i}.self_attn.o_proj
        transformer.h.{i}.mlp.fc_1   -> model.layers.{i}.mlp.gate_proj   (silu(fc_1(x)) * fc_2(x))
        transformer.h.{i}.mlp.fc_2   -> model.layers.{i}.mlp.up_proj
        transformer.h.{i}.mlp.proj   -> model.layers.{i}.mlp.down_proj
        lm_head                      -> lm_head

    litgpt's fused ``attn.qkv`` (``LoRAQKVLinear``) holds one adapter per *enabled* projection,
    stacked in q, k, v order:

    - ``lora_A`` is (r * n_enabled, in): rows [0:r] are A of the first enabled projection, [r:2r] of
      the next, ... (the LoRA branch chunks A's output into n_enabled equal parts);
    - ``lora_B`` is (sum of enabled output sizes, r): rows split as ``qkv_shapes``, i.e.
      n_head * head_size for q and n_query_groups * head_size for each of k and v (GQA: k and v
      are smaller), each chunk multiplying only its own A chunk (the grouped ``conv1d``).

    The base ``qkv.linear.weight`` is [all q rows; all k rows; all v rows] in HF's own row order
    (litgpt's ``copy_weights_hf_llama`` is a plain ``torch.cat((q, k, v))``), so these B slices
    line up with PEFT's q_proj/k_proj/v_proj rows without any per-head permutation.
    """
    q_size = config.n_head * config.head_size
    kv_size = config.n_query_groups * config.head_size
    enabled = [p for p, on in zip(("q_proj", "k_proj", "v_proj"), (config.lora_query, config.lora_key, config.lora_value)) if on]
    sizes = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
    simple = {"attn.proj": "self_attn.o_proj", "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}

    out: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        if name in ("lm_head.lora_A", "lm_head.lora_B"):
            out[f"lm_head.{name.rsplit('.', 1)[1]}.weight"] = t
            continue
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc_1|mlp\.fc_2|mlp\.proj)\.(lora_[AB])", name)
        if m is None:
            raise KeyError(f"no PEFT counterpart known for litgpt parameter {name!r}")
        layer, module, ab = m.groups()
        if module != "attn.qkv":
            out[f"model.layers.{layer}.{simple[module]}.{ab}.weight"] = t
            continue
        parts = t.split(config.lora_r) if ab == "lora_A" else t.split([sizes[p] for p in enabled])
        assert len(parts) == len(enabled), f"{name}: {tuple(t.shape)} does not split into {enabled}"
        for proj, part in zip(enabled, parts):
            out[f"model.layers.{layer}.self_attn.{proj}.{ab}.weight"] = part
    return out


# ----------------------------------------------------------------------------- the two models


def _lit_lora(checkpoint_dir: Path):
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable

    from core.checkpoints import WEIGHTS, load_config

    base = load_config(checkpoint_dir)
    lora = dict(
        lora_r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        lora_query=True,
        lora_key=True,
        lora_value=True,
        lora_projection=True,
        lora_mlp=True,
        lora_head=True,
    )
    model = GPT(Config(**{**dataclasses.asdict(base), **lora}))
    state = torch.load(checkpoint_dir / WEIGHTS, weights_only=True, map_location="cpu")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all("lora_" in k for k in result.missing_keys), [k for k in result.missing_keys if "lora_" not in k]
    mark_only_lora_as_trainable(model)
    return model


def _peft_lora(hf_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS, bias="none")
    return get_peft_model(base, config)


def _peft_lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    """PEFT's trainable LoRA parameters under the names ``litgpt_lora_to_peft`` produces."""
    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            out[name.removeprefix(PEFT_PREFIX).replace(".default.", ".")] = p
    return out


def _batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Three sequences of different lengths, prompt tokens masked, right-padded by finetune.data.Collate."""
    from finetune.data import IGNORE_INDEX, Collate

    g = torch.Generator().manual_seed(7)
    rows = []
    for length, n_prompt in ((23, 9), (31, 4), (12, 6)):
        ids = torch.randint(3, vocab_size, (length,), generator=g)
        labels = ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels})
    batch = Collate(pad_id=0)(rows)
    assert (batch["labels"] == IGNORE_INDEX).any(dim=1).all() and not batch["mask"].all()  # masked and padded
    return batch


def _hf_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's loss: ``labels=`` shifts internally and averages over the non-ignored targets.

    No attention mask, as on the litgpt side (right padding: causal attention keeps real tokens from
    seeing the padding). Cross-checked against an explicit shifted cross-entropy so that both sides
    provably average over the same targets (``labels[:, 1:] != -100``).
    """
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    explicit = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(out.loss.item() - explicit.item()) < 1e-6
    return out.loss


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny HF checkpoint with litgpt's conversion (lit_model.pth) next to the HF files."""
    from core.hub import convert

    d = tmp_path_factory.mktemp("peft_parity") / "tiny"
    shutil.copytree(tiny_hf_dir, d)
    convert(d, "tiny")
    return d


def test_one_lora_step_matches_peft(hf_dir: Path) -> None:
    from litgpt.lora import merge_lora_weights

    from finetune.loop import batch_loss

    lit = _lit_lora(hf_dir).train()
    peft = _peft_lora(hf_dir).train()

    # Identical LoRA weights: random litgpt A and B, copied into PEFT through the mapping.
    lit_lora = {n: p for n, p in lit.named_parameters() if p.requires_grad}
    assert lit_lora and all("lora_" in n for n in lit_lora)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in lit_lora.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_lora = _peft_lora_params(peft)
    mapped = {k: v.clone() for k, v in litgpt_lora_to_peft({n: p.detach() for n, p in lit_lora.items()}, lit.config).items()}
    assert set(mapped) == set(peft_lora), sorted(set(mapped) ^ set(peft_lora))[:6]
    with torch.no_grad():
        for name, p in peft_lora.items():
            assert p.shape == mapped[name].shape, name
            p.copy_(mapped[name])
    lit_base = {n: p.detach().clone() for n, p in lit.named_parameters() if not p.requires_grad}
    peft_base = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}

    batch = _batch(lit.config.padded_vocab_size)
    lit_opt, peft_opt = _adamw(list(lit_lora.values())), _adamw(list(peft_lora.values()))
    lit_loss = batch_loss(lit, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    peft_loss = _hf_loss(peft, batch)
    assert abs(lit_loss.item() - peft_loss.item()) < LOSS_ATOL, (lit_loss.item(), peft_loss.item())
    lit_loss.backward()
    peft_loss.backward()

    lit_grads = litgpt_lora_to_peft({n: p.grad for n, p in lit_lora.items()}, lit.config)
    worst_grad = 0.0
    for name, p in peft_lora.items():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no gradient"
        rel = ((lit_grads[name] - p.grad).norm() / p.grad.norm()).item()
        worst_grad = max(worst_grad, rel)
        assert rel < GRAD_RTOL, f"{name}: gradient relative difference {rel:.3g}"

    lit_opt.step()
    peft_opt.step()
    updated = litgpt_lora_to_peft({n: p.detach() for n, p in lit_lora.items()}, lit.config)
    worst_weight = 0.0
    for name, p in peft_lora.items():
        moved = (p.detach() - mapped[name]).abs().max().item()
        assert moved > 100 * WEIGHT_ATOL, f"{name}: the step moved it by only {moved:.3g}"  # so the tolerance means something
        diff = (updated[name] - p.detach()).abs().max().item()
        worst_weight = max(worst_weight, diff)
        assert diff < WEIGHT_ATOL, f"{name}: updated weights differ by {diff:.3g}"
    for base, model in ((lit_base, lit), (peft_base, peft)):
        now = {n: p for n, p in model.named_parameters() if n in base}
        assert len(now) == len(base) > 0
        for n, p in now.items():
            assert torch.equal(p.detach(), base[n]), f"base weight {n} changed"

    lit.eval()
    merge_lora_weights(lit)
    merged = peft.merge_and_unload().eval()
    with torch.no_grad():
        idx = batch["input_ids"]
        logit_diff = (lit(idx) - merged(input_ids=idx).logits).abs().max().item()
    assert logit_diff < LOGIT_ATOL, f"merged logits differ by {logit_diff:.3g}"
    print(
        f"loss diff {abs(lit_loss.item() - peft_loss.item()):.2e}, worst grad rel diff {worst_grad:.2e}, "
        f"worst weight diff {worst_weight:.2e}, merged logit diff {logit_diff:.2e}"
    )


def test_mapping_catches_a_swapped_slice(hf_dir: Path) -> None:
    """The check has teeth: swapping the k and v adapters of one layer changes the loss far beyond LOSS_ATOL."""
    lit = _lit_lora(hf_dir)
    peft = _peft_lora(hf_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in lit.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        mapped = litgpt_lora_to_peft({n: p.detach() for n, p in lit.named_parameters() if p.requires_grad}, lit.config)
        params = _peft_lora_params(peft)
        for name, p in params.items():
            p.copy_(mapped[name])
        a = "model.layers.0.self_attn.{}_proj.lora_A.weight"
        params[a.format("k")].copy_(mapped[a.format("v")])
        params[a.format("v")].copy_(mapped[a.format("k")])
        batch = _batch(lit.config.padded_vocab_size)
        from finetune.loop import batch_loss

        diff = abs(batch_loss(lit, batch).item() - _hf_loss(peft, batch).item())
    print(f"loss diff with layer 0's k/v adapters swapped: {diff:.2e}")
    assert diff > 100 * LOSS_ATOL, diff
