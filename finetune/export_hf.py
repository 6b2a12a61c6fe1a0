"""Export a merged litgpt checkpoint to Hugging Face format, for serving elsewhere (vLLM, TGI, transformers).

    python -m finetune.export_hf --checkpoint_dir checkpoints/my-model --out_dir out/hf/my-model [--dtype bfloat16]

The input is a standalone checkpoint (``lit_model.pth`` + ``model_config.yaml`` + tokenizer), e.g. what
``make merge`` writes; an unmerged LoRA adapter is refused. The output directory holds

- ``model.safetensors``: the weights under Hugging Face names, mapped by litgpt's own
  ``litgpt.scripts.convert_lit_checkpoint`` (its per-architecture ``copy_weights_*``);
- ``config.json``: the base model's, copied from the checkpoint directory or from the base checkpoint
  recorded in ``hyperparameters.yaml``; if there is none and the model is a plain Llama architecture
  (our ``tiny``), one built with ``transformers.LlamaConfig`` from the litgpt config;
- the tokenizer files and ``generation_config.json`` that exist.

``torch_dtype`` in ``config.json`` is set to the dtype of the written weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from litgpt import Config

from core.checkpoints import WEIGHTS, CheckpointError, verify_checkpoint
from core.hf_config import HF_CONFIG, mismatches
from core.integrity import SUFFIX

HF_WEIGHTS = "model.safetensors"
# Copied when present (first found in the checkpoint directory, then in the base checkpoint).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",  # a run's chat template (core.chat); transformers reads it from this file
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportError(CheckpointError):
    """The checkpoint cannot be exported as it is; the message says what to do."""


def export_hf(checkpoint_dir: Path, out_dir: Path, dtype: str | None = None) -> Path:
    """Write ``checkpoint_dir`` (a merged litgpt checkpoint) to ``out_dir`` in Hugging Face format; returns ``out_dir``.

    Args:
        checkpoint_dir: a standalone litgpt checkpoint (``lit_model.pth``, ``model_config.yaml``, tokenizer).
        out_dir: where ``model.safetensors``, ``config.json`` and the tokenizer files go (created if needed).
            Must not be ``checkpoint_dir`` and must not hold other Hugging Face weight files.
        dtype: cast floating-point weights to this dtype (float32, float16 or bfloat16); default: keep them.

    Raises:
        ExportError: an unmerged (or stale) adapter, no way to write ``config.json``, a ``config.json`` that
            does not match the weights, an unusable ``out_dir`` or an unknown ``dtype``.
        CheckpointError: the checkpoint is incomplete or does not match its config (``verify_checkpoint``).
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _refuse_adapter(checkpoint_dir)
    config = verify_checkpoint(checkpoint_dir)
    _check_out_dir(checkpoint_dir, out_dir)
    base_dir = _base_checkpoint_dir(checkpoint_dir)
    sources = [d for d in (checkpoint_dir, base_dir) if d is not None]
    # Decide on config.json before converting gigabytes, so a missing one fails fast.
    hf_config = _hf_config(config, sources)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        state_dict = _convert_weights(checkpoint_dir, Path(tmp))
        if dtype is not None:
            state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}
        _check_against_weights(hf_config, state_dict)
        saved_dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
        _save_safetensors(state_dict, Path(tmp) / HF_WEIGHTS)
        del state_dict  # release the mmap of the temporary file before it is deleted
        os.replace(Path(tmp) / HF_WEIGHTS, out_dir / HF_WEIGHTS)  # same directory tree: a rename, never a half-written file
    if len(saved_dtypes) == 1:
        # transformers < 4.56 reads "torch_dtype", later ones "dtype" (and still accept the old name).
        name = str(saved_dtypes.pop()).removeprefix("torch.")
        hf_config["torch_dtype"] = name
        if "dtype" in hf_config:
            hf_config["dtype"] = name
    (out_dir / HF_CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        src = next((d / name for d in sources if (d / name).is_file()), None)
        if src is not None:
            shutil.copy2(src, out_dir / name)
    return out_dir


def _refuse_adapter(checkpoint_dir: Path) -> None:
    adapter, merged = checkpoint_dir / f"{WEIGHTS}.lora", checkpoint_dir / WEIGHTS
    # Other adapter kinds (lit_model.pth.adapter, .adapter_v2) add attention prefixes that no merge can fold
    # into the weights; exporting lit_model.pth next to one would silently drop the finetune.
    others = sorted(p.name for p in checkpoint_dir.glob(f"{WEIGHTS}.*") if p.is_file() and p != adapter and p.suffix != SUFFIX)
    if others:
        raise ExportError(
            f"{checkpoint_dir} holds {', '.join(others)}: that kind of adapter cannot be merged into the base weights, "
            "so it has no Hugging Face equivalent; serve the run directory itself (make serve), or finetune with "
            "LoRA or full finetuning to export"
        )
    if not adapter.is_file():
        return
    if not merged.is_file():
        raise ExportError(
            f"{checkpoint_dir} holds an unmerged LoRA adapter ({WEIGHTS}.lora) and no {WEIGHTS}: run `make merge` first "
            f"(.venv/bin/python -m finetune.merge --checkpoint_dir {checkpoint_dir} --out_dir <merged dir>) and export the merged checkpoint"
        )
    if merged.stat().st_mtime < adapter.stat().st_mtime:
        raise ExportError(
            f"{checkpoint_dir}: {WEIGHTS} is older than {WEIGHTS}.lora, so it was merged from an earlier adapter: run `make merge` again first"
        )


def _check_out_dir(checkpoint_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ExportError(f"--out_dir must be a different directory than --checkpoint_dir ({checkpoint_dir})")
    if not out_dir.is_dir():
        return
    # Loaders such as vLLM read every *.safetensors (or *.bin) file in the directory: leftovers would mix in.
    foreign = sorted(
        p.name for p in out_dir.iterdir() if p.name != HF_WEIGHTS and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    )
    if foreign:
        raise ExportError(f"{out_dir} already holds other weight files ({', '.join(foreign)}); export into an empty directory")


def _base_checkpoint_dir(checkpoint_dir: Path) -> Path | None:
    """The base model's directory as recorded at training time (``hyperparameters.yaml``), if it exists."""
    path = checkpoint_dir / "hyperparameters.yaml"
    if not path.is_file():
        return None
    recorded = (yaml.safe_load(path.read_text()) or {}).get("checkpoint_dir")
    if not recorded:
        return None
    base = Path(recorded)
    return base if base.is_dir() and base.resolve() != checkpoint_dir.resolve() else None


def llama_incompatibilities(config: Config) -> list[str]:
    """Why ``config`` is not a plain Llama architecture (empty if it is, so LlamaConfig can describe it)."""
    checks = {
        "mlp_class_name is LLaMAMLP": config.mlp_class_name == "LLaMAMLP",
        "norm_class_name is RMSNorm": config.norm_class_name == "RMSNorm",
        "sequential residual": not config.parallel_residual and not config.shared_attention_norm,
        "full rotary embedding (rotary_percentage 1)": config.rotary_percentage == 1.0,
        "plain RoPE (no condense ratio, adjustments or interleaving)": (
            config.rope_condense_ratio == 1 and not config.rope_adjustments and not config.rope_interleave
        ),
        "no biases": not config.bias and not config.attn_bias and not config.lm_head_bias,
        "no extra norms": (not config.norm_qk and not config.post_attention_norm and not config.post_mlp_norm and config.norm_1 and config.norm_2),
        "no sliding window": config.sliding_window_size is None,
        "no softcapping or score/embedding scaling": (
            config.attention_logit_softcapping is None
            and config.final_logit_softcapping is None
            and config.attention_scores_scalar is None
            and not config.scale_embeddings
        ),
        "no latent attention": not config.latent_attention,
    }
    return [name for name, ok in checks.items() if not ok]


def _hf_config(config: Config, sources: list[Path]) -> dict:
    """The config.json to write: copied from ``sources`` (checked against ``config``) or built for Llama."""
    for d in sources:
        if (d / HF_CONFIG).is_file():
            hf = json.loads((d / HF_CONFIG).read_text())
            if diff := mismatches(hf, config):
                hf_key, lit_key, value, expected = diff[0]
                raise ExportError(
                    f"{d / HF_CONFIG} has {hf_key}={value} but the checkpoint's model_config.yaml has "
                    f"{lit_key}={expected}: it belongs to another model"
                )
            return hf
    looked_in = " or ".join(str(d / HF_CONFIG) for d in sources)
    if problems := llama_incompatibilities(config):
        raise ExportError(
            f"cannot write config.json: there is no {looked_in} (nor a base checkpoint recorded in hyperparameters.yaml "
            f"that has one), and litgpt config {config.name!r} is not a plain Llama architecture (it lacks: "
            f"{'; '.join(problems)}), so it cannot be built. Copy the base model's Hugging Face config.json into "
            f"{sources[0]} and export again"
        )
    from transformers import LlamaConfig

    generation = next((json.loads((d / "generation_config.json").read_text()) for d in sources if (d / "generation_config.json").is_file()), {})
    llama = LlamaConfig(
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        head_dim=config.head_size,
        vocab_size=config.padded_vocab_size,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_theta=float(config.rope_base),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,  # litgpt's state dict has its own lm_head.weight
        bos_token_id=generation.get("bos_token_id"),
        eos_token_id=generation.get("eos_token_id"),
        pad_token_id=generation.get("pad_token_id"),
        architectures=["LlamaForCausalLM"],
    )
    return llama.to_diff_dict()  # what LlamaConfig.save_pretrained would write


def _convert_weights(checkpoint_dir: Path, tmp_dir: Path) -> dict[str, torch.Tensor]:
    """litgpt's ``convert_lit_checkpoint`` (it picks the weight mapping by architecture), loaded back."""
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it pprints its arguments
        convert_lit_checkpoint(checkpoint_dir, tmp_dir)
    return torch.load(tmp_dir / "model.pth", mmap=True, weights_only=True, map_location="cpu")


def _check_against_weights(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    embed = next((v for k, v in state_dict.items() if k.endswith("embed_tokens.weight")), None)
    vocab = hf_config.get("vocab_size")
    if embed is not None and vocab is not None and embed.shape[0] != vocab:
        raise ExportError(f"config.json has vocab_size={vocab} but the embedding has {embed.shape[0]} rows")


def _save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, after giving every tensor its own compact storage.

    safetensors refuses tensors that share memory (tied embeddings, the q/k/v slices of litgpt's
    fused qkv); a tensor that is not alone in its storage is cloned.
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for name, t in state_dict.items():
        storage = t.untyped_storage()
        alone = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not alone or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})


def main(checkpoint_dir: Path, out_dir: Path, dtype: str | None = None) -> None:
    """Export a merged litgpt checkpoint to Hugging Face format (model.safetensors, config.json, tokenizer).

    Args:
        checkpoint_dir: a merged or base litgpt checkpoint (e.g. what `make merge` wrote). An unmerged LoRA
            adapter is refused: merge it first.
        out_dir: the Hugging Face model directory to write (load it with transformers' from_pretrained or vLLM).
        dtype: cast the weights to float32, float16 or bfloat16; default: keep the checkpoint's dtype.
    """
    out = export_hf(checkpoint_dir, out_dir, dtype)
    print(f"Hugging Face model written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
