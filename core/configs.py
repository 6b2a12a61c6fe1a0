"""Model configs we add to litgpt's registry: the embedded ``tiny`` default.

litgpt resolves names through ``litgpt.config.name_to_config`` (used by ``Config.from_name`` and by
``convert_hf_checkpoint``). Registering ours there lets the real litgpt code paths handle ``tiny``
exactly as they handle Mistral-7B, without copying any of litgpt.
"""

from __future__ import annotations

import litgpt.config
from litgpt import Config

# A Llama-architecture model of ~3.5M parameters: RMSNorm, RoPE, SwiGLU, grouped-query attention
# (8 heads sharing 4 KV groups, so GQA conversion paths are exercised), untied head. The block size
# equals HELM's 2048-token window so serving code sees the same limits as with a real model.
TINY = dict(
    name="tiny",
    hf_config=dict(org="local", name="tiny"),
    block_size=2048,
    vocab_size=1024,
    padded_vocab_size=1024,
    n_layer=4,
    n_head=8,
    n_query_groups=4,
    n_embd=256,
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    norm_class_name="RMSNorm",
    norm_eps=1e-5,
    mlp_class_name="LLaMAMLP",
    intermediate_size=704,
    rope_base=10000,
)

LOCAL_CONFIGS = [TINY]


def register_local_configs() -> None:
    """Make our configs resolvable by name everywhere in litgpt (idempotent)."""
    for conf in LOCAL_CONFIGS:
        if conf["name"] not in litgpt.config.name_to_config:
            litgpt.config.configs.append(conf)
            litgpt.config.name_to_config[conf["name"]] = conf


def config_from_name(name: str) -> Config:
    """``Config.from_name`` that also knows our local configs, with a clear error for unknown names."""
    register_local_configs()
    if name not in litgpt.config.name_to_config:
        raise ValueError(f"{name!r} is not a litgpt config name (nor one of ours: {[c['name'] for c in LOCAL_CONFIGS]})")
    return Config.from_name(name)


register_local_configs()
