"""Load a checkpoint for serving: merged or base+LoRA, in bf16/fp16/fp32 or bitsandbytes 4/8 bit.

A directory with ``lit_model.pth`` is served as is (a base model, a merged or a full finetune). A
finetune output with only its method's weights (``lit_model.pth.lora``, ``.adapter``, ``.adapter_v2``)
is served unmerged: the method's litgpt model over the base weights recorded in its
``hyperparameters.yaml`` (or ``base_checkpoint_dir``). Quantized loading follows
litgpt's own generate script: Lightning's ``BitsandbytesPrecision`` swaps the linear layers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import yaml
from litgpt import GPT

from core.chat import CHAT_TEMPLATE_FILE, ChatTemplate, model_chat_template, special_tokens
from core.checkpoints import WEIGHTS, CheckpointError, load_config, verify_checkpoint
from core.integrity import load_torch
from core.methods import unmerged_method
from core.precision import DTYPES, FABRIC_PRECISION, SERVE_QUANTIZE, build_fabric, default_dtype
from core.prompts import load_style
from core.workload import HELM_WINDOW
from server.generate import Generator
from server.text import Codec


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Refuse quantized modes that cannot work here, with the reason and the way out."""
    if quantize is None:
        return
    if quantize not in SERVE_QUANTIZE:
        raise ValueError(f"quantize: choose one of {list(SERVE_QUANTIZE)}, got {quantize!r}")
    if device.type != "cuda":
        raise ValueError(
            f"quantize: {quantize} uses bitsandbytes CUDA kernels and needs an NVIDIA GPU; this server runs on "
            f"{device.type}. Drop --quantize to serve in bf16/fp16/fp32, or run on a GPU."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize: {quantize} needs the bitsandbytes package: .venv/bin/python -m pip install -c constraints.txt bitsandbytes")


def base_of(run_dir: Path, base_checkpoint_dir: Path | None) -> tuple[Path, dict]:
    """For an unmerged finetune output: its base checkpoint directory and its hyperparameters."""
    hparams_path = run_dir / "hyperparameters.yaml"
    if not hparams_path.is_file():
        raise CheckpointError(f"{run_dir}: has finetuned weights but no hyperparameters.yaml (which names its base model and method config)")
    hparams = yaml.safe_load(hparams_path.read_text())
    base = Path(base_checkpoint_dir or hparams.get("checkpoint_dir", ""))
    if not (base / WEIGHTS).is_file():
        raise CheckpointError(f"{run_dir}: its base model {base} has no {WEIGHTS}; pass --base_checkpoint_dir if the base moved")
    verify_checkpoint(base)
    return base, hparams


def refuse_base_for_standalone(checkpoint_dir: Path, base_checkpoint_dir: Path | None) -> None:
    """A standalone checkpoint (base, merged, full finetune) is served alone: a base given for it would go unread."""
    if base_checkpoint_dir is not None:
        raise ValueError(
            f"base_checkpoint_dir: {checkpoint_dir} holds no unmerged finetune weights (lit_model.pth.lora, .adapter, .adapter_v2), "
            f"so no base is read for it; drop --base_checkpoint_dir"
        )


def load_generator(
    checkpoint_dir: Path,
    device: str = "auto",
    dtype: str | None = None,
    quantize: str | None = None,
    use_template: bool = False,
    base_checkpoint_dir: Path | None = None,
    max_seq_length: int = HELM_WINDOW,
) -> Generator:
    """A ready ``Generator`` for a merged, base or unmerged-LoRA checkpoint directory, serving a
    ``max_seq_length`` window (prompt plus generation; at most the model's block_size)."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length: must be at least 2, got {max_seq_length}")
    checkpoint_dir = Path(checkpoint_dir)
    torch_device = resolve_device(device)
    check_quantize(quantize, torch_device)
    if quantize == "bnb.int8":  # bitsandbytes' 8-bit matmul computes in fp16 only
        if dtype not in (None, "fp16"):
            raise ValueError(f"dtype: bnb.int8 computes in fp16 only; drop --dtype or pass fp16 (got {dtype!r})")
        dtype = "fp16"
    dtype = dtype or default_dtype(torch_device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: choose one of {sorted(DTYPES)}, got {dtype!r}")

    method = unmerged_method({p.name for p in checkpoint_dir.iterdir()}) if checkpoint_dir.is_dir() else None
    if method is not None:  # base weights + the method's small weights file, in the method's litgpt model
        base_dir, hparams = base_of(checkpoint_dir, base_checkpoint_dir)
        config = method.litgpt.Config.from_file(base_dir / "model_config.yaml", **method.config_kwargs(hparams))
        model_cls = method.litgpt.GPT
        weight_files = [base_dir / WEIGHTS, checkpoint_dir / method.weights_file]
    else:
        refuse_base_for_standalone(checkpoint_dir, base_checkpoint_dir)
        verify_checkpoint(checkpoint_dir)
        config, model_cls = load_config(checkpoint_dir), GPT
        weight_files = [checkpoint_dir / WEIGHTS]

    devices = [torch_device.index or 0] if torch_device.type == "cuda" else 1
    fabric = build_fabric(FABRIC_PRECISION[dtype], quantize, accelerator=torch_device.type, devices=devices)
    with fabric.init_module(empty_init=True):
        model = model_cls(config)
    model.eval()
    model = fabric.setup_module(model)
    state: dict = {}
    for path in weight_files:  # base first, then the adapter; strict loading catches any gap
        loaded = load_torch(path)  # sha256 checked against its record; one error naming a damaged file
        state.update(loaded.get("model", loaded))
    model.load_state_dict(state, strict=True)
    codec = Codec(checkpoint_dir)
    style, chat = load_style(checkpoint_dir), None
    # A run's own chat template (it trained on conversations) comes first; a model that has neither that nor a
    # prompt style (an instruct base model) may still carry one in tokenizer_config.json.
    if (checkpoint_dir / CHAT_TEMPLATE_FILE).is_file() or (style is None and model_chat_template(checkpoint_dir) is not None):
        source = model_chat_template(checkpoint_dir)
        chat = ChatTemplate(source, special_tokens(checkpoint_dir, codec.tokenizer), origin=str(checkpoint_dir))
    return Generator(model, codec, prompt_style=style, use_template=use_template, max_seq_length=max_seq_length, chat_template=chat)
