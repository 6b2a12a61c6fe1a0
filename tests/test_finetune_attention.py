"""Training drops a sliding window that can't exclude anything (flash attention instead of a mask)."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import yaml
from litgpt import GPT, Config

from core.checkpoints import WEIGHTS, save_checkpoint
from core.methods import METHODS
from finetune.run import attention_overrides, build_model


def _mistral_like(window: int) -> Config:
    return Config(
        name="tiny-window", n_layer=2, n_embd=64, n_head=4, n_query_groups=2, block_size=64, vocab_size=97,
        padded_vocab_size=97, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=96, bias=False,
        sliding_window_size=window, sliding_window_indices=[1, 1],
    )  # fmt: skip


def test_window_longer_than_the_sequence_changes_nothing() -> None:
    torch.manual_seed(0)
    windowed = GPT(_mistral_like(window=40)).eval()
    plain = GPT(Config(**{**asdict(_mistral_like(40)), **attention_overrides(windowed.config, 40)})).eval()
    assert plain.config.sliding_window_size is None
    plain.load_state_dict(windowed.state_dict())
    idx = torch.randint(0, 97, (2, 40))
    torch.testing.assert_close(plain(idx), windowed(idx), atol=1e-5, rtol=1e-5)
    # a window shorter than the sequence does change attention: it is kept
    assert attention_overrides(windowed.config, 41) == {}
    assert attention_overrides(GPT(Config(**{**asdict(_mistral_like(40)), "sliding_window_size": None})).config, 10) == {}


def test_build_model_drops_the_window_only_for_short_enough_data(tmp_path) -> None:
    torch.manual_seed(0)
    config = _mistral_like(window=48)
    base = tmp_path / "base"
    save_checkpoint(GPT(config).state_dict(), config, base, side_files_from=None)
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    lora = METHODS["lora"]
    cfg = {"lora_r": 4, "lora_alpha": 8, "lora_query": True, "lora_value": True}
    assert build_model(fabric, lora, cfg, base, None, max_seq_length=48).config.sliding_window_size is None
    assert build_model(fabric, lora, cfg, base, None, max_seq_length=64).config.sliding_window_size == 48
    assert yaml.safe_load((base / "model_config.yaml").read_text())["sliding_window_size"] == 48
    assert (base / WEIGHTS).is_file()
