"""LLaMA-Adapter finetuning of a converted litgpt checkpoint with Lightning Fabric.

    python -m finetune.adapter --checkpoint_dir checkpoints/tiny --data.train_file data/generated/tiny/train.jsonl

Trains learned prompt prefixes (with zero-init gating) in the upper layers; ``final/`` holds
``lit_model.pth.adapter``. Adapters cannot be folded into the base weights: serve the run directory
itself (``make serve CKPT=<out_dir>/final``), which loads base + adapter.
"""

from __future__ import annotations

from pathlib import Path

from litgpt.args import TrainArgs

from core.methods import METHODS
from finetune.adapter_args import AdapterArgs
from finetune.run import DataArgs, run
from finetune.scoring import EvalArgs
from finetune.speed import SpeedArgs


def setup_for(method: str):
    """The typed ``setup`` CLI function for ``adapter`` or ``adapter_v2`` (they share every option)."""

    def setup(
        checkpoint_dir: Path = Path("checkpoints/tiny"),
        out_dir: Path = Path(f"out/finetune/{method}-tiny"),
        precision: str | None = None,
        quantize: str | None = None,
        seed: int = 1337,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        max_time: str = "24h",
        resume: bool | str | Path = False,
        adapter: AdapterArgs = AdapterArgs(),
        data: DataArgs = DataArgs(),
        train: TrainArgs = TrainArgs(
            save_interval=None, log_interval=50, global_batch_size=16, micro_batch_size=16, lr_warmup_steps=40, max_steps=800, max_norm=1.0
        ),
        eval: EvalArgs = EvalArgs(interval=200, max_iters=10),
        speed: SpeedArgs = SpeedArgs(),
        neftune_alpha: float = 0.0,
    ) -> Path:
        """Finetune ``checkpoint_dir`` with this LLaMA-Adapter method; returns the final directory.

        Args:
            checkpoint_dir: converted base checkpoint.
            out_dir: where step checkpoints, ``final/``, metrics.csv and loss.png go.
            precision: Fabric precision; default bf16-true on GPUs that support it, else 32-true.
            quantize: keep the frozen base in bitsandbytes 4/8 bit (CUDA only), as for QLoRA.
            seed: seeds data order and adapter init.
            lr: peak learning rate (linear warmup, then cosine decay to 0).
            weight_decay: AdamW weight decay.
            max_time: wall-clock budget ("24h", "90m", ...), counted across resumes; see finetune.lora.
            resume: "auto", a step directory, or false; see finetune.lora.
            adapter: prefix length and first layer with an adapter.
            data: training data (a local file or a recipe) and its template.
            train: batch sizes, steps or epochs, warmup, clipping, log and save intervals (litgpt's TrainArgs).
            eval: validation interval and number of batches (litgpt's EvalArgs), and scoring saved
                checkpoints with make eval to keep the best (score_interval, score_tasks; finetune.scoring).
            speed: packing, torch.compile, micro-batch auto-sizing and activation checkpointing (finetune.speed).
            neftune_alpha: NEFTune noise on the input embeddings while training, U(-1,1) * alpha/sqrt(L*d) (finetune.neftune);
                0 (default) is off; the 4090 winner used 5.
        """
        return run(
            METHODS[method],
            adapter.as_config(),
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

    return setup


setup = setup_for("adapter")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(setup)
