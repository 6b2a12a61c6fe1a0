"""`make demo-smollm2`: finetuning a real model helps on a task it does poorly, scored the way HELM scores.

SmolLM2-135M (built offline, ``core.smollm2``) answers "Is a tiger an animal? A. yes B. no" at chance:
it answers A (yes) whatever the word, 50% on held-out questions that are half yes, half no. The held-out questions name animals and
things that no training row names, so a gain means the model learned to read the word and answer with
the right letter, not memorized answers. Both scores come from ``python -m evals`` (``evals.run``)
on an MMLU-layout CSV through the server's ``/process``: each answer letter's logprob by ``echo_prompt``,
as HELM's ``neurips/local`` client scores multiple choice, with a Wilson 95% interval.

base -> score BEFORE -> LoRA (a fixed number of steps, no time budget: the same run on any machine)
-> merge -> score AFTER. ``tests/test_smollm2_eval.py`` runs a shorter version as issue 17's acceptance.
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

from core.paths import CHECKPOINTS_DIR, OUT_DIR
from evals.tasks import _mmlu_block

SUBJECT = "animals"  # the CSV's name gives HELM's MMLU heading: "... questions (with answers) about animals."
# Disjoint pools: no training row names a held-out word.
TRAIN_ANIMALS = "cat dog horse cow sheep goat duck goose rabbit mouse fox wolf bear deer owl eagle pig lion hen bee".split()
TRAIN_OTHER = "hammer saw drill ladder brush river bridge market library stone water light bread cheese spoon cup chair road door coat".split()
TEST_ANIMALS = "tiger zebra monkey donkey camel whale shark frog snake parrot rat crab ant bat swan".split()
TEST_OTHER = "pencil window bottle garden candle blanket button mirror carpet basket table lamp shoe clock wall".split()
OPTIONS = ["yes", "no"]


def mc_item(rng: random.Random, animals: list[str], other: list[str], is_animal: bool) -> tuple[str, str]:
    """A yes/no question and its gold letter (A: yes, B: no)."""
    word = rng.choice(animals if is_animal else other)
    return f"Is {'an' if word[0] in 'aeiou' else 'a'} {word} an animal?", "A" if is_animal else "B"


def write_task(out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, animals_test.csv) in ``out_dir``: rows in the qa template's shape, and the held-out CSV.

    A training row's instruction is the exact text ``evals`` sends for a 0-shot MMLU question minus the
    ``\nAnswer:`` that the qa template appends; its output is the letter after a space, the continuation
    HELM scores.
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = f"The following are multiple choice questions (with answers) about {SUBJECT}.\n\n"
    rows = []
    for _ in range(n_train):
        question, gold = mc_item(rng, TRAIN_ANIMALS, TRAIN_OTHER, rng.random() < 0.5)
        prompt = head + _mmlu_block(question, OPTIONS, None)
        rows.append({"instruction": prompt.removesuffix("\nAnswer:"), "output": f" {gold}"})
    train = out_dir / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = out_dir / f"{SUBJECT}_test.csv"
    with test.open("w", newline="") as f:
        writer = csv.writer(f)
        for i in range(n_test):  # yes and no alternate: a model that always answers A scores 50%
            question, gold = mc_item(rng, TEST_ANIMALS, TEST_OTHER, i % 2 == 0)
            writer.writerow([question, *OPTIONS, gold])
    return train, test


def finetune(checkpoint_dir: Path, train_file: Path, out_dir: Path, steps: int, batch: int = 8, lr: float = 3e-3) -> Path:
    """LoRA (r 8, all linear layers) for exactly ``steps`` optimizer steps of ``batch`` packed rows of 128 tokens
    (about 3 questions each) at peak learning rate ``lr``; returns the run's final/.

    Seeded (the run config's seed 1337) and not cut by time (the 24h default budget): the same run everywhere.
    """
    from finetune import lora
    from finetune.config import DataArgs, EvalArgs, TrainArgs

    return lora.setup(
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        lr=lr,
        lora=lora.LoRAArgs(r=8, alpha=16, dropout=0.0),
        data=DataArgs(train_file=train_file, prompt_style="qa", max_seq_length=128),
        train=TrainArgs(
            save_interval=None,
            log_interval=5,
            global_batch_size=batch,
            micro_batch_size=batch,
            lr_warmup_steps=min(5, steps - 1),
            max_steps=steps,
            max_norm=1.0,
        ),
        eval=EvalArgs(interval=0, final_validation=False),
    )


def score(checkpoint_dir: Path, test_csv: Path, out: Path) -> dict:
    """``python -m evals`` on the held-out CSV (0 shots, HELM's letter logprob), in this process, on the CPU."""
    from evals.run import main as run_eval

    return run_eval(tasks=[test_csv], checkpoint_dir=checkpoint_dir, shots=0, device="cpu", out=out)


def accuracy(report: dict) -> tuple[float, list[float]]:
    """(accuracy, its Wilson 95% interval) of the one task in an ``evals`` report."""
    (task,) = report["tasks"].values()
    metric = task["metrics"]["accuracy"]
    return metric["value"], metric["ci95"]


def main(steps: int = 20, n_train: int = 600, n_test: int = 40, out_dir: Path = OUT_DIR / "demo-smollm2") -> None:
    """Run the real-model demo (CPU, about 10 minutes on 2 cores).

    Args:
        steps: LoRA optimizer steps of 8 packed rows (about 24 questions) (fixed: the result does not depend on machine speed).
        n_train: training rows (questions from the training pools; 5% are held out as validation).
        n_test: held-out questions scored before and after (from pools no training row uses).
        out_dir: where the task files, the LoRA run and the eval JSONs go.
    """
    from core.smollm2 import build
    from finetune.merge import merge

    if steps < 2:
        raise SystemExit(f"error: --steps must be at least 2 (a warmup step and a decay step), got {steps}")
    if n_train < 8 or n_test < 1:
        raise SystemExit(f"error: --n_train must be >= 8 (one batch) and --n_test >= 1, got {n_train} and {n_test}")
    t0 = time.time()
    base = build()
    train, test = write_task(Path(out_dir), n_train, n_test)
    print(f"task: 'Is a ... an animal? A. yes B. no'; {n_train} training rows, {n_test} held-out questions ({test})")
    before = accuracy(score(base, test, Path(out_dir) / "before.json"))
    final = finetune(base, train, Path(out_dir) / "run", steps)
    merged = merge(final, out_dir=CHECKPOINTS_DIR / "SmolLM2-135M-animals")
    after = accuracy(score(merged, test, Path(out_dir) / "after.json"))
    print("\n=== summary (held-out accuracy, letter logprob through /process, Wilson 95% interval)")
    for name, (value, (lo, hi)) in (("before", before), ("after", after)):
        print(f"  {name:6s} {value:6.1%}  [{lo:.1%}, {hi:.1%}]")
    print(f"  {steps} LoRA steps; merged checkpoint: {merged}   total time {time.time() - t0:.0f}s")
    if after[0] <= before[0]:
        raise SystemExit("finetuning did not improve held-out accuracy")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
