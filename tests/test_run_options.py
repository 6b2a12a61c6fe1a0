"""Every finetune option is read by the run or refused naming what to use; a run replays from its own record.

The parsers are each method's config dataclass (``finetune.config``). Reads are traced on real tiny
runs (reads made only to write the record or to validate don't count), so an option that is parsed and
then ignored fails here.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.methods import METHODS
from finetune import config as run_config
from finetune.adapter import AdapterRun
from finetune.adapter_args import AdapterArgs
from finetune.adapter_v2 import AdapterV2Run
from finetune.config import REFUSED, DataArgs, EvalArgs, TrainArgs, main, parse
from finetune.full import FullRun
from finetune.lora import LoRAArgs, LoRARun
from finetune.run import run
from finetune.speed import SpeedArgs

CONFIGS = {"lora": LoRARun, "adapter": AdapterRun, "adapter_v2": AdapterV2Run, "full": FullRun}
GROUPS = {DataArgs: "data.", TrainArgs: "train.", EvalArgs: "eval.", SpeedArgs: "speed.", LoRAArgs: "lora.", AdapterArgs: "adapter."}
# Read only where a tiny CPU run does not go; each has its own test.
CONDITIONAL = {
    "eval.score_tasks": "read when eval.score_interval scores checkpoints (tests/test_finetune_scoring.py)",
    "eval.score_max_items": "read when eval.score_interval scores checkpoints (tests/test_finetune_scoring.py)",
    "eval.score_device": "read when eval.score_interval scores checkpoints (tests/test_finetune_scoring.py)",
}
NOT_USES = {("config.py", "record"), ("config.py", "refuse_unread"), ("dataclasses.py", "replace")}


def options(config_cls) -> set[str]:
    """The dotted names of every option the method's parser takes."""
    names = set()
    for f in dataclasses.fields(config_cls):
        value = getattr(config_cls(), f.name)
        names |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else {f.name}
    return names


@pytest.fixture(scope="module")
def tiny(tiny_40_rows):
    """The tiny base and 40 of its rows: an epoch is a few packed steps of 64 tokens."""
    return tiny_40_rows


def tiny_args(tiny, out_dir, method: str) -> list[str]:
    base, train_file = tiny
    args = ["--checkpoint_dir", str(base), "--out_dir", str(out_dir), "--data.train_file", str(train_file), "--data.max_seq_length", "64"]
    args += ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.save_interval", "2", "--eval.interval", "2"]
    args += ["--eval.max_iters", "1", "--lr", "3e-3"]
    if method == "lora":
        args += ["--lora.r", "4", "--lora.dropout", "0.1"]  # dropout: the replay must draw the same masks
    if method.startswith("adapter"):
        args += ["--adapter.prompt_length", "4", "--adapter.start_layer", "1"]
    return args


def traced_reads(monkeypatch, config_cls) -> set[str]:
    """Patch the config classes to note each field the run reads (not for the record or a check)."""
    reads: set[str] = set()

    def tracer(cls, prefix):
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name):
            if name in names:
                frame, depth = sys._getframe(1), 0
                while frame is not None and depth < 12:
                    if (frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name) in NOT_USES:
                        break
                    frame, depth = frame.f_back, depth + 1
                else:
                    reads.add(prefix + name)
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)

    tracer(config_cls, "")
    for cls, prefix in GROUPS.items():
        tracer(cls, prefix)
    return reads


def test_every_option_of_every_method_is_read_by_the_run_or_refused(tiny, tmp_path, monkeypatch):
    read: set[str] = set()
    for name, config_cls in CONFIGS.items():
        by_epochs = parse(config_cls, tiny_args(tiny, tmp_path / f"{name}-epochs", name))  # epochs, warmup fraction, floor lr / 10
        by_steps = parse(config_cls, [*tiny_args(tiny, tmp_path / name, name), "--train.max_steps", "3", "--train.lr_warmup_steps", "1"])
        with monkeypatch.context() as patch:
            reads = traced_reads(patch, config_cls)
            run(by_epochs)
            run(by_steps)
        read |= reads
        unread = options(config_cls) - read - set(REFUSED) - set(CONDITIONAL)
        assert not unread, f"{name}: options parsed and never read by the run: {sorted(unread)}"
    assert set(REFUSED) | set(CONDITIONAL) <= options(LoRARun)  # the lists name real options


@pytest.mark.parametrize("name, value", [(n, {"train.tie_embeddings": "true", "eval.evaluate_example": "first"}.get(n, "64")) for n in REFUSED])
def test_each_refused_option_stops_the_run_naming_it_and_what_to_use(tiny, tmp_path, capsys, name, value):
    with pytest.raises(SystemExit) as stopped:
        main(LoRARun, [*tiny_args(tiny, tmp_path / "run", "lora"), f"--{name}", value])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {name}: not read by this runner; {REFUSED[name]}"
    assert "--" in REFUSED[name] or "make eval" in REFUSED[name] or "model_config.yaml" in REFUSED[name]
    assert not (tmp_path / "run").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "method, flags, expected",
    [
        ("full", ["--speed.lora_addmm", "true"], "error: speed.lora_addmm: adds each LoRA term inside its GEMM, and full has no LoRA layers"),
        ("adapter", ["--speed.lora_addmm", "true"], "error: speed.lora_addmm: adds each LoRA term inside its GEMM, and adapter has no LoRA layers"),
        ("lora", ["--speed.dequantize_4bit", "in-block"], "error: speed.dequantize_4bit: 'in-block' is how 4-bit weights dequantize"),
        ("full", ["--speed.dequantize_4bit", "bitsandbytes"], "error: speed.dequantize_4bit: 'bitsandbytes' is how 4-bit weights dequantize"),
    ],
)
def test_a_speed_option_with_nothing_to_act_on_is_refused(tiny, tmp_path, capsys, method, flags, expected):
    """Set, it would change nothing in this run: refused naming it instead of silently unused."""
    with pytest.raises(SystemExit) as stopped:
        main(CONFIGS[method], [*tiny_args(tiny, tmp_path / "run", method), "--train.max_steps", "1", *flags])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().startswith(expected)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--train.max_steps", "3", "--train.epochs", "2"], "error: train.epochs: 2.0 would not be read: train.max_steps (3) sets the length"),
        (["--train.max_steps", "0"], "error: train.max_steps: a number of optimizer steps >= 1, got 0"),
        (["--train.epochs", "0"], "error: train.epochs: a positive number of passes over the data, got 0.0"),
        (
            ["--train.lr_warmup_steps", "1", "--train.lr_warmup_fraction", "0.2"],
            "error: train.lr_warmup_fraction: 0.2 would not be read: train.lr_warmup_steps (1) replaces it",
        ),
        (["--data.val_file", "{rows}", "--data.val_fraction", "0.2"], "error: data.val_fraction: 0.2 would not be read: data.val_file ({rows})"),
        (
            ["--data.recipe", "data/recipes/tiny_local.yaml"],
            "error: data.train_file: {rows} would not be read: data.recipe (data/recipes/tiny_local.yaml) builds the training rows",
        ),
    ],
)
def test_an_option_another_one_replaces_is_refused(tiny, tmp_path, capsys, flags, expected):
    """Set beside the option that replaces it (max_steps, lr_warmup_steps, val_file, recipe), it would be dropped unread."""
    refused_before_the_run(tiny, tmp_path, capsys, flags, expected)


def refused_before_the_run(tiny, tmp_path, capsys, flags: list[str], expected: str) -> None:
    rows = str(tiny[1])
    with pytest.raises(SystemExit) as stopped:
        main(LoRARun, [*tiny_args(tiny, tmp_path / "run", "lora"), *(f.format(rows=rows) for f in flags)])
    assert stopped.value.code == 1
    assert capsys.readouterr().err.strip().startswith(expected.format(rows=rows))
    assert not (tmp_path / "run").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--train.log_interval", "0"], "error: train.log_interval: optimizer steps between log lines, at least 1, got 0"),
        (["--train.save_interval", "0"], "error: train.save_interval: at least 1 step, got 0"),
        (["--eval.interval", "-1"], "error: eval.interval: optimizer steps between validations, or 0 for none; got -1"),
        (["--eval.max_iters", "0"], "error: eval.max_iters: at least 1 validation batch, got 0"),
    ],
)
def test_an_interval_or_count_below_one_is_refused(tiny, tmp_path, capsys, flags, expected):
    """0 log_interval divided by zero mid-run; 0 save_interval or max_iters quietly turned saving or validation off."""
    refused_before_the_run(tiny, tmp_path, capsys, flags, expected)


@pytest.mark.parametrize("name, value", [("score_tasks", "[{rows}]"), ("score_max_items", "5"), ("score_device", "cpu")])
def test_a_scoring_option_without_score_interval_is_refused(tiny, tmp_path, capsys, name, value):
    """Only --eval.score_interval scores checkpoints while training: without it these would go unread."""
    expected = f"error: eval.{name}: only read when checkpoints are scored while training, and --eval.score_interval is not set"
    refused_before_the_run(tiny, tmp_path, capsys, [f"--eval.{name}", value], expected)


def test_validation_batches_without_any_validation_are_refused(tiny, tmp_path, capsys):
    """eval.interval 0 with both end validations off runs none: a number of batches of its own would go unread."""
    flags = ["--eval.interval", "0", "--eval.final_validation", "false", "--eval.max_iters", "3"]
    refused_before_the_run(tiny, tmp_path, capsys, flags, "error: eval.max_iters: 3 validation batches, and no validation runs")


def test_the_replaced_options_at_their_defaults_still_run(tiny, tmp_path):
    """max_steps with the default epochs, warmup steps with the default fraction: the run goes ahead."""
    final = main(LoRARun, [*tiny_args(tiny, tmp_path / "run", "lora"), "--train.max_steps", "2", "--train.lr_warmup_steps", "1"])
    assert (final / "lit_model.pth.lora").is_file()


def test_one_time_budget(tiny, tmp_path, capsys):
    assert "max_time" in {f.name for f in dataclasses.fields(LoRARun)}
    with pytest.raises(SystemExit):
        main(LoRARun, [*tiny_args(tiny, tmp_path / "run", "lora"), "--train.max_time", "86400"])
    assert "--max_time" in capsys.readouterr().err


def test_defaults_are_for_real_runs_and_warmup_that_never_ends_is_refused(tiny, tmp_path):
    train = TrainArgs()
    assert train.max_steps is None and train.epochs == 1 and train.lr_warmup_steps is None and 0 < train.lr_warmup_fraction < 0.1
    assert LoRARun().data.max_seq_length == 2048
    with pytest.raises(SystemExit):
        main(LoRARun, [*tiny_args(tiny, tmp_path / "run", "lora"), "--train.max_steps", "3", "--train.lr_warmup_steps", "40"])


def lr_column(out_dir) -> list[float]:
    return [float(r["lr"]) for r in csv.DictReader((out_dir / "metrics.csv").open())]


def test_the_lr_warms_up_by_fraction_and_decays_to_the_floor(tiny, tmp_path):
    args = tiny_args(tiny, tmp_path / "run", "lora")
    main(LoRARun, [*args, "--train.max_steps", "20", "--train.lr_warmup_fraction", "0.1", "--train.min_lr", "1e-3"])
    lrs = lr_column(tmp_path / "run")
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)  # 2 warmup steps of 20
    assert lrs[-1] == pytest.approx(1e-3, rel=0.02) and min(lrs) >= 1e-3 * (1 - 1e-9)


def test_initial_and_final_validation(tiny, tmp_path, capsys):
    args = tiny_args(tiny, tmp_path / "run", "lora")
    main(LoRARun, [*args, "--train.max_steps", "3", "--eval.interval", "0", "--eval.initial_validation", "true"])
    out = capsys.readouterr().out
    assert "(eval.initial_validation)" in out
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [bool(r["val_loss"]) for r in rows] == [False, False, True]  # eval.final_validation (default true)
    off = ["--train.max_steps", "3", "--eval.interval", "0", "--eval.final_validation", "false", "--eval.max_iters", "10"]  # tiny_args' 1: unread
    main(LoRARun, [*tiny_args(tiny, tmp_path / "off", "lora"), *off])
    assert not any(r["val_loss"] for r in csv.DictReader((tmp_path / "off" / "metrics.csv").open()))


def same_run(a, b, weights_file: str) -> None:
    rows_a, rows_b = (list(csv.DictReader((d / "metrics.csv").open())) for d in (a, b))
    assert [(r["loss"], r["lr"], r["tokens"], r["val_loss"]) for r in rows_a] == [(r["loss"], r["lr"], r["tokens"], r["val_loss"]) for r in rows_b]
    wa = torch.load(a / "final" / weights_file, weights_only=True)
    wb = torch.load(b / "final" / weights_file, weights_only=True)
    wa, wb = wa.get("model", wa), wb.get("model", wb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", ["lora", "full"])
def test_config_of_a_run_replays_it_bit_for_bit(tiny, tmp_path, name):
    config_cls = CONFIGS[name]
    main(config_cls, [*tiny_args(tiny, tmp_path / "a", name), "--train.max_steps", "4"])
    record = tmp_path / "a" / "final" / "hyperparameters.yaml"
    main(config_cls, ["--config", str(record), "--out_dir", str(tmp_path / "b")])
    same_run(tmp_path / "a", tmp_path / "b", METHODS[name].weights_file)
    replayed = yaml.safe_load((tmp_path / "b" / "final" / "hyperparameters.yaml").read_text())
    assert replayed == {**yaml.safe_load(record.read_text()), "out_dir": str(tmp_path / "b")}


def test_submission_reproduce_replays_through_the_same_config_path(tiny, tmp_path, monkeypatch):
    from submission import reproduce

    base, train_file = tiny
    main(LoRARun, [*tiny_args(tiny, tmp_path / "a", "lora"), "--train.max_steps", "4"])
    unpacked = tmp_path / "unpacked"
    (unpacked / "submission").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "final" / "submission.json", unpacked / "submission.json")
    shutil.copy(train_file, unpacked / reproduce.TRAIN_FILE)
    monkeypatch.chdir(unpacked)
    parsed = []
    monkeypatch.setattr(run_config, "parse", lambda cls, args, parse=run_config.parse: parsed.append(args) or parse(cls, args))
    reproduce.finetune(out_dir=tmp_path / "b", checkpoint_dir=base.parent)
    assert parsed and parsed[0][:2] == ["--config", str(tmp_path / "b" / "submission_config.yaml")]
    same_run(tmp_path / "a", tmp_path / "b", METHODS["lora"].weights_file)


def test_litgpt_args_objects_are_refused_naming_the_runner_class(tmp_path: Path) -> None:
    """litgpt.args.EvalArgs sets evaluate_example="first" by default; passing it in gets a TypeError naming ours."""
    from litgpt.args import EvalArgs as LitgptEvalArgs

    from finetune.config import refuse_unread
    from finetune.lora import LoRARun

    with pytest.raises(TypeError, match=r"eval: give finetune\.config\.EvalArgs, got litgpt\.args\.EvalArgs"):
        refuse_unread(LoRARun(checkpoint_dir=tmp_path, eval=LitgptEvalArgs(interval=0)))
