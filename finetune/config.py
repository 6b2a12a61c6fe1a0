"""The run config every finetune method shares: the command line, the run's record, and its replay.

Each method script declares one dataclass over ``RunConfig`` (``finetune.lora.LoRARun``, ...). That
dataclass is the CLI (jsonargparse: ``--lr``, ``--train.epochs``, ``--speed.micro_batch``; a
``Literal`` for every enumerated option), and the run writes it to ``hyperparameters.yaml`` with every
"auto" resolved to what ran, so ``--config <run>/final/hyperparameters.yaml`` replays the run
exactly (``submission.reproduce`` takes the same path). Every field is read by the run; litgpt's
options that this runner does not implement are refused, naming what to use instead (``REFUSED``).
"""

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from core.precision import TrainQuantize
from finetune.distributed import Strategy
from finetune.speed import SpeedArgs

Precision = Literal["bf16-true", "16-true", "32-true", "bf16-mixed", "16-mixed"]
Quantize = TrainQuantize

# Options litgpt's TrainArgs/EvalArgs have that this runner does not read: set, they stop the run naming what to use.
REFUSED = {
    "train.max_time": "the run's one time budget is --max_time (e.g. '23h'), counted across resumes",
    "train.max_tokens": "bound the run with --train.epochs, --train.max_steps or --max_time",
    "train.max_seq_length": "use --data.max_seq_length (rows are cut and packed to it)",
    "train.tie_embeddings": "weight tying is the base model's (its model_config.yaml), not a training option",
    "eval.max_new_tokens": "validation computes the loss and generates nothing; score generations with --eval.score_interval or make eval",
    "eval.evaluate_example": "validation generates no examples; score generations with --eval.score_interval or make eval",
}


@dataclass
class DataArgs:
    """Where the instruction data comes from and how it is rendered."""

    train_file: Path | None = Path("data/generated/tiny/train.jsonl")
    """local JSON/JSONL"""
    recipe: Path | None = None
    """a data recipe YAML (data/recipes/), instead of train_file (a train_file of its own beside it is refused)"""
    val_file: Path | None = None
    """None: hold out val_fraction of the training rows"""
    val_fraction: float = 0.05
    """the share of the training rows held out for validation when there is no val_file (set beside one: refused)"""
    prompt_style: str | None = None
    """None: "qa" for a file; a recipe names its own template (setting both is refused); a chat run has none (refused)"""
    chat_template: str | None = None
    """conversations ({"messages": [...]}) and, once there is one, every row: None = the base model's own chat template (tokenizer_config.json), or one of core.chat.NAMED ("chatml", "qa"), or a .jinja file"""
    max_seq_length: int = 2048
    """tokens per row (packed rows are this long); capped by nothing else"""
    mask_prompt: bool = True
    """loss on response tokens only"""


@dataclass
class TrainArgs:
    """Batches, length of the run, LR schedule, clipping, log and save intervals (litgpt's TrainArgs, as this runner reads them).

    The run is as long as ``max_steps`` optimizer steps, else ``epochs`` passes over the data, and
    never longer than ``--max_time``. The LR warms up linearly, then decays along a cosine to ``min_lr``.
    """

    save_interval: int | None = 500
    """optimizer steps between step-NNNNNN/ checkpoints (for --resume); None: only final/"""
    log_interval: int = 10
    """optimizer steps between log lines"""
    global_batch_size: int = 16
    """rows per optimizer step, all devices together (packed rows of data.max_seq_length tokens when packing)"""
    micro_batch_size: int = 4
    """rows per forward pass on each device; with speed.micro_batch auto the memory plan picks it on a GPU"""
    lr_warmup_steps: int | None = None
    """warmup steps; given, it replaces lr_warmup_fraction (a fraction of its own beside it is refused)"""
    lr_warmup_fraction: float = 0.03
    """warmup as a fraction of the planned optimizer steps"""
    epochs: float | None = 1
    """passes over the training data (when max_steps is None; a number of its own beside max_steps is refused)"""
    max_steps: int | None = None
    """optimizer steps, instead of epochs (>= 1)"""
    max_norm: float | None = 1.0
    """gradient clipping (global L2 norm); None: off"""
    min_lr: float | None = None
    """where the cosine ends; None: lr / 10"""
    # refused (REFUSED says what to use): litgpt's names, kept so that a litgpt user's flag is answered
    max_tokens: int | None = None
    """refused: bound the run with --train.epochs, --train.max_steps or --max_time"""
    max_time: float | None = None
    """refused: the run's one time budget is --max_time"""
    max_seq_length: int | None = None
    """refused: use --data.max_seq_length"""
    tie_embeddings: bool | None = None
    """refused: weight tying is the base model's (model_config.yaml)"""

    def gradient_accumulation_iters(self, devices: int = 1, num_nodes: int = 1) -> int:
        return self.global_batch_size // (devices * num_nodes) // self.micro_batch_size


@dataclass
class EvalArgs:
    """Validation loss while training, and scoring saved checkpoints with ``make eval`` (``finetune.scoring``)."""

    interval: int = 200
    """optimizer steps between validations; 0: none"""
    max_iters: int = 10
    """validation batches (refused when no validation runs)"""
    initial_validation: bool = False
    """validate once before the first step"""
    final_validation: bool = True
    """validate after the last step"""
    score_interval: int | None = None
    """score the checkpoint saved every this many steps (a multiple of train.save_interval), and final/"""
    score_tasks: list[Path] | None = None
    """evals task files (MMLU .csv, GSM8K .jsonl, rows); default: the run's held-out rows (with score_interval only)"""
    score_max_items: int | None = 200
    """items scored per task (the intervals in eval.json say how much that resolves); with score_interval only"""
    score_device: str = "auto"
    """where the scorer loads the checkpoint: auto (the GPU when there is one), cpu, cuda, cuda:1; with score_interval only"""
    # refused (REFUSED says what to use)
    max_new_tokens: int | None = None
    """refused: validation generates nothing; use --eval.score_interval or make eval"""
    evaluate_example: str | int | None = None
    """refused: validation generates nothing; use --eval.score_interval or make eval"""


@dataclass
class RunConfig:
    """Options every method shares; each method's subclass adds its own group and sets ``method``."""

    method: ClassVar[str]  # core.methods.METHODS key

    def __init_subclass__(cls, **kwargs) -> None:
        """``--help`` reads a field's docstring from the class that declares it; jsonargparse looks only at the
        method's own class, so the shared fields' docs are handed down as an ``Args:`` section of its docstring."""
        super().__init_subclass__(**kwargs)
        own = set(_field_docs(cls, inherited=False))
        handed = {name: doc for name, doc in _field_docs(RunConfig, inherited=True).items() if name not in own}
        if handed:
            lines = "".join(f"\n    {name}: {' '.join(doc.split())}" for name, doc in handed.items())
            cls.__doc__ = f"{(cls.__doc__ or '').rstrip()}\n\nArgs:{lines}\n"

    group: ClassVar[str | None] = None  # the field holding the method's own options (their as_config() sets litgpt Config fields)
    checkpoint_dir: Path = Path("checkpoints/tiny")
    """converted base checkpoint (make download or make tiny)"""
    out_dir: Path = Path("out/finetune/run")
    """where step checkpoints, final/, metrics.csv and loss.png go"""
    precision: Precision | None = None
    """Fabric precision; None: bf16-true on GPUs that support it, else 32-true"""
    seed: int = 1337
    """seeds the validation split, data order, dropout and the new parameters' init"""
    lr: float = 2e-4
    """peak learning rate (linear warmup, then cosine decay to train.min_lr)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_time: str = "24h"
    """the wall-clock budget ("23h", "90m", ...), counted across resumes: the first steps are measured, the LR
    schedule shortened to what fits, and the run stops and saves before the budget ends"""
    devices: int = 1
    """processes, one per GPU (or CPU processes over gloo): each trains on its share of every global batch, which
    stays train.global_batch_size rows (devices x train.micro_batch_size x accumulation); rank 0 writes"""
    strategy: Strategy = "auto"
    """how the devices share the model: "ddp" replicates it; "fsdp" shards the weights (and a full finetune's
    optimizer state) over the GPUs, one transformer block at a time (CUDA only); "auto": ddp when devices > 1"""
    resume: bool | Literal["auto"] | Path = False
    """"auto": continue from the newest sound step checkpoint in out_dir (if any); a path: from that one; restores
    weights, optimizer, schedule, data position and RNG exactly"""
    data: DataArgs = field(default_factory=DataArgs)
    """training data (a local file or a recipe) and its template"""
    train: TrainArgs = field(default_factory=TrainArgs)
    """batch sizes, epochs or steps, warmup, the LR floor, clipping, log and save intervals"""
    eval: EvalArgs = field(default_factory=EvalArgs)
    """validation, and scoring saved checkpoints with make eval (finetune.scoring)"""
    speed: SpeedArgs = field(default_factory=SpeedArgs)
    """packing, torch.compile, micro-batch auto-sizing and activation checkpointing (finetune.speed)"""
    neftune_alpha: float = 0.0
    """NEFTune noise on the input embeddings while training, U(-1,1) * alpha/sqrt(L*d) (finetune.neftune); 0 is off; the 4090 winner used 5"""


def _field_docs(cls: type, inherited: bool) -> dict[str, str]:
    """The attribute docstrings of ``cls``'s body (and of its bases' when ``inherited``), by field name."""
    from docstring_parser import parse_from_object

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__ if inherited else (cls,)):
        if klass is cls or "__dataclass_fields__" in vars(klass):  # cls is not a dataclass yet in __init_subclass__
            docs.update({p.arg_name: p.description for p in parse_from_object(klass).params if p.description})
    return docs


def method_config(config: RunConfig) -> dict:
    """The litgpt ``Config`` fields of the method's own group (``lora_r``, ``adapter_start_layer``, ...)."""
    return getattr(config, config.group).as_config() if config.group else {}


def quantize_of(config: RunConfig) -> Quantize | None:
    """The frozen base's bitsandbytes mode (full finetuning has no ``quantize``)."""
    return getattr(config, "quantize", None)


def refuse_unread(config: RunConfig) -> None:
    """Stop before anything loads if an option this runner does not read is set, naming it and what to use."""
    for group, expected in {"data": DataArgs, "train": TrainArgs, "eval": EvalArgs, "speed": SpeedArgs}.items():
        value = getattr(config, group)
        if not isinstance(value, expected):  # e.g. litgpt.args.EvalArgs, whose defaults set options this runner refuses
            raise TypeError(f"{group}: give {expected.__module__}.{expected.__qualname__}, got {type(value).__module__}.{type(value).__qualname__}")
    for name, instead in REFUSED.items():
        group, key = name.split(".")
        if getattr(getattr(config, group), key) is not None:
            raise ValueError(f"{name}: not read by this runner; {instead}")
    train, data = config.train, config.data
    if train.min_lr is not None and not 0 <= train.min_lr <= config.lr:
        raise ValueError(f"train.min_lr: the cosine floor must be between 0 and lr ({config.lr}), got {train.min_lr}")
    if not 0 <= train.lr_warmup_fraction < 1:
        raise ValueError(f"train.lr_warmup_fraction: a fraction of the steps in [0, 1), got {train.lr_warmup_fraction}")
    if train.micro_batch_size < 1 or train.global_batch_size % train.micro_batch_size:
        raise ValueError(f"train.micro_batch_size: {train.micro_batch_size} must divide train.global_batch_size ({train.global_batch_size})")
    if train.max_steps is None and train.epochs is None:
        raise ValueError("train.epochs: give the length of the run, --train.epochs or --train.max_steps")
    refuse_non_positive(config)
    refuse_overridden(train, data)
    evaluation = config.eval
    if not (evaluation.interval or evaluation.initial_validation or evaluation.final_validation) and evaluation.max_iters != EvalArgs().max_iters:
        raise ValueError(
            f"eval.max_iters: {evaluation.max_iters} validation batches, and no validation runs (eval.interval 0, "
            "eval.initial_validation and eval.final_validation off); drop it or turn one of them on"
        )
    if data.recipe is not None and data.prompt_style is not None:
        raise ValueError(f"data.prompt_style: {data.recipe} names its own template; drop --data.prompt_style or edit the recipe's template")


def refuse_non_positive(config: RunConfig) -> None:
    """Intervals and counts that must be at least 1 (0 would divide by zero or quietly turn a feature off)."""
    train, evaluation = config.train, config.eval
    if train.log_interval < 1:
        raise ValueError(f"train.log_interval: optimizer steps between log lines, at least 1, got {train.log_interval}")
    if train.save_interval is not None and train.save_interval < 1:
        raise ValueError(f"train.save_interval: at least 1 step, got {train.save_interval}; or null to save only final/")
    if evaluation.interval < 0:
        raise ValueError(f"eval.interval: optimizer steps between validations, or 0 for none; got {evaluation.interval}")
    if evaluation.max_iters < 1:
        raise ValueError(f"eval.max_iters: at least 1 validation batch, got {evaluation.max_iters}; turn validation off with eval.interval 0 instead")


def refuse_overridden(train: TrainArgs, data: DataArgs) -> None:
    """An option another one replaces, set to a value of its own, would be dropped unread: refused, naming both.

    litgpt ends a run at whichever of max_steps and epochs comes first; here max_steps wins, so a user
    passing both would silently get max_steps. Only values that differ from the default are refused."""
    train_defaults, data_defaults = TrainArgs(), DataArgs()
    if train.max_steps is not None and train.max_steps < 1:
        raise ValueError(f"train.max_steps: a number of optimizer steps >= 1, got {train.max_steps}; or leave it unset to run train.epochs")
    if train.epochs is not None and train.epochs <= 0:
        raise ValueError(f"train.epochs: a positive number of passes over the data, got {train.epochs}")
    if train.max_steps is not None and train.epochs is not None and train.epochs != train_defaults.epochs:
        raise ValueError(
            f"train.epochs: {train.epochs} would not be read: train.max_steps ({train.max_steps}) sets the length of the run; give one of them"
        )
    if train.lr_warmup_steps is not None and train.lr_warmup_fraction != train_defaults.lr_warmup_fraction:
        raise ValueError(
            f"train.lr_warmup_fraction: {train.lr_warmup_fraction} would not be read: train.lr_warmup_steps ({train.lr_warmup_steps}) "
            "replaces it; give one of them"
        )
    if data.val_file is not None and data.val_fraction != data_defaults.val_fraction:
        raise ValueError(
            f"data.val_fraction: {data.val_fraction} would not be read: data.val_file ({data.val_file}) holds the validation rows; give one of them"
        )
    if data.recipe is not None and data.train_file is not None and Path(data.train_file) != data_defaults.train_file:
        raise ValueError(
            f"data.train_file: {data.train_file} would not be read: data.recipe ({data.recipe}) builds the training rows; give one of them"
        )


def record(config: RunConfig) -> dict:
    """The config as plain YAML values, what ``--config`` reads back (the refused options, always unset, left out)."""

    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(dataclasses.asdict(config))
    for name in REFUSED:
        group, key = name.split(".")
        out[group].pop(key)
    return out


CONFIG_CLASSES = {"lora": "finetune.lora:LoRARun", "adapter": "finetune.adapter:AdapterRun", "adapter_v2": "finetune.adapter_v2:AdapterV2Run"}
CONFIG_CLASSES["full"] = "finetune.full:FullRun"


def config_class(method: str) -> type[RunConfig]:
    module, name = CONFIG_CLASSES[method].split(":")
    return getattr(importlib.import_module(module), name)


def parse(config_cls: type[RunConfig], args: list[str]) -> RunConfig:
    """The method's command line (``--config FILE`` first, later flags override it), as the typed config."""
    from jsonargparse import auto_cli

    _parse_field_docstrings()
    return auto_cli(config_cls, args=args, as_positional=False)


def main(config_cls: type[RunConfig], args: list[str] | None = None) -> Path:
    """``python -m finetune.<method> ...``: parse, run, and fail in one line (``core.cli``)."""
    from core.cli import run_cli
    from finetune.run import run

    _parse_field_docstrings()
    return run_cli(config_cls, args=args, then=run)


def _parse_field_docstrings() -> None:
    """``--help`` shows each field's docstring (litgpt's style of documenting its dataclasses)."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
