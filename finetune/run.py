"""What every finetune script shares: data, model for the method, optimizer, resume, saves, logs.

The method scripts (``lora.py``, ``adapter.py``, ``adapter_v2.py``, ``full.py``) only declare their
options and call ``run``. Output layout (``out_dir``):

    step-000500/   servable weights of that step + training_state.pth (for --resume)
    final/         servable weights, config, tokenizer, prompt_style.yaml, hyperparameters.yaml, data_card.json
    metrics.csv    one row per step (loss, lr, tokens, elapsed_s, val_loss); loss.png at the end
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from litgpt import Tokenizer
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import load_checkpoint, num_parameters

from core.chat import ChatTemplate, save_chat_template
from core.checkpoints import WEIGHTS, copy_side_files, load_config, verify_checkpoint
from core.integrity import atomic_dir, clean_stale_temps, save_torch, sha256_file
from core.methods import Method
from core.precision import FABRIC_PRECISION, TRAIN_QUANTIZE, build_fabric, default_dtype
from core.prompts import get_style, save_style
from finetune import neftune, scoring
from finetune.batching import EpochBatches, batch_to_device
from finetune.budget import BudgetPlanner, Schedule, parse_duration
from finetune.data import IGNORE_INDEX, Collate, encode_row, load_rows
from finetune.loop import Progress, fit
from finetune.new_parameters import load_and_initialize
from finetune.packing import PackCollate, PackedBatches
from finetune.plot import plot_metrics
from finetune.provenance import build_manifest
from finetune.quantized_storage import ComputeDtypeStorage
from finetune.speed import SpeedArgs, prepare
from finetune.state import find_resume_dir, load_state, save_state, saved_micro_batch_size


@dataclass
class DataArgs:
    """Where the instruction data comes from and how it is rendered."""

    train_file: Path | None = Path("data/generated/tiny/train.jsonl")  # local JSON/JSONL
    recipe: Path | None = None  # a data recipe YAML (data/recipes/); wins over train_file
    val_file: Path | None = None  # None: hold out val_fraction of the training rows
    val_fraction: float = 0.05
    prompt_style: str = "qa"  # a recipe's own template wins
    # conversations ({"messages": [...]}) and, once there is one, every row: None = the base model's own
    # chat template (tokenizer_config.json), or one of core.chat.NAMED ("chatml", "qa"), or a .jinja file
    chat_template: str | None = None
    max_seq_length: int = 512
    mask_prompt: bool = True  # loss on response tokens only


def default_precision() -> str:
    return FABRIC_PRECISION[default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))]


def make_fabric(precision: str, quantize: str | None, method: Method, storage_in_compute_dtype: bool = False) -> L.Fabric:
    """``storage_in_compute_dtype``: 4-bit weights quantized from the compute dtype, not float16 (``finetune.quantized_storage``)."""
    if quantize is not None:
        if quantize not in TRAIN_QUANTIZE:
            raise ValueError(f"quantize: choose one of {list(TRAIN_QUANTIZE)}, got {quantize!r}")
        if method.trains_everything:
            raise ValueError("quantize: full finetuning updates every weight and cannot train 4/8-bit weights; use lora (QLoRA)")
        if not torch.cuda.is_available():
            raise ValueError(f"quantize: {quantize} (QLoRA) uses bitsandbytes CUDA kernels and needs an NVIDIA GPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"quantize: {quantize} needs bitsandbytes: .venv/bin/python -m pip install -c constraints.txt bitsandbytes")
    return build_fabric(precision, quantize, ComputeDtypeStorage if storage_in_compute_dtype else None, devices=1)


def load_training_rows(data: DataArgs, tokenizer: Tokenizer, seed: int) -> tuple[list[dict], list[dict], dict, str]:
    """(train rows, val rows, data card, template name)."""
    if data.recipe is not None:
        from finetune.recipes import build, load_recipe

        recipe = load_recipe(data.recipe)
        rows, card = build(recipe, count_tokens=lambda text: len(tokenizer.encode(text)))
        template = recipe.template
    else:
        if data.train_file is None:
            raise ValueError("data: give --data.train_file or --data.recipe")
        rows = load_rows(data.train_file)
        card = {"train_file": str(data.train_file), "sha256": sha256_file(data.train_file), "rows": len(rows)}
        template = data.prompt_style
    if data.val_file is not None:
        val_rows = load_rows(data.val_file)
        card["val_file"] = {"path": str(data.val_file), "sha256": sha256_file(data.val_file), "rows": len(val_rows)}
    else:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
        n_val = max(1, int(len(rows) * data.val_fraction))
        val_rows, rows = rows[:n_val], rows[n_val:]
        card["val_split"] = {"fraction": data.val_fraction, "rows": len(val_rows)}
    return rows, val_rows, card, template


def keep_trainable(encoded: list[dict], max_seq_length: int, fabric: L.Fabric) -> list[dict]:
    """Drop rows whose response was cut off entirely by ``max_seq_length`` (nothing to learn; NaN loss)."""
    kept = [e for e in encoded if bool((e["labels"] != IGNORE_INDEX).any())]
    if not kept and encoded:
        raise ValueError(f"data.max_seq_length: {max_seq_length} tokens leave no response tokens in any row; raise it")
    if dropped := len(encoded) - len(kept):
        fabric.print(f"dropped {dropped} of {len(encoded)} rows: their prompt fills all {max_seq_length} tokens (data.max_seq_length)")
    return kept


class MetricsLog:
    """Appends one CSV row per step (survives resume); mirrors to TensorBoard when it is installed."""

    FIELDS = ("step", "loss", "lr", "tokens", "elapsed_s", "val_loss")

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.csv"
        self.tensorboard = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(out_dir / "tensorboard")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be redone)."""
        if self.path.is_file():
            rows = [r for r in csv.DictReader(self.path.open()) if int(r["step"]) <= step]
            self._write(rows, "w")

    def __call__(self, row: dict) -> None:
        self._write([row], "a")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])

    def _write(self, rows: list[dict], mode: str) -> None:
        new = mode == "w" or not self.path.is_file()
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)


def save_servable(
    model, method: Method, save_dir: Path, base_dir: Path, template: str, hparams: dict, card: dict, chat: ChatTemplate | None = None
) -> None:
    """The method's weights plus everything merge and serving need, in litgpt's layout."""
    save_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if method.keep(k, v)}
    save_torch(weights if method.trains_everything else {"model": weights}, save_dir / method.weights_file)
    copy_side_files(base_dir, save_dir)
    (save_dir / "model_config.yaml").write_text((base_dir / "model_config.yaml").read_text())
    (save_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))
    (save_dir / "data_card.json").write_text(json.dumps(card, indent=2))
    save_style(template, save_dir)
    if chat is not None:
        save_chat_template(chat, save_dir)  # the server renders prompts with this same file


def attention_overrides(config, max_seq_length: int | None) -> dict:
    """Config changes that keep the math but take a faster path for sequences of this length.

    litgpt builds an explicit sliding-window mask whenever a model has a window (Mistral: 4096), and
    a mask rules out flash attention: a LoRA step on Mistral-7B ran 2.7x slower for it. A window at
    least as long as every training sequence excludes nothing, so training drops it. The saved
    model_config.yaml is the base model's, window included.
    """
    window = config.sliding_window_size
    if window is not None and max_seq_length is not None and max_seq_length <= window:
        return {"sliding_window_size": None}
    return {}


def build_model(fabric: L.Fabric, method: Method, method_config: dict, checkpoint_dir: Path, quantize: str | None, max_seq_length: int | None = None):
    """The method's litgpt model with the base weights loaded and only the method's parameters trainable."""
    base = load_config(checkpoint_dir)
    overrides = attention_overrides(base, max_seq_length)
    if overrides:
        fabric.print(
            f"sliding window {base.sliding_window_size} >= data.max_seq_length {max_seq_length}: plain causal attention (same result, flash kernels)"
        )
    config = method.litgpt.Config(**{**dataclasses.asdict(base), **method_config, **overrides})
    with fabric.init_module(empty_init=quantize is not None):
        model = method.litgpt.GPT(config)
    method.freeze_all_but_trainable(model)
    fabric.print(f"{method.name}: {num_parameters(model, requires_grad=True):,} trainable of {num_parameters(model):,} parameters")
    model = fabric.setup_module(model)
    load = lambda: load_checkpoint(fabric, model, checkpoint_dir / WEIGHTS, strict=method.trains_everything)  # noqa: E731
    if quantize is None:
        load()  # built with normal init: the method's parameters are already initialized
    else:
        load_and_initialize(model, load)  # empty init: see finetune.new_parameters
    return model


def build_optimizer(fabric: L.Fabric, model, lr: float, weight_decay: float):
    """AdamW over the trainable parameters, fused into one kernel launch on CUDA, QLoRA included.

    QLoRA recipes (and litgpt) use bitsandbytes' paged AdamW, whose ``step`` synchronizes the GPU after
    every parameter (450 times a step for LoRA on every linear layer of a 7B model), leaving the GPU idle
    between them. Paging would only help optimizer states too large for the GPU; LoRA's are megabytes.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = fabric.device.type == "cuda" and all(p.dtype in (torch.float16, torch.bfloat16, torch.float32) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused or None)
    return fabric.setup_optimizers(optimizer)


def run(
    method: Method,
    method_config: dict,
    checkpoint_dir: Path,
    out_dir: Path,
    precision: str | None,
    quantize: str | None,
    seed: int,
    lr: float,
    weight_decay: float,
    max_time: str,
    resume: bool | str | Path,
    data: DataArgs,
    train: TrainArgs,
    eval: EvalArgs,
    speed: SpeedArgs = SpeedArgs(),
    neftune_alpha: float = 0.0,
) -> Path:
    """Finetune with ``method``; returns the ``final`` directory."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    precision = precision or default_precision()
    verify_checkpoint(checkpoint_dir)
    max_seconds = parse_duration(max_time)
    neftune.check_alpha(neftune_alpha)
    scoring.check(eval, train.save_interval)
    fabric = make_fabric(precision, quantize, method, storage_in_compute_dtype=speed.quantize_from_compute_dtype)
    fabric.seed_everything(seed, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in clean_stale_temps(out_dir):
        fabric.print(f"removed {stale}, left by an interrupted save")

    tokenizer = Tokenizer(checkpoint_dir)
    rows, val_rows, card, template = load_training_rows(data, tokenizer, seed)
    style = get_style(template)
    chat = None
    if data.chat_template is not None or any("messages" in r for r in (*rows, *val_rows)):
        chat = ChatTemplate.for_checkpoint(checkpoint_dir, tokenizer, data.chat_template)
        fabric.print(f"chat template: {chat.origin}; every row is rendered as a conversation, the loss on its assistant turns")
    encode = lambda r: encode_row(r, tokenizer, style, data.max_seq_length, data.mask_prompt, chat)  # noqa: E731
    train_set = keep_trainable([encode(r) for r in rows], data.max_seq_length, fabric)
    collate = Collate(pad_id=0)
    to_device = lambda b: batch_to_device(b, fabric.device)  # noqa: E731
    val_encoded = keep_trainable([encode(r) for r in val_rows], data.max_seq_length, fabric)

    model = build_model(fabric, method, method_config, checkpoint_dir, quantize, data.max_seq_length)
    neftune.attach(model, neftune_alpha)
    optimizer = build_optimizer(fabric, model, lr, weight_decay)
    resume_dir = find_resume_dir(resume, out_dir, method.weights_file, fabric.print)
    resumed_micro_batch = saved_micro_batch_size(resume_dir) if resume_dir else None
    setup = prepare(fabric, model, method.name, speed, train, data.max_seq_length, quantize, resumed_micro_batch)
    train, mb = setup.train, setup.train.micro_batch_size
    val_batches = [to_device(collate(val_encoded[i : i + mb])) for i in range(0, len(val_encoded), mb)][: eval.max_iters]

    hparams = {
        "method": method.name,
        "checkpoint_dir": str(checkpoint_dir),
        "out_dir": str(out_dir),
        "precision": precision,
        "quantize": quantize,
        "seed": seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "max_time": max_time,
        "template": template,
        "neftune_alpha": neftune_alpha,
        **method_config,
        "data": _plain(dataclasses.asdict(data)),
        "train": _plain(dataclasses.asdict(train)),
        "eval": _plain(dataclasses.asdict(eval)),
        "speed": {
            **dataclasses.asdict(speed),
            "packing": setup.packing,
            "compile": setup.compiled,
            "checkpoint_blocks": setup.checkpoint_blocks,
            "dequantize_4bit_used": setup.dequantize_4bit,
        },
    }
    if setup.packing:
        batches = PackedBatches([len(e["input_ids"]) for e in train_set], mb, data.max_seq_length, seed)
        pack = PackCollate(data.max_seq_length)
        fabric.print(
            f"packing {len(train_set):,} rows into {batches.batches_per_epoch * mb:,} rows of {data.max_seq_length} tokens ({batches.fill:.0%} full)"
        )
        next_batch = lambda: to_device(pack([[train_set[i] for i in packed] for packed in batches.next()]))  # noqa: E731
    else:
        batches = EpochBatches(len(train_set), mb, seed)
        next_batch = lambda: to_device(collate([train_set[i] for i in batches.next()]))  # noqa: E731
    accumulate = train.gradient_accumulation_iters(devices=1)
    planned = train.max_steps or max(1, math.ceil((train.epochs or 1) * batches.batches_per_epoch / accumulate))
    progress = Progress(total_steps=planned)
    metrics = MetricsLog(out_dir)
    if resume_dir is not None:
        saved = load_state(resume_dir, model, optimizer)
        batches.load_state_dict(saved.pop("batches"))
        progress = Progress(**saved)
        metrics.truncate_after(progress.step)
        fabric.print(f"resumed from {resume_dir} at step {progress.step} ({progress.elapsed_s:.0f}s of budget used)")
    warmup = train.lr_warmup_steps or int((train.lr_warmup_fraction or 0.0) * planned)
    schedule = Schedule(progress.total_steps, min(warmup, planned - 1) or 1)
    planner = BudgetPlanner(max_seconds, progress.total_steps)

    board = None
    if getattr(eval, "score_interval", None):
        board = scoring.Scoreboard(out_dir, eval.score_tasks or [scoring.write_heldout(val_rows, out_dir)], eval)

    def save(p: Progress) -> None:
        with atomic_dir(out_dir / f"step-{p.step:06d}") as step_dir:  # all of it or nothing, whenever a kill comes
            save_servable(model, method, step_dir, checkpoint_dir, template, hparams, card, chat)
            save_state(step_dir, model, optimizer, {**p.state_dict(), "batches": batches.state_dict()}, method.keep)
        if board is not None and p.step % eval.score_interval == 0:
            score = board.score(out_dir / f"step-{p.step:06d}", p.step)
            fabric.print(f"step {p.step}: score {score:.1%} (eval.score_interval); best so far {board.best()['checkpoint']}")

    progress = fit(
        fabric, model, optimizer, next_batch, schedule, lr, planner, progress, train, eval, val_batches, save, metrics, setup.checkpoint_blocks
    )
    final_dir = out_dir / "final"
    hparams["trained"] = {
        "steps": progress.step,
        "tokens": progress.tokens,
        "seconds": round(progress.elapsed_s, 1),
        "stopped_by_time": progress.stopped_by_time,
    }
    with atomic_dir(final_dir) as tmp:
        save_servable(model, method, tmp, checkpoint_dir, template, hparams, card, chat)
        (tmp / "submission.json").write_text(json.dumps(build_manifest(hparams, card), indent=2))
    plot_metrics(metrics.path, out_dir / "loss.png")
    if board is not None:
        if not any(entry["step"] == progress.step for entry in board.scores):  # final/ equals a step just scored otherwise
            board.score(final_dir, progress.step)
        best = board.best()
        fabric.print(f"scores: {out_dir / scoring.SCORES_FILE}; best {best['checkpoint']} ({best['overall']:.1%}) -> {out_dir / scoring.BEST_LINK}")
    fabric.print(
        f"done: {progress.step} steps, {progress.tokens:,} tokens in {progress.elapsed_s:.1f}s "
        f"({progress.tokens / max(progress.elapsed_s, 1e-9):,.0f} tok/s); final train loss {progress.last_loss:.4f}\n"
        f"saved to {final_dir}\nnext: {next_step(method, out_dir, final_dir)}"
    )
    return final_dir


def next_step(method: Method, out_dir: Path, final_dir: Path) -> str:
    """What to do with a finished run: merge a LoRA, serve an adapter as it is, serve a full finetune."""
    if method.mergeable and not method.trains_everything:
        return f"make merge RUN={out_dir} MERGED=<dir> (a standalone checkpoint), or serve it unmerged: make serve CKPT={final_dir}"
    if method.mergeable:
        return f"make serve CKPT={final_dir} (a standalone checkpoint)"
    return f"make serve CKPT={final_dir} ({method.name} is served as it is, base + {method.weights_file}; it cannot be merged)"


def _plain(d: dict) -> dict:
    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in d.items()}
