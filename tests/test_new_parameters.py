"""A model built with empty init (QLoRA's path) gets its method's own parameters initialized after loading.

Without it LoRA's A and B were whatever memory held (on CUDA: zeros on a fresh process, NaN after an earlier
model). The reference is the base model itself: with LoRA's B = 0, the adapter's gate = 0 and adapter v2's
scale 1 / bias 0 (their initializers), each method's model computes exactly what the base model computes,
and LoRA's A is random, so training can move.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from litgpt.model import GPT
from litgpt.utils import load_checkpoint

from core.checkpoints import WEIGHTS, load_config
from core.methods import METHODS
from finetune.new_parameters import load_and_initialize

METHOD_CONFIGS = {
    "lora": {"lora_r": 4, "lora_alpha": 8, "lora_query": True, "lora_value": True, "lora_mlp": True, "lora_head": True},
    "adapter": {"adapter_prompt_length": 4, "adapter_start_layer": 1},
    "adapter_v2": {"adapter_prompt_length": 4, "adapter_start_layer": 1},
}


def _empty_model(method_name: str, base_dir, garbage: float):
    """The method's model as QLoRA builds it (empty init), its memory filled with ``garbage`` first."""
    import dataclasses

    method = METHODS[method_name]
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    config = method.litgpt.Config(**{**dataclasses.asdict(load_config(base_dir)), **METHOD_CONFIGS[method_name]})
    with fabric.init_module(empty_init=True):
        model = method.litgpt.GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(garbage)
    method.freeze_all_but_trainable(model)
    return fabric, fabric.setup_module(model)


@pytest.mark.parametrize("method_name", ["lora", "adapter", "adapter_v2"])
@pytest.mark.parametrize("garbage", [0.0, float("nan")], ids=["zeros", "nan"])
def test_empty_init_model_starts_as_the_base_model(make_tiny_checkpoint, method_name: str, garbage: float) -> None:
    base_dir = make_tiny_checkpoint()
    fabric, model = _empty_model(method_name, base_dir, garbage)
    initialized = load_and_initialize(model, lambda: load_checkpoint(fabric, model, base_dir / WEIGHTS, strict=False))
    assert initialized, "nothing was initialized"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in trainable.values())

    reference = GPT(load_config(base_dir))
    reference.load_state_dict(torch.load(base_dir / WEIGHTS), strict=True)
    idx = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), rtol=1e-5, atol=1e-5)
    if method_name == "lora":
        a = [p for n, p in trainable.items() if n.endswith("lora_A")]
        b = [p for n, p in trainable.items() if n.endswith("lora_B")]
        assert a and b and len(a) == len(b)
        assert all(bool((p == 0).all()) for p in b)
        for p in a:  # kaiming_uniform(a=sqrt(5)): uniform on +-1/sqrt(fan_in)
            bound = p.shape[1] ** -0.5
            assert p.abs().max() <= bound and p.std() > bound / 4, p.shape


def test_a_base_weight_the_checkpoint_lacks_is_named(make_tiny_checkpoint, tmp_path) -> None:
    base_dir = make_tiny_checkpoint()
    state = torch.load(base_dir / WEIGHTS)
    del state["transformer.ln_f.weight"]
    torch.save(state, tmp_path / WEIGHTS)
    fabric, model = _empty_model("lora", base_dir, float("nan"))
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.weight"):
        load_and_initialize(model, lambda: load_checkpoint(fabric, model, tmp_path / WEIGHTS, strict=False))
