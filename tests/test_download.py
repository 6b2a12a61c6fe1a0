"""core.hub.download: manifest checks, the embedded tiny model, one clear error when the Hugging Face
Hub cannot be reached (never a traceback from the CLI), and the convert CLI. No test needs a network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import core.hub as hub
from core.checkpoints import WEIGHTS, CheckpointError, verify_checkpoint
from core.manifest import UnlistedModelError
from core.paths import REPO_ROOT


def _run_cli(args: list[str], tmp_path: Path, **env_overrides: str | None) -> subprocess.CompletedProcess:
    """Run ``python -m core.hub ...`` from the repo root with an isolated, fast-failing HF environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),  # no cache from the machine
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-m", "core.hub", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call to litgpt's download_from_hub fails the test."""
    import litgpt.scripts.download

    def forbidden(*args, **kwargs):
        raise AssertionError(f"download_from_hub was called: {args} {kwargs}")

    monkeypatch.setattr(litgpt.scripts.download, "download_from_hub", forbidden)


def test_unlisted_model_refused(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(UnlistedModelError, match="allow_unlisted"):
        hub.download("someone/unlisted", checkpoint_dir=tmp_path)
    assert not (tmp_path / "someone").exists()


def test_allow_unlisted_needs_model_name(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(ValueError, match="model_name"):
        hub.download("someone/unlisted", checkpoint_dir=tmp_path, allow_unlisted=True)
    with pytest.raises(ValueError, match="not a litgpt config name"):
        hub.download("someone/unlisted", checkpoint_dir=tmp_path, allow_unlisted=True, model_name="no-such-config")


def test_listed_model_with_other_config_refused(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(ValueError, match="pythia-14m"):
        hub.download("EleutherAI/pythia-14m", checkpoint_dir=tmp_path, model_name="pythia-31m")


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"HF_HUB_OFFLINE": "1"}, id="HF_HUB_OFFLINE"),
        pytest.param({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": None}, id="connection-refused"),
    ],
)
def test_download_cli_hub_unreachable(tmp_path: Path, env: dict) -> None:
    repo_id = "EleutherAI/pythia-14m"
    ckpt = tmp_path / "checkpoints"
    proc = _run_cli(["download", "--repo_id", repo_id, "--checkpoint_dir", str(ckpt)], tmp_path, **env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: cannot reach the Hugging Face Hub"), err
    assert repo_id in err
    assert (env.get("HF_ENDPOINT") or "https://huggingface.co") in err
    for hint in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "make convert CHECKPOINT=", str(ckpt / repo_id), "pythia-14m"):
        assert hint in err, hint
    assert len(err.splitlines()) == 1
    assert not (ckpt / repo_id / WEIGHTS).exists()


def test_cli_unlisted_in_process(tmp_path: Path, no_hub: None, capsys: pytest.CaptureFixture) -> None:
    # hub.main is what `python -m core.hub` runs; called in-process to save a subprocess start-up.
    assert hub.main(["download", "--repo_id", "someone/unlisted", "--checkpoint_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 'someone/unlisted' is not in") and "--allow_unlisted" in err
    assert "Traceback" not in err


def _unreachable_errors() -> list:
    import httpx
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    refused = requests.exceptions.ConnectionError("Max retries exceeded")
    refused.__context__ = ConnectionRefusedError(111, "Connection refused")
    return [
        pytest.param(OfflineModeIsEnabled("offline mode is enabled"), id="OfflineModeIsEnabled"),
        pytest.param(LocalEntryNotFoundError("cannot find the appropriate snapshot folder"), id="LocalEntryNotFoundError"),
        pytest.param(refused, id="requests.ConnectionError"),
        pytest.param(requests.exceptions.ConnectTimeout("connect timeout"), id="requests.ConnectTimeout"),
        pytest.param(requests.exceptions.ReadTimeout("read timeout"), id="requests.ReadTimeout"),
        pytest.param(httpx.ConnectError("connect failed"), id="httpx.ConnectError"),
        pytest.param(httpx.ReadTimeout("read timeout"), id="httpx.ReadTimeout"),
        pytest.param(TimeoutError("timed out"), id="TimeoutError"),
    ]


@pytest.mark.parametrize("exc", _unreachable_errors())
def test_download_maps_connection_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: Exception) -> None:
    import litgpt.scripts.download

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(litgpt.scripts.download, "download_from_hub", fail)
    with pytest.raises(hub.HubUnreachableError) as err:
        hub.download("EleutherAI/pythia-14m", checkpoint_dir=tmp_path)
    msg = str(err.value)
    assert "EleutherAI/pythia-14m" in msg and "make convert CHECKPOINT=" in msg
    assert err.value.__cause__ is exc
    if exc.__context__ is not None:  # the innermost reason is shown
        assert "Connection refused" in msg


@pytest.mark.parametrize(
    "exc",
    [
        # what litgpt's gated_repo_catcher raises for gated / missing repos: passed on unchanged
        ValueError("https://huggingface.co/x/y requires authentication, please set the `HF_TOKEN=your_token`"),
        ValueError("Repository at https://huggingface.co/api/models/x/y not found."),
        RuntimeError("something else"),
    ],
)
def test_download_passes_other_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: Exception) -> None:
    import litgpt.scripts.download

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(litgpt.scripts.download, "download_from_hub", fail)
    with pytest.raises(type(exc)) as err:
        hub.download("EleutherAI/pythia-14m", checkpoint_dir=tmp_path)
    assert err.value is exc


def test_download_then_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_hf_dir: Path) -> None:
    """download() asks litgpt for the files only, then converts and verifies them itself."""
    import litgpt.scripts.download

    calls = []

    def fake_download_from_hub(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        shutil.copytree(tiny_hf_dir, kwargs["checkpoint_dir"] / repo_id)

    monkeypatch.setattr(litgpt.scripts.download, "download_from_hub", fake_download_from_hub)
    out = hub.download("local/tiny-hf", checkpoint_dir=tmp_path, allow_unlisted=True, model_name="tiny", access_token="t")
    assert out == tmp_path / "local/tiny-hf"
    assert calls == [
        (
            "local/tiny-hf",
            dict(access_token="t", convert_checkpoint=False, checkpoint_dir=tmp_path, model_name="tiny"),
        )
    ]
    assert verify_checkpoint(out).name == "tiny"


def test_download_converted_result_is_verified(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_hf_dir: Path) -> None:
    import litgpt.scripts.download

    def download_without_tokenizer(repo_id, **kwargs):
        out = kwargs["checkpoint_dir"] / repo_id
        shutil.copytree(tiny_hf_dir, out)
        (out / "tokenizer.json").unlink()

    monkeypatch.setattr(litgpt.scripts.download, "download_from_hub", download_without_tokenizer)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        hub.download("local/tiny-hf", checkpoint_dir=tmp_path, allow_unlisted=True, model_name="tiny")


def test_download_tiny_builds_locally(tmp_path: Path, no_hub: None) -> None:
    out = hub.download("tiny", checkpoint_dir=tmp_path / "checkpoints", data_dir=tmp_path / "data")
    assert out == tmp_path / "checkpoints" / "tiny"
    for name in (WEIGHTS, "model_config.yaml", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert (tmp_path / "data" / "train.jsonl").is_file() and (tmp_path / "data" / "test.jsonl").is_file()
    config = verify_checkpoint(out)
    assert config.name == "tiny"
    assert hub.summary(out) == "tiny: 3,475,712 parameters (float32)"


def test_convert_cli_end_to_end(tmp_path: Path, tiny_hf_dir: Path) -> None:
    ckpt = tmp_path / "tiny-hf"
    shutil.copytree(tiny_hf_dir, ckpt)
    proc = _run_cli(["convert", "--checkpoint_dir", str(ckpt), "--model_name", "tiny"], tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint: {ckpt}" in proc.stdout
    assert "tiny: 3,475,712 parameters (float32)" in proc.stdout
    assert verify_checkpoint(ckpt).name == "tiny"


def test_convert_cli_errors_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    for args, expected in [
        (["--checkpoint_dir", str(tmp_path / "absent"), "--model_name", "tiny"], "does not exist"),
        (["--checkpoint_dir", str(tmp_path / "empty"), "--model_name", "tiny"], ".safetensors"),
        (["--checkpoint_dir", str(tmp_path / "empty"), "--model_name", "no-such-config"], "not a litgpt config name"),
        (["--checkpoint_dir", str(tmp_path / "empty")], "config.json: not found; pass --model_name"),
    ]:
        assert hub.main(["convert", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--repo_id", "tiny", "--dtype", "bfloat16"], "error: dtype: the tiny model is built locally in float32 and never converted"),
        (["--repo_id", "mistralai/Mistral-7B-v0.1", "--data_dir", "data/x"], "error: data_dir: only the tiny model writes its train/test splits"),
    ],
)
def test_cli_refuses_an_option_the_download_would_not_apply(tmp_path: Path, no_hub: None, capsys: pytest.CaptureFixture, flags, expected) -> None:
    """Accepted, the tiny model would come in float32 whatever --dtype said; a hub model writes no data splits."""
    assert hub.main(["download", "--checkpoint_dir", str(tmp_path), *flags]) == 1
    assert capsys.readouterr().err.startswith(expected)
    assert not any(tmp_path.iterdir())  # refused before anything was built or fetched
