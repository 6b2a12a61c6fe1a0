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


def test_jsonargparse_still_refuses_unknown_flags_itself(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(merge.main, args=["--checkpoint_dir", "x", "--no_such_flag", "1"])
    assert exit_.value.code == 2


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
