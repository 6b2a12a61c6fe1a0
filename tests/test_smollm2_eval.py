"""Issue 17's acceptance: the local eval (``python -m evals``) separates the real SmolLM2-135M from the
same model after a short LoRA finetune on the task, by more than the eval's own interval.

The task, the finetune and the scoring are the real-model demo's (``scripts.demo_smollm2``, what
``make demo-smollm2`` runs) without its merge: the unmerged run is scored, as ``--eval.score_interval``
does. Scored through ``evals.run.main`` (the code behind ``make eval``) on an MMLU-layout CSV: the answer
letter's logprob through ``/process``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.demo_smollm2 import accuracy, finetune, score, write_task

pytestmark = pytest.mark.slow(reason="scores a real 135M-parameter model twice around a short LoRA run (~3 min on 2 idle cores)")

STEPS = 20  # the demo's own run (10 steps at lr 5e-3, or 20 at 1e-3, were not enough)
N_TEST = 40


def test_eval_separates_the_base_model_from_a_short_finetune(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    train, test = write_task(tmp_path / "task", n_train=600, n_test=N_TEST)
    before, (_, before_hi) = accuracy(score(smollm2_checkpoint, test, tmp_path / "before.json"))
    final = finetune(smollm2_checkpoint, train, tmp_path / "run", STEPS)
    after, (after_lo, _) = accuracy(score(final, test, tmp_path / "after.json"))  # the unmerged run, as --eval.score_interval scores it
    # the gain is larger than the intervals: after's lower bound clears before's upper bound
    assert after_lo > before_hi, (before, after)
