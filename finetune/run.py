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
import types
from pathlib import Path

import lightning as L
import torch
import yaml
from litgpt import Tokenizer
from litgpt.utils import load_checkpoint, num_parameters

from core.chat import ChatTemplate, save_chat_template
from core.checkpoints import WEIGHTS, copy_side_files, load_config, verify_checkpoint
from core.integrity import atomic_dir, clean_stale_temps, save_torch, sha256_file
from core.methods import METHODS, Method
from core.precision import FABRIC_PRECISION, TRAIN_QUANTIZE, build_fabric, default_dtype
from core.prompts import get_style, save_style
from finetune import distributed, neftune, scoring
from finetune.batching import EpochBatches, batch_to_device
from finetune.budget import BudgetPlanner, Schedule, parse_duration
from finetune.config import DataArgs, RunConfig, method_config, quantize_of, record, refuse_unread
from finetune.data import IGNORE_INDEX, Collate, encode_row, load_rows
from finetune.forward import training_loss
from finetune.loop import Progress, fit
from finetune.new_parameters import load_and_initialize
from finetune.packing import PackCollate, PackedBatches
from finetune.plot import plot_metrics
from finetune.provenance import build_manifest
from finetune.quantized_storage import ComputeDtypeStorage
from finetune.speed import prepare
from finetune.state import find_resume_dir, load_state, save_state, saved_micro_batch_size

TRAINED = "trained.json"  # what the run did: steps, tokens, seconds, whether the budget stopped it, the template


def default_precision() -> str:
    return FABRIC_PRECISION[default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))]


def make_fabric(
    precision: str, quantize: str | None, method: Method, storage_in_compute_dtype: bool = False, devices: int = 1, strategy: str = "auto"
) -> L.Fabric:
    """``storage_in_compute_dtype``: 4-bit weights quantized from the compute dtype, not float16 (``finetune.quantized_storage``).
    ``devices``/``strategy``: one process per device (``finetune.distributed``); launched by ``run``."""
    if quantize is not None:
        if quantize not in TRAIN_QUANTIZE:
            raise ValueError(f"quantize: choose one of {list(TRAIN_QUANTIZE)}, got {quantize!r}")
        if method.trains_everything:
            raise ValueError("quantize: full finetuning updates every weight and cannot train 4/8-bit weights; use lora (QLoRA)")
        if not torch.cuda.is_available():
            raise ValueError(f"quantize: {quantize} (QLoRA) uses bitsandbytes CUDA kernels and needs an NVIDIA GPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"quantize: {quantize} needs bitsandbytes: .venv/bin/python -m pip install -c constraints.txt bitsandbytes")
    return build_fabric(
        precision,
        quantize,
        ComputeDtypeStorage if storage_in_compute_dtype else None,
        devices=devices,
        strategy=distributed.fabric_strategy(strategy, devices, method.trains_everything),
    )


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
        template = data.prompt_style or "qa"
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
    """Drop rows whose response was cut off entirely by ``max_seq_length`` (nothing to learn; NaN loss); count those cut short."""
    kept = [e for e in encoded if bool((e["labels"] != IGNORE_INDEX).any())]
    if not kept and encoded:
        raise ValueError(f"data.max_seq_length: {max_seq_length} tokens leave no response tokens in any row; raise it")
    if dropped := len(encoded) - len(kept):
        fabric.print(f"dropped {dropped} of {len(encoded)} rows: their prompt fills all {max_seq_length} tokens (data.max_seq_length)")
    if cut := [e["labels_cut"] for e in kept if e.get("labels_cut")]:
        fabric.print(
            f"cut {len(cut)} of {len(encoded)} rows to data.max_seq_length {max_seq_length} tokens: {sum(cut):,} labelled tokens "
            "past it (a response's end and EOS, a conversation's later turns) are not trained on"
        )
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
    state: dict, method: Method, save_dir: Path, base_dir: Path, template: str, hparams: dict, card: dict, chat: ChatTemplate | None = None
) -> None:
    """The method's weights (from the model's whole ``state`` dict) plus everything merge and serving need, in litgpt's layout."""
    save_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in state.items() if method.keep(k, v)}
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
    if model.module is not getattr(model, "_forward_module", model.module):  # DDP/FSDP: the loss must go through their forward
        model.module.training_loss = types.MethodType(training_loss, model.module)
        model.mark_forward_method("training_loss")
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


def run(config: RunConfig) -> Path:
    """Finetune with ``config.method``; returns the ``final`` directory.

    With ``devices`` > 1 this must be the command line's process (``python -m finetune.lora ...``): Fabric
    re-runs that command line once per extra device, and every rank runs this function.
    """
    refuse_unread(config)
    method = METHODS[config.method]
    data, train, eval, speed, quantize = config.data, config.train, config.eval, config.speed, quantize_of(config)
    checkpoint_dir, out_dir = Path(config.checkpoint_dir), Path(config.out_dir)
    precision = config.precision or default_precision()
    verify_checkpoint(checkpoint_dir)
    max_seconds = parse_duration(config.max_time)
    neftune.check_alpha(config.neftune_alpha)
    scoring.check(eval, train.save_interval)
    distributed.check(config.devices, config.strategy, quantize, train.global_batch_size, train.micro_batch_size, eval.score_interval)
    fabric = make_fabric(precision, quantize, method, speed.quantize_from_compute_dtype, config.devices, config.strategy)
    if config.devices > 1 or config.strategy != "auto":
        fabric.launch()  # re-runs this command line once per extra device; every rank continues from here
    fabric.seed_everything(config.seed, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fabric.is_global_zero:
        for stale in clean_stale_temps(out_dir):
            fabric.print(f"removed {stale}, left by an interrupted save")
    fabric.barrier()

    tokenizer = Tokenizer(checkpoint_dir)
    rows, val_rows, card, template = load_training_rows(data, tokenizer, config.seed)
    style = get_style(template)
    chat = None
    if data.chat_template is not None or any("messages" in r for r in (*rows, *val_rows)):
        chat = ChatTemplate.for_checkpoint(checkpoint_dir, tokenizer, data.chat_template)
        if data.prompt_style is not None:
            raise ValueError(
                f"data.prompt_style: {data.prompt_style!r} would not be used: this run renders every row with the chat template "
                f"({chat.origin}), and the server its prompts; drop --data.prompt_style (or --data.chat_template, for instruction rows)"
            )
        fabric.print(f"chat template: {chat.origin}; every row is rendered as a conversation, the loss on its assistant turns")
    encode = lambda r: encode_row(r, tokenizer, style, data.max_seq_length, data.mask_prompt, chat)  # noqa: E731
    train_set = keep_trainable([encode(r) for r in rows], data.max_seq_length, fabric)
    collate = Collate(pad_id=0)
    to_device = lambda b: batch_to_device(b, fabric.device)  # noqa: E731
    val_encoded = keep_trainable([encode(r) for r in val_rows], data.max_seq_length, fabric)

    model = build_model(fabric, method, method_config(config), checkpoint_dir, quantize, data.max_seq_length)
    neftune.attach(model, config.neftune_alpha)
    optimizer = build_optimizer(fabric, model, config.lr, config.weight_decay)
    distributed.seed_rank(config.seed, fabric.global_rank)
    resume_dir = find_resume_dir(config.resume, out_dir, method.weights_file, fabric.print) if fabric.is_global_zero else None
    resume_dir = fabric.broadcast(resume_dir, 0)  # every rank resumes the step rank 0 chose
    resumed_micro_batch = saved_micro_batch_size(resume_dir) if resume_dir else None
    setup = prepare(fabric, model, method.name, speed, train, data.max_seq_length, quantize, resumed_micro_batch)
    train, mb = setup.train, setup.train.micro_batch_size
    val_batches = [to_device(collate(val_encoded[i : i + mb])) for i in range(0, len(val_encoded), mb)][: eval.max_iters]

    # The record: this config with every "auto" resolved to what ran, so --config replays it exactly.
    ran = dataclasses.replace(
        config,
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        precision=precision,
        train=train,
        speed=dataclasses.replace(
            speed,
            packing=setup.packing,
            compile=setup.compiled,
            checkpoint_blocks=setup.checkpoint_blocks,
            micro_batch="fixed",
            dequantize_4bit="compiled" if (setup.dequantize_4bit or "").startswith("compiled") else setup.dequantize_4bit or speed.dequantize_4bit,
        ),
    )
    hparams = record(ran)
    if setup.packing:
        batches = PackedBatches([len(e["input_ids"]) for e in train_set], mb, data.max_seq_length, config.seed)
        pack = PackCollate(data.max_seq_length)
        fabric.print(
            f"packing {len(train_set):,} rows into {batches.batches_per_epoch * mb:,} rows of {data.max_seq_length} tokens ({batches.fill:.0%} full)"
        )
        make_batch = lambda drawn: pack([[train_set[i] for i in packed] for packed in drawn])  # noqa: E731
    else:
        batches = EpochBatches(len(train_set), mb, config.seed)
        make_batch = lambda drawn: collate([train_set[i] for i in drawn])  # noqa: E731
    targets = [int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in train_set]  # a row's first token is never a target, packed or not
    batches = distributed.RankBatches(batches, fabric.global_rank, fabric.world_size, [len(e["input_ids"]) for e in train_set], targets)

    def next_batch() -> dict:
        """The next micro-batch on the device, with its counts from the host: the step never reads them back."""
        batch = to_device(make_batch(batches.next()))
        return {**batch, "tokens": batches.tokens, "targets": batches.targets, "rank_targets": batches.rank_targets}

    accumulate = train.gradient_accumulation_iters(devices=1)  # micro-batches per step, all ranks together
    planned = train.max_steps or max(1, math.ceil(train.epochs * batches.batches_per_epoch / accumulate))
    warmup = train.lr_warmup_steps if train.lr_warmup_steps is not None else round(train.lr_warmup_fraction * planned)
    if warmup >= planned and planned > 1:
        raise ValueError(
            f"train.lr_warmup_steps: {warmup} warmup steps of {planned} planned leave no decay; lower it or use --train.lr_warmup_fraction"
        )
    progress = Progress(total_steps=planned)
    metrics = MetricsLog(out_dir) if fabric.is_global_zero else None  # rank 0 writes
    if resume_dir is not None:
        saved = load_state(resume_dir, model, optimizer, fabric.global_rank, fabric.world_size, distributed.state_loader(fabric, model, optimizer))
        batches.load_state_dict(saved.pop("batches"))
        progress = Progress(**saved)
        if metrics is not None:
            metrics.truncate_after(progress.step)
        fabric.print(f"resumed from {resume_dir} at step {progress.step} ({progress.elapsed_s:.0f}s of budget used)")
    min_lr = train.min_lr if train.min_lr is not None else config.lr / 10
    schedule = Schedule(progress.total_steps, min(warmup, planned - 1) or 1, min_lr / config.lr if config.lr else 0.0)
    planner = BudgetPlanner(max_seconds, progress.total_steps, log=fabric.print)

    board = None
    if eval.score_interval:
        board = scoring.Scoreboard(out_dir, eval.score_tasks or [scoring.write_heldout(val_rows, out_dir)], eval)

    def save(p: Progress) -> None:
        weights, optimizer_state = distributed.full_state(fabric, model, optimizer)  # every rank takes part (FSDP gathers); rank 0 writes
        rng_ranks = distributed.rank_rng_states(fabric)
        if fabric.is_global_zero:
            with atomic_dir(out_dir / f"step-{p.step:06d}") as step_dir:  # all of it or nothing, whenever a kill comes
                save_servable(weights, method, step_dir, checkpoint_dir, template, hparams, card, chat)
                progress = {**p.state_dict(), "batches": batches.state_dict()}
                save_state(step_dir, weights, optimizer_state, progress, method.keep, rng_ranks)
        fabric.barrier()
        if board is not None and p.step % eval.score_interval == 0:
            score = board.score(out_dir / f"step-{p.step:06d}", p.step)
            fabric.print(f"step {p.step}: score {score:.1%} (eval.score_interval); best so far {board.best()['checkpoint']}")

    log = metrics if metrics is not None else lambda row: None
    progress = fit(
        fabric, model, optimizer, next_batch, schedule, config.lr, planner, progress, train, eval, val_batches, save, log, setup.checkpoint_blocks
    )
    final_dir = out_dir / "final"
    trained = {
        "steps": progress.step,
        "tokens": progress.tokens,
        "seconds": round(progress.elapsed_s, 1),
        "stopped_by_time": progress.stopped_by_time,
        "template": template,
        "dequantize_4bit": setup.dequantize_4bit,
    }
    weights, _ = distributed.full_state(fabric, model)
    if fabric.is_global_zero:
        with atomic_dir(final_dir) as tmp:
            save_servable(weights, method, tmp, checkpoint_dir, template, hparams, card, chat)
            (tmp / TRAINED).write_text(json.dumps(trained, indent=2) + "\n")
            (tmp / "submission.json").write_text(json.dumps(build_manifest(method.name, hparams, trained, card), indent=2))
        plot_metrics(metrics.path, out_dir / "loss.png")
    fabric.barrier()
    if board is not None:
        if not any(entry["step"] == progress.step for entry in board.scores):  # final/ equals a step just scored otherwise
            board.score(final_dir, progress.step)
        best = board.best()
        fabric.print(f"scores: {out_dir / scoring.SCORES_FILE}; best {best['checkpoint']} ({best['overall']:.1%}) -> {out_dir / scoring.BEST_LINK}")
    fabric.print(
        f"done: {progress.step} steps, {progress.tokens:,} tokens in {progress.elapsed_s:.1f}s "
        f"({progress.tokens / max(progress.elapsed_s, 1e-9):,.0f} tok/s); final train loss {progress.last_loss:.4f}\n"
        f"saved to {final_dir} (replay it: --config {final_dir / 'hyperparameters.yaml'})\nnext: {next_step(method, out_dir, final_dir)}"
    )
    return final_dir


def next_step(method: Method, out_dir: Path, final_dir: Path) -> str:
    """What to do with a finished run: merge a LoRA, serve an adapter as it is, serve a full finetune."""
    if method.mergeable and not method.trains_everything:
        return f"make merge RUN={out_dir} MERGED=<dir> (a standalone checkpoint), or serve it unmerged: make serve CKPT={final_dir}"
    if method.mergeable:
        return f"make serve CKPT={final_dir} (a standalone checkpoint)"
    return f"make serve CKPT={final_dir} ({method.name} is served as it is, base + {method.weights_file}; it cannot be merged)"
