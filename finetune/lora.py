"""LoRA finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.lora --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Writes ``<out_dir>/final/``: ``lit_model.pth.lora`` (adapter weights only), ``hyperparameters.yaml``
(what litgpt's ``merge_lora`` reads), the base model's config and tokenizer, and ``prompt_style.yaml``
(the template, so serving uses exactly what training used). ``python -m finetune.merge`` then writes
a standalone checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from litgpt import Tokenizer
from litgpt.args import EvalArgs, TrainArgs
from litgpt.finetune.lora import get_lr_scheduler
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.utils import load_checkpoint, num_parameters
from torch.utils.data import DataLoader

from core.checkpoints import WEIGHTS, copy_side_files, load_config, verify_checkpoint
from core.prompts import get_style, save_style
from finetune.budget import parse_duration
from finetune.data import Collate, encode_row, load_rows
from finetune.loop import fit


@dataclass
class DataArgs:
    """Where the instruction data comes from and how it is rendered."""

    train_file: Path = Path("data/generated/tiny/train.jsonl")
    val_file: Path | None = None  # None: hold out val_fraction of the training rows
    val_fraction: float = 0.05
    prompt_style: str = "qa"
    max_seq_length: int = 512
    mask_prompt: bool = True  # loss on response tokens only


@dataclass
class LoRAArgs:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    query: bool = True
    key: bool = True
    value: bool = True
    projection: bool = True
    mlp: bool = True
    head: bool = True

    def as_config_kwargs(self) -> dict:
        return {f"lora_{k}": v for k, v in dataclasses.asdict(self).items()}


def setup(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    out_dir: Path = Path("out/finetune/lora-tiny"),
    precision: str | None = None,
    seed: int = 1337,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_time: str = "24h",
    lora: LoRAArgs = LoRAArgs(),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(
        save_interval=None, log_interval=50, global_batch_size=16, micro_batch_size=16,
        lr_warmup_steps=40, max_steps=800, max_norm=1.0,
    ),
    eval: EvalArgs = EvalArgs(interval=200, max_iters=10),
) -> Path:
    """Finetune ``checkpoint_dir`` with LoRA; returns the directory of the final adapter.

    Args:
        checkpoint_dir: converted base checkpoint (``make download`` or ``make tiny``).
        out_dir: where adapters, logs and the final checkpoint go.
        precision: Fabric precision; default bf16-true on GPUs that support it, else 32-true.
        seed: seeds data order, dropout and LoRA init.
        lr: peak AdamW learning rate (linear warmup, then cosine decay).
        weight_decay: AdamW weight decay.
        max_time: wall-clock budget ("24h", "90m", ...); the run stops and saves before it.
        lora: rank, alpha, dropout and which layers get adapters.
        data: training data and template.
        train: batch sizes, steps, warmup, clipping, logging and save intervals (litgpt's TrainArgs).
        eval: validation interval and size (litgpt's EvalArgs).
    """
    precision = precision or default_precision()
    verify_checkpoint(checkpoint_dir)
    max_seconds = parse_duration(max_time)
    fabric = L.Fabric(devices=1, precision=precision, loggers=[L.fabric.loggers.CSVLogger(out_dir, name="logs")])
    fabric.seed_everything(seed)
    hparams = {
        "checkpoint_dir": str(checkpoint_dir), "out_dir": str(out_dir), "precision": precision, "seed": seed,
        "lr": lr, "weight_decay": weight_decay, "max_time": max_time, **lora.as_config_kwargs(),
        "data": _plain(dataclasses.asdict(data)), "train": _plain(dataclasses.asdict(train)),
        "eval": _plain(dataclasses.asdict(eval)),
    }
    return main(fabric, checkpoint_dir, out_dir, lr, weight_decay, max_seconds, lora, data, train, eval, hparams)


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def _plain(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def main(fabric, checkpoint_dir, out_dir, lr, weight_decay, max_seconds, lora, data, train, eval, hparams) -> Path:
    tokenizer = Tokenizer(checkpoint_dir)
    style = get_style(data.prompt_style)
    rows = load_rows(data.train_file)
    if data.val_file is not None:
        val_rows = load_rows(data.val_file)
    else:
        random.Random(hparams["seed"]).shuffle(rows)
        n_val = max(1, int(len(rows) * data.val_fraction))
        val_rows, rows = rows[:n_val], rows[n_val:]
    encode = lambda r: encode_row(r, tokenizer, style, data.max_seq_length, data.mask_prompt)  # noqa: E731
    train_set, val_set = [encode(r) for r in rows], [encode(r) for r in val_rows]
    collate = Collate(pad_id=0)
    train_loader = DataLoader(train_set, batch_size=train.micro_batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=train.micro_batch_size, collate_fn=collate)
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)

    config = Config(**{**dataclasses.asdict(load_config(checkpoint_dir)), **lora.as_config_kwargs()})
    with fabric.init_module(empty_init=False):
        model = GPT(config)
    mark_only_lora_as_trainable(model)
    fabric.print(f"trainable parameters: {num_parameters(model, requires_grad=True):,} of {num_parameters(model):,}")
    model = fabric.setup_module(model)
    load_checkpoint(fabric, model, checkpoint_dir / WEIGHTS, strict=False)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95)))
    steps_per_epoch = len(train_loader) // train.gradient_accumulation_iters(devices=1)
    max_steps = train.max_steps or max(1, steps_per_epoch * (train.epochs or 1))
    scheduler = get_lr_scheduler(optimizer, warmup_steps=min(train.lr_warmup_steps or 0, max_steps - 1) or 1, max_steps=max_steps)

    def save(step: int | str) -> Path:
        save_dir = out_dir / (step if isinstance(step, str) else f"step-{step:06d}")
        save_adapter(fabric, model, save_dir, checkpoint_dir, style, hparams)
        return save_dir

    result = fit(fabric, model, optimizer, scheduler, train_loader, val_loader, train, eval, max_steps, max_seconds, on_save=save)
    final_dir = save("final")
    for logger in fabric.loggers:
        logger.finalize("success")  # flush metrics.csv
    fabric.print(
        f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s "
        f"({result.tokens / max(result.seconds, 1e-9):,.0f} tok/s); final train loss {result.final_train_loss:.4f}"
    )
    fabric.print(f"adapter saved to {final_dir}; merge it with: python -m finetune.merge --checkpoint_dir {final_dir}")
    return final_dir


def save_adapter(fabric, model, save_dir: Path, base_dir: Path, style, hparams: dict) -> None:
    """Adapter weights plus everything merge and serving need, in litgpt's layout."""
    save_dir.mkdir(parents=True, exist_ok=True)
    lora_state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}
    torch.save({"model": lora_state}, save_dir / f"{WEIGHTS}.lora")
    copy_side_files(base_dir, save_dir)
    (save_dir / "model_config.yaml").write_text((base_dir / "model_config.yaml").read_text())
    (save_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
    save_style(style, save_dir)


if __name__ == "__main__":
    from jsonargparse import CLI

    torch.set_float32_matmul_precision("high")
    CLI(setup, as_positional=False)
