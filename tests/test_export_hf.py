"""finetune.export_hf writes a Hugging Face model directory that transformers loads and that computes
what the litgpt checkpoint computes; it refuses what it cannot export, saying what to do.

Logits are compared within ATOL = 1e-4 (float32 CPU; litgpt's and transformers' attention differ in
op order). Observed: exactly 0 for the HF -> litgpt -> HF round trip (the same weights run through the
same transformers code), ~1e-6 for litgpt vs transformers on the exported tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from core.checkpoints import WEIGHTS, CheckpointError, load_model, save_checkpoint
from finetune.export_hf import HF_CONFIG, HF_WEIGHTS, ExportError, export_hf

ATOL = 1e-4
TEXTS = ["Question: what is 2 + 3?\nAnswer: 5", "héllo wörld 🙂 12345", "  leading spaces and\ttabs"]


def _batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 41), generator=torch.Generator().manual_seed(3))


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _max_logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def converted_hf_dir(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny HF checkpoint, converted to litgpt (lit_model.pth next to the HF files)."""
    from core.hub import convert

    d = tmp_path_factory.mktemp("export_src") / "tiny"
    shutil.copytree(tiny_hf_dir, d)
    convert(d, "tiny")
    return d


def test_hf_litgpt_hf_round_trip(tiny_hf_dir: Path, converted_hf_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = export_hf(converted_hf_dir, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert not any(p.name.startswith(".export-") for p in out.iterdir()), "temporary files left behind"
    original = _hf_model(tiny_hf_dir)
    exported = _hf_model(out)
    with safe_open(out / HF_WEIGHTS, "pt") as f:
        assert set(f.keys()) == set(original.state_dict())
    idx = _batch(original.config.vocab_size)
    with torch.no_grad():
        diff = _max_logit_diff(exported(idx).logits, original(idx).logits)
    assert diff < ATOL, f"round-trip logits differ by {diff:.3g}"

    config = json.loads((out / HF_CONFIG).read_text())
    source = json.loads((tiny_hf_dir / HF_CONFIG).read_text())
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == source  # copied, not rebuilt
    assert config["torch_dtype"] == "float32"

    tok_out, tok_src = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_hf_dir)
    for text in TEXTS:
        assert tok_out.encode(text) == tok_src.encode(text), text
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_hf_dir / name).read_bytes(), name


def test_dtype_cast(converted_hf_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = export_hf(converted_hf_dir, tmp_path / "hf", dtype="bfloat16")
    with safe_open(out / HF_WEIGHTS, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    config = json.loads((out / HF_CONFIG).read_text())
    assert config["torch_dtype"] == "bfloat16" and config.get("dtype", "bfloat16") == "bfloat16"
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_hf(converted_hf_dir, tmp_path / "hf2", dtype="fp8")


def test_tiny_litgpt_checkpoint_without_config_json(make_tiny_checkpoint, tmp_path: Path) -> None:
    """Our tiny checkpoint has no config.json: export builds a LlamaConfig, and transformers agrees with litgpt."""
    from litgpt import Tokenizer
    from transformers import AutoTokenizer

    tiny = make_tiny_checkpoint()
    assert not (tiny / HF_CONFIG).exists()
    out = export_hf(tiny, tmp_path / "hf")
    config = json.loads((out / HF_CONFIG).read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (generation["bos_token_id"], generation["eos_token_id"])

    hf = _hf_model(out)
    lit = load_model(tiny)
    idx = _batch(lit.config.padded_vocab_size)
    with torch.no_grad():
        diff = _max_logit_diff(hf(idx).logits, lit(idx))
    assert diff < ATOL, f"exported model's logits differ from litgpt's by {diff:.3g}"

    hf_tok, lit_tok = AutoTokenizer.from_pretrained(out), Tokenizer(tiny)
    for text in TEXTS:
        assert hf_tok.encode(text) == lit_tok.encode(text).tolist(), text


def test_cli(make_tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The CLI as ``python -m finetune.export_hf`` builds it (in-process: a subprocess costs ~10 s of imports)."""
    from jsonargparse import CLI

    from finetune.export_hf import main

    out = tmp_path / "hf"
    CLI(main, as_positional=False, args=["--checkpoint_dir", str(make_tiny_checkpoint()), "--out_dir", str(out)])
    assert str(out) in capsys.readouterr().out
    assert (out / HF_WEIGHTS).is_file() and (out / HF_CONFIG).is_file()
    with pytest.raises(SystemExit):  # both flags are required
        CLI(main, as_positional=False, args=["--out_dir", str(out)])


def test_config_json_from_base_recorded_in_hyperparameters(converted_hf_dir: Path, tmp_path: Path) -> None:
    """A merged finetune output without config.json takes the base model's, found through hyperparameters.yaml."""
    base = tmp_path / "base"
    shutil.copytree(converted_hf_dir, base)
    marked = {**json.loads((base / HF_CONFIG).read_text()), "_exported_from": "base"}
    (base / HF_CONFIG).write_text(json.dumps(marked))
    merged = tmp_path / "merged"
    merged.mkdir()
    for name in (WEIGHTS, "model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(base / name, merged / name)
    (merged / "hyperparameters.yaml").write_text(f"checkpoint_dir: {base}\n")
    out = export_hf(merged, tmp_path / "hf")
    assert json.loads((out / HF_CONFIG).read_text())["_exported_from"] == "base"
    assert (out / "generation_config.json").is_file()  # also taken from the base


def test_unmerged_adapter_is_refused(make_tiny_checkpoint, tmp_path: Path) -> None:
    tiny = make_tiny_checkpoint()
    run = tmp_path / "final"
    run.mkdir()
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny / name, run / name)
    torch.save({"model": {"transformer.h.0.attn.qkv.lora_A": torch.zeros(4, 256)}}, run / f"{WEIGHTS}.lora")
    with pytest.raises(ExportError, match=r"unmerged LoRA adapter.*run `make merge` first"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    # Merged once, then trained further: the merged weights are stale.
    shutil.copy2(tiny / WEIGHTS, run / WEIGHTS)
    adapter = run / f"{WEIGHTS}.lora"
    os.utime(adapter, (adapter.stat().st_atime, (run / WEIGHTS).stat().st_mtime + 10))
    with pytest.raises(ExportError, match="older than"):
        export_hf(run, tmp_path / "hf")

    # Adapter methods that cannot be merged at all: exporting the weights beside them would drop the finetune.
    adapter.unlink()
    torch.save({"model": {}}, run / f"{WEIGHTS}.adapter_v2")
    with pytest.raises(ExportError, match=r"lit_model\.pth\.adapter_v2.*cannot be merged"):
        export_hf(run, tmp_path / "hf")


def test_unexportable_config_names_the_missing_file(make_tiny_checkpoint, tmp_path: Path) -> None:
    """A non-Llama litgpt model without any config.json: the error says which file is missing."""
    from litgpt import GPT, Config

    config = Config.from_name("pythia-14m")
    with torch.device("meta"):
        shapes = GPT(config).state_dict()
    state = {k: torch.zeros(v.shape) for k, v in shapes.items()}
    d = tmp_path / "neox"
    save_checkpoint(state, config, d, side_files_from=make_tiny_checkpoint())
    with pytest.raises(ExportError, match=r"no .*neox/config\.json.*not a plain Llama architecture.*LLaMAMLP"):
        export_hf(d, tmp_path / "hf")


def test_mismatched_config_json_is_refused(make_tiny_checkpoint, tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(make_tiny_checkpoint(), d)
    (d / HF_CONFIG).write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 256}))
    with pytest.raises(ExportError, match="num_hidden_layers=2.*n_layer=4"):
        export_hf(d, tmp_path / "hf")


def test_bad_out_dirs(make_tiny_checkpoint, tmp_path: Path) -> None:
    tiny = make_tiny_checkpoint()
    with pytest.raises(ExportError, match="different directory"):
        export_hf(tiny, tiny)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="other weight files"):
        export_hf(tiny, out)
    with pytest.raises(CheckpointError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "hf2")
