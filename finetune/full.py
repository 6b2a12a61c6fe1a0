"""Full finetuning (every weight trains) of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.full --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Needs weights, gradients and AdamW state for the whole model: fine for the tiny model and for ~1B
models on one GPU, too much for 7B on a 24 GB card (use ``finetune.lora --quantize bnb.nf4``).
``final/lit_model.pth`` is a complete checkpoint the server loads directly.
"""

from __future__ import annotations

from pathlib import Path

from litgpt.args import TrainArgs

from core.methods import METHODS
from finetune.run import DataArgs, run
from finetune.scoring import EvalArgs
from finetune.speed import SpeedArgs


def setup(
    checkpoint_dir: Path = Path("checkpoints/tiny"),
    out_dir: Path = Path("out/finetune/full-tiny"),
    precision: str | None = None,
    seed: int = 1337,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    max_time: str = "24h",
    resume: bool | str | Path = False,
    data: DataArgs = DataArgs(),
    train: TrainArgs = TrainArgs(
        save_interval=None, log_interval=50, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=40, max_steps=300, max_norm=1.0
    ),
    eval: EvalArgs = EvalArgs(interval=100, max_iters=10),
    speed: SpeedArgs = SpeedArgs(),
    neftune_alpha: float = 0.0,
) -> Path:
    """Finetune every weight of ``checkpoint_dir``; returns the final (standalone) checkpoint directory.

    Args:
        checkpoint_dir: converted base checkpoint.
        out_dir: where step checkpoints, ``final/``, metrics.csv and loss.png go.
        precision: Fabric precision; default bf16-true on GPUs that support it, else 32-true.
        seed: seeds data order and dropout.
        lr: peak learning rate (linear warmup, then cosine decay to 0).
        weight_decay: AdamW weight decay.
        max_time: wall-clock budget ("24h", "90m", ...), counted across resumes; see finetune.lora.
        resume: "auto", a step directory, or false; see finetune.lora.
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
        METHODS["full"],
        {},
        checkpoint_dir,
        out_dir,
        precision,
        None,
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
