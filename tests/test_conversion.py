"""HF -> litgpt conversion (core.hub.convert, i.e. litgpt's convert_hf_checkpoint) is exact, and
verify_checkpoint rejects corrupted conversions with a message naming what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from core.checkpoints import WEIGHTS, CheckpointError, load_model, verify_checkpoint
from core.hub import convert
from core.integrity import save_torch

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
    # The weights' sha256 is recorded once at conversion, in the format coreutils checks.
    subprocess.run(["sha256sum", "--check", "--status", f"{WEIGHTS}.sha256"], cwd=converted_dir, check=True)
    assert not [p.name for p in converted_dir.parent.iterdir() if p.name.startswith(".")]  # no scratch left


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
    save_torch(state, out / WEIGHTS)  # a sound file (hash recorded) holding the wrong tensors
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


# ----------------------------------------------------------------------------- config.json -> litgpt config


def test_convert_infers_the_litgpt_config_from_config_json(tiny_hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_hf_dir, tmp_path / "x")
    assert convert(tmp_path / "x").name == "tiny"  # no model_name: config.json's shapes are tiny's
    _assert_same_logits(tiny_hf_dir, tmp_path / "x", "llama")


@pytest.mark.parametrize(
    ("hf_cls", "directory", "expected"),
    [
        ("MistralConfig", "mistralai/Mistral-7B-v0.1", "Mistral-7B-v0.1"),
        ("LlamaConfig", "meta-llama/Llama-2-7b-hf", "Llama-2-7b-hf"),
    ],
)
def test_infer_model_name_from_transformers_default_configs(hf_cls: str, directory: str, expected: str, tmp_path: Path) -> None:
    # transformers' default MistralConfig / LlamaConfig are Mistral-7B-v0.1's and Llama-2-7b's: the real reference.
    import transformers
    from litgpt import Config

    from core.hf_config import HFConfigError, infer_model_name, mismatches

    hf = getattr(transformers, hf_cls)().to_dict()
    assert mismatches(hf, Config.from_name(expected)) == []
    twin = tmp_path / "elsewhere"  # the base model and its instruct twin share shapes: the name decides
    twin.mkdir()
    (twin / "config.json").write_text(json.dumps(hf))
    with pytest.raises(HFConfigError, match="litgpt configs have these shapes") as err:
        infer_model_name(twin)
    assert expected in str(err.value) and "--model_name" in str(err.value)
    named = tmp_path / directory
    named.mkdir(parents=True)
    (named / "config.json").write_text(json.dumps(hf))
    assert infer_model_name(named) == expected
    (twin / "config.json").write_text(json.dumps({**hf, "_name_or_path": directory}))
    assert infer_model_name(twin) == expected


def test_infer_model_name_refuses_shapes_litgpt_lacks(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from core.hf_config import HFConfigError

    shutil.copytree(tiny_hf_dir, tmp_path / "x")
    hf = json.loads((tmp_path / "x" / "config.json").read_text())
    (tmp_path / "x" / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 5}))
    with pytest.raises(HFConfigError, match=r"closest: tiny, which differs in num_hidden_layers=5 \(litgpt n_layer=4\)"):
        convert(tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no scratch directory left behind
    assert not (tmp_path / "x" / WEIGHTS).exists() and not (tmp_path / "x" / "model_config.yaml").exists()


def test_convert_refuses_model_name_that_contradicts_config_json(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from core.hf_config import HFConfigError

    shutil.copytree(tiny_hf_dir, tmp_path / "x")
    with pytest.raises(HFConfigError, match="num_hidden_layers=4 but pythia-14m has n_layer=6"):
        convert(tmp_path / "x", "pythia-14m")
    assert not (tmp_path / "x" / WEIGHTS).exists()


def test_failed_conversion_names_the_shapes_and_writes_nothing(tiny_hf_dir: Path, tmp_path: Path) -> None:
    # HF weights of a wider MLP than config.json says: litgpt converts them, our verification refuses them.
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_hf_dir, tmp_path / "x")
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    (tmp_path / "x" / WEIGHTS).write_bytes(b"an older conversion")  # kept as it was on failure
    weights = load_file(tmp_path / "x" / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj.weight"
    weights[name] = torch.zeros(weights[name].shape[0] + 8, weights[name].shape[1])
    save_file(weights, tmp_path / "x" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        convert(tmp_path / "x", "tiny")
    assert "transformer.h.1.mlp.fc_1.weight expected (704, 256) got (712, 256)" in str(err.value)
    assert (tmp_path / "x" / WEIGHTS).read_bytes() == b"an older conversion"
    assert not (tmp_path / "x" / "model_config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted([*before, WEIGHTS])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_convert_records_its_source_and_can_keep_one_copy_of_the_weights(tiny_hf_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--delete_hf_weights leaves lit_model.pth (equal to a conversion that kept the HF files) and no HF weights;
    checkpoint_source.json names the repo id given, and one under checkpoints/<org>/<name> names that."""
    from core import hub
    from core.checkpoints import SOURCE, read_source, state_dict_sha256

    kept = _converted_copy(tiny_hf_dir, tmp_path / "kept")
    assert read_source(kept) is None  # outside checkpoints/ and no repo id: nothing recorded, nothing guessed
    one = tmp_path / "one"
    shutil.copytree(tiny_hf_dir, one)
    convert(one, "tiny", repo_id="someone/tiny-hf", delete_hf_weights_after=True)
    assert not [p.name for p in one.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))]
    assert (one / "config.json").is_file()  # the HF config stays (small; export and shape checks read it)
    verify_checkpoint(one)
    load = lambda d: torch.load(d / WEIGHTS, weights_only=True)  # noqa: E731
    assert state_dict_sha256(load(one)) == state_dict_sha256(load(kept))
    assert read_source(one) == {"repo_id": "someone/tiny-hf", "litgpt_config": "tiny", "how": "converted"}

    monkeypatch.setattr(hub, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    placed = tmp_path / "checkpoints" / "org" / "name"
    shutil.copytree(tiny_hf_dir, placed)
    convert(placed, "tiny")
    assert read_source(placed)["repo_id"] == "org/name"
    (placed / SOURCE).write_text("not json")
    with pytest.raises(CheckpointError, match=SOURCE):
        read_source(placed)
