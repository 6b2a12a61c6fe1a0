"""Checkpoints can't be half-written, silently corrupted, or run code: atomic saves, sha256 records, weights_only loads."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoints import WEIGHTS, CheckpointError, verify_checkpoint
from core.integrity import IntegrityError, clean_stale_temps, load_torch, recorded_sha256, save_torch, sidecar, verify
from core.paths import REPO_ROOT
from finetune.state import STATE_FILE, find_resume_dir

LORA = f"{WEIGHTS}.lora"


def _sound_step(step_dir: Path, value: float = 1.0) -> Path:
    step_dir.mkdir(parents=True)
    save_torch({"model": {"w": torch.full((4,), value)}}, step_dir / LORA)
    state = {"model": {"w": torch.full((4,), value)}, "optimizer": {"state": {}, "param_groups": []}, "progress": {"step": 1}, "rng": {}}
    save_torch(state, step_dir / STATE_FILE)
    return step_dir


def _flip(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = bytes(b ^ 0xFF for b in data[offset : offset + 16])
    path.write_bytes(bytes(data))


def test_save_records_the_files_own_sha256_in_sha256sum_format(tmp_path):
    path = tmp_path / "w.pth"
    digest = save_torch({"a": torch.arange(10)}, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == recorded_sha256(path)
    subprocess.run(["sha256sum", "--check", "--status", sidecar(path).name], cwd=tmp_path, check=True)  # coreutils agrees
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth", "w.pth.sha256"]  # no temporaries left


_KILLED_SAVE = """
import sys, time, torch
from pathlib import Path
from core.integrity import atomic_write
def write(f):
    torch.save({"w": torch.zeros(1 << 18)}, f)  # about 1 MiB, then hang as a long save would
    print("writing", flush=True)
    time.sleep(60)
atomic_write(Path(sys.argv[1]), write)
"""


def test_kill_during_save_keeps_the_old_file_and_the_temp_is_cleaned_next_start(tmp_path):
    path = tmp_path / "state.pth"
    save_torch({"w": torch.ones(3)}, path)
    env = {**os.environ, "TMPDIR": str(tmp_path / "no-such-dir"), "PYTHONPATH": str(REPO_ROOT)}  # $TMPDIR is never used
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and temps[0].stat().st_size > 2**19  # the half-written temp sits beside the target
    assert verify(path) and torch.equal(load_torch(path)["w"], torch.ones(3))  # the old save is intact
    assert clean_stale_temps(tmp_path) == temps and not temps[0].exists()


def test_damaged_weights_are_refused_naming_the_file(make_tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "tiny"
    shutil.copytree(make_tiny_checkpoint(), ckpt)
    assert recorded_sha256(ckpt / WEIGHTS) is not None  # recorded when the tiny model was saved
    verify_checkpoint(ckpt)
    _flip(ckpt / WEIGHTS, offset=(ckpt / WEIGHTS).stat().st_size // 2)  # 16 bytes inside a tensor: still loads
    with pytest.raises(CheckpointError, match=rf"{ckpt / WEIGHTS}: sha256 .* does not match .* recorded in {WEIGHTS}.sha256"):
        verify_checkpoint(ckpt)
    from server.loading import load_generator

    with pytest.raises(CheckpointError, match=str(ckpt / WEIGHTS)):
        load_generator(ckpt, device="cpu")


@pytest.mark.parametrize("recorded", [True, False])
def test_truncated_adapter_names_the_file(tmp_path, recorded):
    path = tmp_path / LORA
    save_torch({"model": {"w": torch.zeros(1000)}}, path)
    if not recorded:
        sidecar(path).unlink()
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(IntegrityError, match=rf"^{path}: ") as info:
        load_torch(path)
    assert "Traceback" not in str(info.value) and info.value.__cause__ is None


def test_resume_auto_skips_incomplete_and_damaged_steps(tmp_path):
    out = tmp_path / "run"
    _sound_step(out / "step-000004")
    _sound_step(out / "step-000005")
    (out / "step-000005" / STATE_FILE).write_bytes(b"")  # what a kill during a copy left: 0 bytes
    sidecar(out / "step-000005" / STATE_FILE).unlink()
    _flip(_sound_step(out / "step-000006") / LORA)
    _sound_step(out / "step-000007")
    (out / "step-000007" / STATE_FILE).unlink()
    log: list[str] = []
    assert find_resume_dir("auto", out, LORA, log.append) == out / "step-000004"
    assert log[0].startswith("resume: skipping step-000007: training_state.pth is missing")
    assert log[1].startswith(f"resume: skipping step-000006: {out / 'step-000006' / LORA}: sha256")
    assert log[2].startswith(f"resume: skipping step-000005: {out / 'step-000005' / STATE_FILE}: cannot be loaded")
    with pytest.raises(IntegrityError, match="step-000006"):
        find_resume_dir(out / "step-000006", out, LORA)  # an explicit choice is not second-guessed
    shutil.rmtree(out / "step-000004")
    assert find_resume_dir("auto", out, LORA, log.append) is None
    with pytest.raises(FileNotFoundError, match="no complete step"):
        find_resume_dir(True, out, LORA, log.append)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_state_file_runs_no_code(tmp_path):
    out = tmp_path / "run"
    _sound_step(out / "step-000001")
    step = _sound_step(out / "step-000002")
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    save_torch({"model": {}, "optimizer": evil, "progress": {}, "rng": {}}, step / STATE_FILE)  # hash recorded: only the load can refuse
    log: list[str] = []
    assert find_resume_dir("auto", out, LORA, log.append) == out / "step-000001"
    assert "step-000002" in log[0] and "cannot be loaded" in log[0]
    assert not evil.marker.exists()


def test_no_load_in_the_tree_allows_pickled_code():
    """The before-stop hook's rule, kept by the suite: every torch.load is weights_only=True."""
    needle = "weights_only" + "=False"
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [f for f in files if (REPO_ROOT / f).is_file() and needle in (REPO_ROOT / f).read_text()] == []


def test_unrecorded_file_loads_with_one_warning(tmp_path, capsys):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path)  # as checkpoints made before hashes were recorded
    assert torch.equal(load_torch(path)["w"], torch.ones(2))
    load_torch(path)
    assert capsys.readouterr().err.count(f"warning: {path} has no recorded sha256") == 1


def test_a_live_savers_temp_is_left_alone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        temp = tmp_path / f".w.pth.tmp-{live.pid}"
        temp.write_bytes(b"x")
        dead = tmp_path / ".step-000003.tmp-999999999"
        dead.mkdir()
        assert clean_stale_temps(tmp_path) == [dead] and temp.exists()
    finally:
        live.kill()
        live.wait()
