"""Which litgpt config a Hugging Face ``config.json`` describes, from litgpt's own registry.

``make convert`` needs a litgpt config name; the HF files already say what the model is. Every config
in ``litgpt.config.name_to_config`` (ours included) is compared with ``config.json`` on the fields that
fix the weights' shapes; the one that matches is the answer. Several matches (a base model and its
instruct twin share shapes) are told apart by ``_name_or_path`` or the directory's ``org/name``.
"""

from __future__ import annotations

import json
from pathlib import Path

import litgpt.config
from litgpt import Config

import core.configs  # noqa: F401  (registers our local configs)

HF_CONFIG = "config.json"
# (config.json key, litgpt Config attribute): the fields that decide every weight's shape, plus RoPE's base.
SHAPE_FIELDS = (
    ("num_hidden_layers", "n_layer"),
    ("hidden_size", "n_embd"),
    ("num_attention_heads", "n_head"),
    ("num_key_value_heads", "n_query_groups"),
    ("intermediate_size", "intermediate_size"),
    ("vocab_size", "padded_vocab_size"),
    ("head_dim", "head_size"),
    ("rope_theta", "rope_base"),
)
REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads")


class HFConfigError(ValueError):
    """``config.json`` is missing, unreadable, or maps to no single litgpt config; the message says what to pass."""


def read_hf_config(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / HF_CONFIG
    if not path.is_file():
        raise HFConfigError(f"{path}: not found; pass --model_name <litgpt config> (see checkpoints_manifest.json's litgpt_config)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(hf, dict):
        raise HFConfigError(f"{path}: expected a JSON object")
    return hf


def mismatches(hf: dict, config: Config) -> list[tuple[str, str, object, object]]:
    """``(hf key, litgpt field, config.json value, litgpt value)`` for each shape field that differs."""
    out = []
    for hf_key, lit_key in SHAPE_FIELDS:
        value = hf.get(hf_key)
        if hf_key == "num_key_value_heads" and value is None:
            value = hf.get("num_attention_heads")  # transformers' default: no grouping
        if value is None:
            continue
        expected = getattr(config, lit_key)
        if float(value) != float(expected):
            out.append((hf_key, lit_key, value, expected))
    return out


def _registry() -> list[Config]:
    return [Config(**conf) for conf in litgpt.config.name_to_config.values()]


def _named(config: Config, names: set[str]) -> bool:
    hf = config.hf_config or {}
    return bool({config.name.lower(), str(hf.get("name", "")).lower(), f"{hf.get('org', '')}/{hf.get('name', '')}".lower()} & names)


def infer_model_name(checkpoint_dir: Path) -> str:
    """The litgpt config name for the HF files in ``checkpoint_dir``; ``HFConfigError`` saying why not."""
    checkpoint_dir = Path(checkpoint_dir)
    hf = read_hf_config(checkpoint_dir)
    path = checkpoint_dir / HF_CONFIG
    if absent := [k for k in REQUIRED if k not in hf]:
        raise HFConfigError(f"{path}: has no {', '.join(absent)}, so litgpt cannot map it; pass --model_name <litgpt config>")
    registry = _registry()
    matching = [c for c in registry if not mismatches(hf, c)]
    if not matching:
        closest = min(registry, key=lambda c: len(mismatches(hf, c)))
        diff = ", ".join(f"{k}={v} (litgpt {lk}={e})" for k, lk, v, e in mismatches(hf, closest))
        raise HFConfigError(
            f"{path}: no litgpt config has these shapes (closest: {closest.name}, which differs in {diff}); litgpt 0.5.13 cannot convert this model"
        )
    if len(matching) == 1:
        return matching[0].name
    resolved = checkpoint_dir.resolve()
    names = {str(hf.get("_name_or_path", "")).strip("/").lower(), resolved.name.lower(), f"{resolved.parent.name}/{resolved.name}".lower()} - {""}
    named = [c for c in matching if _named(c, names)]
    if len(named) == 1:
        return named[0].name
    raise HFConfigError(
        f"{path}: {len(matching)} litgpt configs have these shapes ({', '.join(sorted(c.name for c in matching))}); "
        "pass --model_name with the one this model is"
    )


def check_matches(checkpoint_dir: Path, config: Config) -> None:
    """Refuse a ``--model_name`` whose shapes differ from ``config.json`` (when there is one), before converting."""
    path = Path(checkpoint_dir) / HF_CONFIG
    if not path.is_file():
        return
    if diff := mismatches(read_hf_config(checkpoint_dir), config):
        shown = ", ".join(f"{k}={v} but {config.name} has {lk}={e}" for k, lk, v, e in diff)
        raise HFConfigError(f"{path}: {shown}; pass the --model_name of this model, or leave it out to infer it from {HF_CONFIG}")
