"""HF -> litgpt conversion (core.hub.convert, i.e. litgpt's convert_hf_checkpoint) is exact, and
verify_checkpoint rejects corrupted conversions with a message naming what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core.checkpoints import WEIGHTS, CheckpointError, load_model, verify_checkpoint
from core.hub import convert

ATOL = 1e-4
# (batch, length) of the random token batches: one short sequence, a 2-sequence batch, a 300-token one.
SHAPES = [(1, 8), (2, 37), (1, 300)]


def _batches(vocab_size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab_size, shape, generator=g) for shape in SHAPES]


def _hf_model(hf_dir: Path, arch: str):
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[arch]
    return cls.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()


def _converted_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = convert(dst, "tiny")
    assert config.name == "tiny"
    return dst


@pytest.fixture(scope="module")
def converted_dir(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted (and verified) copy of the tiny HF Llama checkpoint; copy it before corrupting."""
    return _converted_copy(tiny_hf_dir, tmp_path_factory.mktemp("converted") / "tiny")


def _assert_same_logits(hf_dir: Path, lit_dir: Path, arch: str) -> None:
    hf = _hf_model(hf_dir, arch)
    lit = load_model(lit_dir)
    assert hf.config.vocab_size == lit.config.padded_vocab_size
    for idx in _batches(hf.config.vocab_size):
        with torch.no_grad():
            expected = hf(idx).logits.float()
            got = lit(idx).float()
        assert got.shape == expected.shape
        diff = (got - expected).abs().max().item()
        assert diff < ATOL, f"{arch} {tuple(idx.shape)}: max abs logit difference {diff:.3g}"
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), f"{arch} {tuple(idx.shape)}: greedy tokens differ"
    # The tolerance is meaningful: dropping RoPE from the reference (a typical conversion bug, e.g. q/k
    # rows permuted the wrong way) moves the logits by orders of magnitude more than ATOL.
    idx = _batches(hf.config.vocab_size)[-1]
    with torch.no_grad():
        no_rope = hf(idx, position_ids=torch.zeros_like(idx)).logits
        assert (no_rope - hf(idx).logits).abs().max().item() > 100 * ATOL


def test_convert_matches_hf_llama_logits(tiny_hf_dir: Path, converted_dir: Path) -> None:
    _assert_same_logits(tiny_hf_dir, converted_dir, "llama")


def test_convert_matches_hf_mistral_logits(make_tiny_hf_dir, tmp_path: Path) -> None:
    # Mistral without a sliding window is the Llama architecture with the same HF weight names, so
    # litgpt converts it through the same copy_weights_hf_llama path with model_name="tiny".
    hf_dir = make_tiny_hf_dir("mistral")
    lit_dir = _converted_copy(hf_dir, tmp_path / "tiny")
    _assert_same_logits(hf_dir, lit_dir, "mistral")


def test_convert_output_files(converted_dir: Path) -> None:
    for name in (WEIGHTS, "model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        assert (converted_dir / name).is_file(), name
    state = torch.load(converted_dir / WEIGHTS, weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert verify_checkpoint(converted_dir).name == "tiny"


def test_convert_dtype(tiny_hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_hf_dir, tmp_path / "tiny")
    convert(tmp_path / "tiny", "tiny", dtype="bfloat16")
    state = torch.load(tmp_path / "tiny" / WEIGHTS, weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def _corrupt_copy(converted_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the converted checkpoint with ``edit(state_dict)`` applied to lit_model.pth."""
    out = tmp_path / "corrupt"
    shutil.copytree(converted_dir, out)
    state = torch.load(out / WEIGHTS, weights_only=True)
    edit(state)
    torch.save(state, out / WEIGHTS)
    return out


def test_verify_catches_missing_tensor(converted_dir: Path, tmp_path: Path) -> None:
    name = "transformer.h.2.attn.qkv.weight"
    out = _corrupt_copy(converted_dir, tmp_path, lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match="missing") as err:
        verify_checkpoint(out)
    assert name in str(err.value)


def test_verify_catches_wrong_shape(converted_dir: Path, tmp_path: Path) -> None:
    name = "transformer.h.1.mlp.fc_1.weight"

    def edit(sd):
        sd[name] = sd[name][:-1].clone()  # as if intermediate_size were off by one

    out = _corrupt_copy(converted_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match="shape") as err:
        verify_checkpoint(out)
    assert name in str(err.value)


def test_verify_catches_unexpected_tensor(converted_dir: Path, tmp_path: Path) -> None:
    name = "transformer.h.4.attn.qkv.weight"  # a fifth layer the 4-layer config does not have

    def edit(sd):
        sd[name] = sd["transformer.h.0.attn.qkv.weight"].clone()

    out = _corrupt_copy(converted_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match="unexpected") as err:
        verify_checkpoint(out)
    assert name in str(err.value)


def test_verify_catches_missing_tokenizer(converted_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "no_tokenizer"
    shutil.copytree(converted_dir, out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json") as err:
        verify_checkpoint(out)
    assert str(out) in str(err.value)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_model(out)


def test_convert_rejects_missing_dir_and_unknown_config(tiny_hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "absent", "tiny")
    shutil.copytree(tiny_hf_dir, tmp_path / "x")
    with pytest.raises(ValueError, match="not a litgpt config name"):
        convert(tmp_path / "x", "no-such-config")
    assert not (tmp_path / "x" / WEIGHTS).exists()
