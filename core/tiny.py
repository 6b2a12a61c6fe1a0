"""Build the embedded ``tiny`` default: tokenizer, random-init checkpoint and synthetic data.

Everything comes from text the repo ships and one seed, so a fresh machine with no model hub gets
the same checkpoint (same weight hash) every time. ``python -m core.tiny`` is what `make tiny` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from litgpt import GPT

from core.checkpoints import WEIGHTS, save_checkpoint, state_dict_sha256, write_source
from core.configs import config_from_name
from core.paths import CHECKPOINTS_DIR, DATA_DIR
from core.prompts import get_style
from core.synthetic_tasks import generate, write_jsonl
from core.tokenizer_training import train_hf_tokenizer

TINY_DIR = CHECKPOINTS_DIR / "tiny"
TINY_DATA_DIR = DATA_DIR / "generated" / "tiny"
CORPUS = DATA_DIR / "tiny_corpus.txt"
TEMPLATE = "qa"


def tokenizer_texts(train_rows: list[dict]) -> list[str]:
    """The shipped corpus plus the training split as the model will see it (never the held-out split)."""
    style = get_style(TEMPLATE)
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return lines + [f"{style.apply(r['instruction'], input=r['input'])} {r['output']}" for r in train_rows]


def init_weights(seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random init of the tiny config (PyTorch's default init, float32, on the CPU)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GPT(config_from_name("tiny"))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.state_dict()


def build_tiny(out_dir: Path = TINY_DIR, data_dir: Path = TINY_DATA_DIR, seed: int = 1337) -> str:
    """Write the data splits and a complete litgpt checkpoint; returns the weights' sha256."""
    train, test = generate(seed=seed)
    write_jsonl(train, data_dir / "train.jsonl")
    write_jsonl(test, data_dir / "test.jsonl")

    config = config_from_name("tiny")
    train_hf_tokenizer(tokenizer_texts(train), out_dir, vocab_size=config.vocab_size, max_length=config.block_size)
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    state_dict = init_weights(seed)
    save_checkpoint(state_dict, config, out_dir)
    write_source(out_dir, "tiny", "tiny", "built")
    return state_dict_sha256(state_dict)


def main(out_dir: Path = TINY_DIR, data_dir: Path = TINY_DATA_DIR, seed: int = 1337) -> None:
    """Build the embedded tiny model and its synthetic instruction data.

    Args:
        out_dir: where the litgpt-format checkpoint goes.
        data_dir: where train.jsonl and test.jsonl (held-out) go.
        seed: one seed for the data, the tokenizer's input and the weights.
    """
    digest = build_tiny(out_dir, data_dir, seed)
    print(f"tiny checkpoint: {out_dir / WEIGHTS} (sha256 of weights {digest[:16]}...)")
    print(f"tiny data:       {data_dir}/train.jsonl, {data_dir}/test.jsonl")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
