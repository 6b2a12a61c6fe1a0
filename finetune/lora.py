"""LoRA and QLoRA finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.lora --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl
    python -m finetune.lora --checkpoint_dir checkpoints/mistralai/Mistral-7B-v0.1 --quantize bnb.nf4 \\
        --data.recipe data/recipes/rtx4090_mix.yaml --max_time 23h          # QLoRA on a 4090

``final/`` holds ``lit_model.pth.lora`` (adapter only) and what merge and serving need;
``python -m finetune.merge`` writes a standalone checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from litgpt.args import TrainArgs

from core.methods import METHODS
from finetune.run import DataArgs, run
from finetune.scoring import EvalArgs
from finetune.speed import SpeedArgs


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

    def as_config(self) -> dict:
        """The litgpt ``Config`` fields these set (``lora_r``, ``lora_query``, ...)."""
        return {f"lora_{k}": v for k, v in dataclasses.asdict(self).items()}


def setup(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    out_dir: Path = Path("out/finetune/lora-tiny"),
    precision: str | None = None,
    quantize: str | None = None,
    seed: int = 1337,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_time: str = "24h",
    resume: bool | str | Path = False,
    lora: LoRAArgs = LoRAArgs(),
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(
        save_interval=None, log_interval=50, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=40, max_steps=800, max_norm=1.0
    ),
    eval: EvalArgs = EvalArgs(interval=200, max_iters=10),
    speed: SpeedArgs = SpeedArgs(),
    neftune_alpha: float = 0.0,
) -> Path:
    """Finetune ``checkpoint_dir`` with LoRA (QLoRA with ``--quantize``); returns the final adapter directory.

    Args:
        checkpoint_dir: converted base checkpoint (``make download`` or ``make tiny``).
        out_dir: where step checkpoints, ``final/``, metrics.csv and loss.png go.
        precision: Fabric precision; default bf16-true on GPUs that support it, else 32-true.
        quantize: QLoRA: keep the frozen base in "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq" or
            "bnb.int8-training" (CUDA only).
        seed: seeds data order, dropout and adapter init.
        lr: peak learning rate (linear warmup, then cosine decay to 0).
        weight_decay: AdamW weight decay.
        max_time: wall-clock budget ("24h", "90m", ...), counted across resumes. The first steps are
            measured; if the plan doesn't fit, the schedule is shortened to what fits. The run stops
            and saves before the budget ends.
        resume: "auto" continues from the newest step checkpoint in out_dir (if any), a path from that
            one; restores weights, optimizer, schedule, data position and RNG exactly.
        lora: rank, alpha, dropout and which layers get adapters (all linear layers and the head by default).
        data: training data (a local file or a recipe) and its template.
        train: batch sizes (in packed rows of data.max_seq_length tokens when packing), steps or epochs, warmup,
            clipping, log and save intervals (litgpt's TrainArgs).
        eval: validation interval and number of batches (litgpt's EvalArgs), and scoring saved
            checkpoints with make eval to keep the best (score_interval, score_tasks; finetune.scoring).
        speed: packing, torch.compile, micro-batch auto-sizing and activation checkpointing (finetune.speed).
        neftune_alpha: NEFTune noise on the input embeddings while training, U(-1,1) * alpha/sqrt(L*d) (finetune.neftune);
            0 (default) is off; the 4090 winner used 5.
    """
    return run(
        METHODS["lora"],
        lora.as_config(),
        checkpoint_dir,
        out_dir,
        precision,
        quantize,
        seed,
        lr,
        weight_decay,
        max_time,
        resume,
        data,
        train,
        eval,
        speed,
        neftune_alpha,
    )


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(setup)
