"""--eval.score_interval: saved checkpoints are scored by make eval during training and the best is kept."""

import json

import pytest
import yaml

from finetune import lora, scoring
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.speed import SpeedArgs


def test_scoring_options_that_cannot_work_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"eval.score_interval: 15 steps must be a multiple of train.save_interval \(10\)"):
        scoring.check(EvalArgs(score_interval=15), 10)
    with pytest.raises(ValueError, match="multiple of train.save_interval"):
        scoring.check(EvalArgs(score_interval=10), None)
    with pytest.raises(ValueError, match="eval.score_tasks: .*nope.csv not found"):
        scoring.check(EvalArgs(score_interval=10, score_tasks=[tmp_path / "nope.csv"]), 5)
    scoring.check(EvalArgs(), None)  # off: nothing to check
    with pytest.raises(ValueError, match="give --eval.score_tasks"):
        scoring.write_heldout([{"messages": [{"role": "user", "content": "hi"}]}], tmp_path)


@pytest.mark.slow(reason="a real LoRA run on the CPU whose two saved checkpoints are each scored by a make eval subprocess")
def test_each_scored_save_is_recorded_and_best_links_the_top_one(make_tiny_checkpoint, tmp_path):
    base = make_tiny_checkpoint()
    rows = [json.loads(line) for line in (base.parent / "data" / "train.jsonl").read_text().splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "parity"))
    out = tmp_path / "run"
    final = lora.setup(
        checkpoint_dir=base,
        out_dir=out,
        lr=3e-3,
        data=DataArgs(train_file=tmp_path / "train.jsonl", prompt_style="qa", max_seq_length=64, val_fraction=0.03),
        train=TrainArgs(save_interval=10, log_interval=50, global_batch_size=16, micro_batch_size=16, lr_warmup_steps=5, max_steps=20, max_norm=1.0),
        eval=EvalArgs(interval=0, score_interval=10, score_max_items=20, score_device="cpu"),
        speed=SpeedArgs(packing=False),
    )
    board = json.loads((out / "scores.json").read_text())
    assert [e["checkpoint"] for e in board["checkpoints"]] == ["step-000010", "step-000020"]  # final/ is step 20: not scored twice
    for entry in board["checkpoints"]:
        report = json.loads((out / entry["checkpoint"] / "eval.json").read_text())
        assert report["overall"] == entry["overall"] and report["tasks"]["heldout"]["n"] == 20  # the run's own held-out rows
    top = max(board["checkpoints"], key=lambda e: (e["overall"], -e["step"]))
    assert board["best"] == top and (out / "best").resolve() == (out / top["checkpoint"]).resolve()
    assert yaml.safe_load((final / "hyperparameters.yaml").read_text())["eval"]["score_interval"] == 10
