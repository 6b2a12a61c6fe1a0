"""Failures are one line naming the file, field or flag and the fix; the traceback only with --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import run_cli
from core.methods import METHODS
from finetune import lora, merge
from finetune.run import next_step


def _fails(capsys, components, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(components, args=args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: ")
    return err.strip()


def test_finetune_bad_data_file_is_one_line_and_debug_shows_the_traceback(make_tiny_checkpoint, tmp_path: Path, capsys) -> None:
    args = ["--checkpoint_dir", str(make_tiny_checkpoint()), "--out_dir", str(tmp_path / "run"), "--data.train_file", str(tmp_path / "absent.jsonl")]
    err = _fails(capsys, lora.setup, args)
    assert err == f"error: {tmp_path / 'absent.jsonl'}: data file not found"
    from finetune.data import DataError

    with pytest.raises(DataError, match="data file not found"):
        run_cli(lora.setup, args=[*args, "--debug"])


def test_merge_of_an_adapter_run_says_how_to_serve_it(tmp_path: Path, capsys) -> None:
    run = tmp_path / "final"
    run.mkdir()
    (run / METHODS["adapter"].weights_file).write_bytes(b"")
    err = _fails(capsys, merge.main, ["--checkpoint_dir", str(run)])
    assert f"make serve CKPT={run}" in err and "cannot be folded" in err


def test_merge_of_a_directory_without_weights_names_it(tmp_path: Path, capsys) -> None:
    err = _fails(capsys, merge.main, ["--checkpoint_dir", str(tmp_path)])
    assert str(tmp_path) in err and "final/" in err


def test_unexpected_errors_say_what_they_are_and_how_to_see_more(capsys) -> None:
    def broken() -> None:
        raise KeyError("lm_head.weight")

    err = _fails(capsys, broken, [])
    assert err == "error: KeyError: 'lm_head.weight' (rerun with --debug for the traceback)"


def _refused(capsys, components, args: list[str]) -> str:
    """A command line jsonargparse refuses: exit code 2 and one line, no usage block."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(components, args=args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err, err
    return err.strip()


def test_unknown_flags_are_refused_in_one_line_naming_them(capsys) -> None:
    err = _refused(capsys, merge.main, ["--checkpoint_dir", "x", "--no_such_flag", "1"])
    assert "--no_such_flag" in err and "--help" in err


@pytest.mark.parametrize("method", ["lora", "adapter", "adapter_v2", "full"])
def test_a_bad_enumerated_option_names_the_flag_the_value_and_every_choice(method: str, capsys) -> None:
    """jsonargparse alone says "Cannot take a Union of no types" for a Literal; the line lists the Literal's own values."""
    from typing import get_args

    from finetune.config import Precision, config_class
    from finetune.speed import SpeedArgs

    config = config_class(method)
    err = _refused(capsys, config, ["--precision", "bf32"])
    assert err == f"error: --precision: 'bf32' is not one of {', '.join(get_args(Precision))}"
    micro = get_args(dataclasses_field_type(SpeedArgs, "micro_batch"))
    err = _refused(capsys, config, ["--speed.micro_batch=x"])
    assert err == f"error: --speed.micro_batch: 'x' is not one of {', '.join(micro)}"


def test_a_nested_literal_lists_every_value(capsys) -> None:
    from core.precision import TRAIN_QUANTIZE

    err = _refused(capsys, lora.LoRARun, ["--quantize", "nf5"])
    assert err == f"error: --quantize: 'nf5' is not one of {', '.join(TRAIN_QUANTIZE)}"


def test_a_bad_value_in_a_config_file_says_so(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("speed:\n  micro_batch: sometimes\n")
    err = _refused(capsys, lora.LoRARun, ["--config", str(config)])
    assert err.startswith("error: --speed.micro_batch: the value in --config is not one of auto")


def test_a_mistyped_number_names_the_flag(capsys) -> None:
    err = _refused(capsys, lora.LoRARun, ["--lr", "abc"])
    assert err.startswith("error: --lr: ") and "abc" in err


@pytest.mark.parametrize("method", ["lora", "adapter", "adapter_v2", "full"])
def test_every_option_of_every_method_has_help(method: str) -> None:
    """--help describes each option, the shared RunConfig fields included (their docs live on the base class)."""
    from jsonargparse import ArgumentParser

    from finetune.config import _parse_field_docstrings, config_class

    _parse_field_docstrings()
    parser = ArgumentParser()
    parser.add_class_arguments(config_class(method))
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config", "print_config")]
    options = [a for a in options if not a.dest.endswith("CONFIG") and type(a).__name__ != "_ActionConfigLoad"]
    undocumented = [a.option_strings[0] for a in options if not (a.help or "").split("(type:")[0].strip()]
    assert len(options) > 40 and not undocumented, undocumented


def dataclasses_field_type(cls: type, name: str):
    import typing

    return typing.get_type_hints(cls)[name]


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_ends_with_what_to_do_next(name: str, tmp_path: Path) -> None:
    method, final = METHODS[name], tmp_path / "run" / "final"
    text = next_step(method, tmp_path / "run", final)
    assert f"make serve CKPT={final}" in text
    if name == "lora":
        assert f"make merge RUN={tmp_path / 'run'}" in text
    else:
        assert "merge RUN" not in text and "python -m" not in text
    if name.startswith("adapter"):
        assert "cannot be merged" in text


def test_adapter_packing_message_reads_as_a_sentence() -> None:
    import torch

    from finetune.attention import unsupported_reason

    for name in ("adapter", "adapter_v2"):
        method = METHODS[name]
        with torch.device("meta"):
            model = method.litgpt.GPT(method.litgpt.Config.from_name("tiny", adapter_prompt_length=2, adapter_start_layer=1))
        reason = unsupported_reason(model)
        assert f"this model has {reason}" == f"this model has adapter prefixes in its attention ({method.module})"


def test_cli_subprocess_prints_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "finetune.merge", "--checkpoint_dir", str(tmp_path / "nothing")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
