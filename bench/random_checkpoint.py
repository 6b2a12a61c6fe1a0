"""Random-weight checkpoints of real architectures for GPU benchmarks (speed and memory don't depend on values)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from litgpt import GPT

from core.checkpoints import WEIGHTS, save_checkpoint
from core.configs import config_from_name


def write_random_checkpoint(config_name: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A litgpt checkpoint of ``config_name`` with random bf16 weights, built on the GPU (fast).

    The tokenizer comes from ``tokenizer_dir`` (e.g. the tiny model's); its vocabulary only has to be
    no larger than the model's.
    """
    if (out_dir / WEIGHTS).is_file():
        return out_dir
    config = config_from_name(config_name)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(seed)
        model = GPT(config).to(torch.bfloat16)
    save_checkpoint({k: v.cpu() for k, v in model.state_dict().items()}, config, out_dir, side_files_from=tokenizer_dir)
    if (hf := hf_config(config)) is not None:  # lets finetune.export_hf (and the HF baselines) export it
        (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out_dir


def hf_config(config) -> dict | None:
    """The Hugging Face config.json of a Mistral or Llama architecture (what the real download ships)."""
    family = "mistral" if config.name.startswith("Mistral") else "llama" if "llama" in config.name.lower() else None
    if family is None:
        return None
    out = {
        "architectures": ["MistralForCausalLM" if family == "mistral" else "LlamaForCausalLM"],
        "model_type": family,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "vocab_size": config.padded_vocab_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_base),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "mistral":
        out["sliding_window"] = config.sliding_window_size
    return out
