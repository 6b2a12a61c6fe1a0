"""LoRA on the real SmolLM2-135M: a few steps on real text lower the loss, and the merged and exported
model reloads in transformers computing what our litgpt checkpoint computes.

One run for the module (CPU, float32, 8 steps of 3 packed rows of 64 tokens); merge and export
write a new 0.65 GB checkpoint each into a temporary directory.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from core.checkpoints import load_model
from finetune import lora
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.export_hf import export_hf
from finetune.merge import merge

pytestmark = pytest.mark.slow(reason="trains, merges and exports a real 135M-parameter model (~90 s on 2 cores)")

ATOL = 2e-4  # float32 litgpt vs transformers logits over 30 layers (op order differs)
STEPS = 8
# Real text: short facts in the qa template's instruction/output shape.
FACTS = [
    ("What colour is the sky on a clear day?", "Blue, because air scatters blue light the most."),
    ("Which planet is known as the red planet?", "Mars, whose dust is rich in iron oxide."),
    ("How many legs does a spider have?", "Eight legs, and most spiders have eight eyes too."),
    ("What do bees make from nectar?", "Honey, which they store in wax combs."),
    ("Which gas do plants take in for photosynthesis?", "Carbon dioxide, releasing oxygen in return."),
    ("What is the boiling point of water at sea level?", "One hundred degrees Celsius."),
    ("Who wrote the play Hamlet?", "William Shakespeare, around the year 1600."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean, covering about a third of the planet."),
]
TEXTS = ["Question: Which planet is known as the red planet?\nAnswer:", "naïve café — 東京 🙂\n\tend"]


def short_lora_run(checkpoint_dir: Path, root: Path, **options) -> Path:
    """STEPS LoRA steps on FACTS into ``root / "run"`` (``options`` override LoRARun fields); the final adapter.

    The 7 training rows (one of 8 is held out) pack into 3 rows of 64 tokens: 3 a step, each step one epoch."""
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    return lora.setup(
        checkpoint_dir=checkpoint_dir,
        out_dir=root / "run",
        lr=2e-3,
        lora=lora.LoRAArgs(r=8, alpha=16, dropout=0.0),
        data=DataArgs(train_file=data, max_seq_length=64),
        train=TrainArgs(
            save_interval=None,
            log_interval=1,
            global_batch_size=3,
            micro_batch_size=3,
            lr_warmup_steps=1,
            max_steps=STEPS,
            max_norm=1.0,
        ),
        eval=EvalArgs(interval=0),
        **options,
    )


@pytest.fixture(scope="module")
def run(smollm2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the run directory, its final checkpoint) of one short LoRA run on FACTS."""
    root = tmp_path_factory.mktemp("smollm2_lora")
    return root / "run", short_lora_run(smollm2_checkpoint, root)


def test_a_few_lora_steps_lower_the_loss_on_real_text(run) -> None:
    run_dir, _ = run
    losses = [float(r["loss"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]
    assert len(losses) == STEPS
    # 8 epochs over the same 7 rows: the last two steps must be clearly better than the first two
    first, second = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert second < first - 0.3, losses


def test_merged_and_exported_model_reloads_in_transformers_with_the_same_logits(run, smollm2_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, final = run
    merged = merge(final, out_dir=tmp_path / "merged")
    exported = export_hf(merged, tmp_path / "hf")
    assert not (exported / "tokenizer.model").exists()
    ours = load_model(merged)
    base = load_model(smollm2_checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            got, want, before = ours(ids), theirs(ids).logits, base(ids)
        assert (got - want).abs().max().item() < ATOL, text
        assert (got - before).abs().max().item() > 100 * ATOL, f"merging changed nothing for {text!r}"
