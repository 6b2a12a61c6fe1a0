"""Download an approved base model from the Hugging Face Hub and convert it to litgpt's format.

This is what ``make download MODEL=<repo id>`` runs (``python -m core.hub download``), and what
``make convert`` runs on Hugging Face files that were copied in by hand (``python -m core.hub
convert``). The work itself is litgpt's (``download_from_hub`` and ``convert_hf_checkpoint``); this
module adds the manifest check, the embedded ``tiny`` model (built locally, no hub), a verification
of the converted checkpoint, and one clear error when the hub cannot be reached.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
from litgpt import GPT, Config

import core.configs  # noqa: F401  (registers our local configs with litgpt's name_to_config)
from core.checkpoints import CheckpointError, load_config, verify_checkpoint, write_source
from core.configs import config_from_name
from core.integrity import load_torch
from core.manifest import UnlistedModelError, lookup
from core.paths import CHECKPOINTS_DIR

TINY = "tiny"
SOCKET_TIMEOUT_S = 60.0  # seconds without a byte from the hub before giving up


class HubUnreachableError(RuntimeError):
    """The Hugging Face Hub could not be reached (offline mode, no network, refused, timed out)."""


def _unreachable_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "no connection to the hub", as huggingface_hub raises them.

    With huggingface_hub 0.36 (requests backend): ``OfflineModeIsEnabled`` when HF_HUB_OFFLINE=1
    (from ``repo_info``), ``requests.ConnectionError`` for refused connections and DNS failures
    (``repo_info`` does not catch them), ``LocalEntryNotFoundError`` from ``snapshot_download``
    (which turns both of those into it when nothing is cached) and ``requests.Timeout``. httpx's
    transport errors cover huggingface_hub 1.x, which uses httpx.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types: list[type[BaseException]] = [
        OfflineModeIsEnabled,
        LocalEntryNotFoundError,
        ConnectionError,  # builtin: refused, reset, aborted
        TimeoutError,
        socket.gaierror,  # DNS
    ]
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _is_unreachable(exc: BaseException) -> bool:
    types = _unreachable_types()
    seen = 0
    while exc is not None and seen < 16:  # the exception and what it was raised from
        if isinstance(exc, types):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def _root_cause(exc: BaseException) -> str:
    """The innermost reason (e.g. "[Errno 111] Connection refused"), on one short line."""
    seen = 0
    # Follow __context__ even where suppressed: litgpt's gated_repo_catcher re-raises with `from None`.
    while seen < 16 and (nxt := exc.__cause__ or exc.__context__):
        exc, seen = nxt, seen + 1
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def unreachable_message(repo_id: str, checkpoint_dir: Path, model_name: str | None, exc: BaseException | None = None) -> str:
    """The one message shown when the hub cannot be reached: what failed, what to check, how to go offline."""
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    if offline:
        reason = "offline mode is enabled (HF_HUB_OFFLINE is set)"
    elif exc is not None:
        reason = _root_cause(exc)
    else:
        reason = "no connection"
    target = Path(checkpoint_dir) / repo_id
    return (
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {repo_id!r}: {reason}. "
        f"Check your network connection, HF_ENDPOINT (now {os.environ.get('HF_ENDPOINT') or 'unset'}) "
        f"and HF_HUB_OFFLINE (now {os.environ.get('HF_HUB_OFFLINE') or 'unset'}). "
        f"To work offline instead, copy the model's Hugging Face files (config.json, the *.safetensors or *.bin "
        f"weights and the tokenizer files) into {target} and run "
        f"`make convert CHECKPOINT={target}" + (f" ARGS='--model_name {model_name}'" if model_name else "") + "` "
        "(.venv/bin/python -m core.hub convert; the litgpt config is read from config.json when not given)."
    )


HF_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def delete_hf_weights(checkpoint_dir: Path) -> int:
    """Remove the Hugging Face weight files once ``lit_model.pth`` holds them (one copy on disk); bytes freed."""
    freed = 0
    for pattern in HF_WEIGHT_PATTERNS:
        for f in Path(checkpoint_dir).glob(pattern):
            if f.is_file() or f.is_symlink():
                freed += f.stat().st_size if f.is_file() else 0
                f.unlink()
    return freed


def _recorded_repo_id(checkpoint_dir: Path, repo_id: str | None) -> str | None:
    """The repo id to record: the one given, else an earlier record's, else ``checkpoints/<org>/<name>``'s."""
    from core.checkpoints import read_source

    if repo_id:
        return repo_id
    if (record := read_source(checkpoint_dir)) is not None:
        return record["repo_id"]
    try:
        return Path(checkpoint_dir).resolve().relative_to(CHECKPOINTS_DIR.resolve()).as_posix()
    except ValueError:
        return None


def convert(
    checkpoint_dir: Path,
    model_name: str | None = None,
    dtype: str | None = None,
    repo_id: str | None = None,
    delete_hf_weights_after: bool = False,
    how: str = "converted",
) -> Config:
    """Convert the Hugging Face files in ``checkpoint_dir`` to litgpt's format and verify the result.

    ``model_name`` (a litgpt config) defaults to the one ``config.json`` describes (``core.hf_config``).
    litgpt's ``convert_hf_checkpoint`` runs in a scratch directory next to ``checkpoint_dir`` (links to
    the HF files); ``lit_model.pth`` and ``model_config.yaml`` are moved in only once they verify, so a
    failed conversion leaves ``checkpoint_dir`` as it was. ``checkpoint_source.json`` records ``repo_id``
    (default: an earlier record's, else the ``checkpoints/<org>/<name>`` the files sit in; none is written
    outside ``checkpoints/`` without one). ``delete_hf_weights_after`` removes the HF weight files once
    the conversion verifies, so the weights are on disk once. Returns the checkpoint's config. Raises
    CheckpointError (missing directory, weights that do not match the config, naming each tensor),
    HFConfigError (no single litgpt config fits ``config.json``) and ValueError (an unknown
    ``model_name``, no weight files).
    """
    import tempfile

    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    from core.checkpoints import CONFIG, WEIGHTS
    from core.hf_config import check_matches, infer_model_name
    from core.integrity import move, record

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(
            f"checkpoint directory {checkpoint_dir} does not exist; put the model's Hugging Face files "
            "(config.json, *.safetensors or *.bin, tokenizer files) there first"
        )
    if model_name is None:
        model_name = infer_model_name(checkpoint_dir)
        print(f"{checkpoint_dir / 'config.json'}: litgpt config {model_name}")
    config = config_from_name(model_name)  # a clear ValueError for unknown names, before litgpt's KeyError-ish one
    check_matches(checkpoint_dir, config)
    with tempfile.TemporaryDirectory(dir=checkpoint_dir.parent, prefix=f".{checkpoint_dir.name}.convert-") as tmp:
        scratch = Path(tmp)
        for f in checkpoint_dir.iterdir():
            if f.name not in (WEIGHTS, CONFIG, f"{WEIGHTS}.sha256"):
                (scratch / f.name).symlink_to(f.resolve())
        convert_hf_checkpoint(scratch, model_name=model_name, dtype=dtype)
        record(scratch / WEIGHTS)  # hashed once, here; every later load checks it
        verify_checkpoint(scratch)
        (scratch / CONFIG).replace(checkpoint_dir / CONFIG)  # the config first: weights next to a stale config never verify
        move(scratch / WEIGHTS, checkpoint_dir / WEIGHTS)
    verified = verify_checkpoint(checkpoint_dir)
    if (recorded := _recorded_repo_id(checkpoint_dir, repo_id)) is not None:
        write_source(checkpoint_dir, recorded, model_name, how)
    else:
        print(f"{checkpoint_dir}: no repo id recorded (pass --repo_id org/name so finetunes of it name their base)")
    if delete_hf_weights_after:
        freed = delete_hf_weights(checkpoint_dir)
        print(f"{checkpoint_dir}: removed the Hugging Face weight files ({freed / 2**30:.2f} GiB); lit_model.pth holds the weights")
    return verified


def refuse_unread(repo_id: str, dtype: str | None, data_dir: Path | None) -> None:
    """The tiny model is built, not downloaded: only it writes data splits, and it is always float32."""
    if repo_id == TINY and dtype is not None:
        raise ValueError(f"dtype: the tiny model is built locally in float32 and never converted, so {dtype!r} would not be applied; drop it")
    if repo_id != TINY and data_dir is not None:
        raise ValueError(f"data_dir: only the tiny model writes its train/test splits; {repo_id} brings none, drop it")


def download(
    repo_id: str,
    checkpoint_dir: Path = CHECKPOINTS_DIR,
    access_token: str | None = None,
    allow_unlisted: bool = False,
    model_name: str | None = None,
    dtype: str | None = None,
    data_dir: Path | None = None,
    delete_hf_weights_after: bool = False,
) -> Path:
    """Download ``repo_id`` into ``checkpoint_dir / repo_id``, convert it, verify it; returns that directory.

    ``repo_id`` must be in the manifest unless ``allow_unlisted`` (then ``model_name``, the litgpt
    config to convert with, is required). ``"tiny"`` is built locally with ``core.tiny.build_tiny``
    (always float32; its data splits go to ``data_dir``, default ``data/generated/tiny``).
    ``checkpoint_source.json`` records ``repo_id``; ``delete_hf_weights_after`` keeps only ``lit_model.pth``.

    Raises UnlistedModelError, HubUnreachableError, ValueError (gated or unknown repo, passed on
    from litgpt with its message) and CheckpointError (the converted result does not verify).
    """
    checkpoint_dir = Path(checkpoint_dir)
    refuse_unread(repo_id, dtype, data_dir)
    try:
        entry_config: str | None = lookup(repo_id).litgpt_config
    except UnlistedModelError:
        if not allow_unlisted:
            raise
        if not model_name:
            raise ValueError(
                f"{repo_id!r} is not in the manifest, so --allow_unlisted also needs --model_name, the litgpt "
                "config to convert it with (e.g. --model_name Mistral-7B-v0.1 for a Mistral-7B finetune)"
            ) from None
        entry_config = None
    if entry_config is not None and model_name is not None and model_name != entry_config:
        raise ValueError(f"{repo_id!r} is listed with litgpt config {entry_config!r}, not {model_name!r}")
    model_name = model_name or entry_config
    out_dir = checkpoint_dir / repo_id

    if repo_id == TINY:
        from core.tiny import TINY_DATA_DIR, build_tiny

        build_tiny(out_dir, data_dir if data_dir is not None else TINY_DATA_DIR)
        verify_checkpoint(out_dir)
        return out_dir

    config_from_name(model_name)  # fail on an unknown config before downloading gigabytes
    from litgpt.scripts.download import download_from_hub

    # litgpt's repo_info call has no timeout: a hub that accepts the connection but never answers
    # would hang forever. A socket default bounds every read (a stalled download included).
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(SOCKET_TIMEOUT_S)
    try:
        download_from_hub(
            repo_id,
            access_token=access_token if access_token is not None else os.getenv("HF_TOKEN"),
            convert_checkpoint=False,
            checkpoint_dir=checkpoint_dir,
            model_name=model_name,
        )
    except Exception as e:
        if _is_unreachable(e):
            raise HubUnreachableError(unreachable_message(repo_id, checkpoint_dir, model_name, e)) from e
        raise
    finally:
        socket.setdefaulttimeout(previous_timeout)
    convert(out_dir, model_name, dtype, repo_id=repo_id, delete_hf_weights_after=delete_hf_weights_after, how="downloaded")
    return out_dir


def summary(checkpoint_dir: Path) -> str:
    """One line: config name, parameter count and weight dtype of a converted checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(config).parameters())
    state = load_torch(checkpoint_dir / "lit_model.pth")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.get("model", state).values()})
    return f"{config.name}: {n_params:,} parameters ({'/'.join(dtypes)})"


# ----------------------------------------------------------------------------- CLI


def download_cli(
    *,
    repo_id: str,
    checkpoint_dir: Path = CHECKPOINTS_DIR,
    access_token: str | None = None,
    allow_unlisted: bool = False,
    model_name: str | None = None,
    dtype: str | None = None,
    data_dir: Path | None = None,
    delete_hf_weights: bool = False,
) -> None:
    """Download an approved base model from the Hugging Face Hub and convert it to litgpt's format.

    Args:
        repo_id: Hugging Face repo id as listed in checkpoints_manifest.json (`make models`), or "tiny"
            for the embedded test model (built locally, no download).
        checkpoint_dir: parent directory; the checkpoint goes to <checkpoint_dir>/<repo_id>.
        access_token: Hugging Face token for gated models (default: the HF_TOKEN environment variable).
        allow_unlisted: download a model that is not in the manifest (needs --model_name). The challenge
            only accepts approved base models.
        model_name: litgpt config to convert with (default: the manifest's).
        dtype: convert the weights to this dtype (e.g. bfloat16); default: keep the downloaded dtype. Not for "tiny"
            (built in float32).
        data_dir: for "tiny" only (refused for other models): where its train/test splits go (default data/generated/tiny).
        delete_hf_weights: once the converted checkpoint verifies, delete the downloaded *.safetensors /
            *.bin files (lit_model.pth holds the weights; the eval image keeps one copy).
    """
    out = download(repo_id, checkpoint_dir, access_token, allow_unlisted, model_name, dtype, data_dir, delete_hf_weights)
    print(f"checkpoint: {out}")
    print(summary(out))


def convert_cli(
    *,
    checkpoint_dir: Path,
    model_name: str | None = None,
    dtype: str | None = None,
    repo_id: str | None = None,
    delete_hf_weights: bool = False,
) -> None:
    """Convert Hugging Face files already in a directory (no download) to litgpt's format, then verify.

    Args:
        checkpoint_dir: directory holding config.json, *.safetensors or *.bin and the tokenizer files;
            lit_model.pth and model_config.yaml are written next to them, only if the conversion verifies.
        model_name: litgpt config name (see checkpoints_manifest.json's litgpt_config), e.g. Mistral-7B-v0.1;
            default: the one whose shapes config.json describes.
        dtype: convert the weights to this dtype (e.g. bfloat16); default: keep the files' dtype.
        repo_id: the Hugging Face repo id the files came from, recorded in checkpoint_source.json (finetunes
            name their base from it); default: checkpoints/<org>/<name>'s path, where the files sit there.
        delete_hf_weights: once the conversion verifies, delete the *.safetensors / *.bin files.
    """
    convert(checkpoint_dir, model_name, dtype, repo_id=repo_id, delete_hf_weights_after=delete_hf_weights)
    print(f"checkpoint: {checkpoint_dir}")
    print(summary(checkpoint_dir))


def main(args: list[str] | None = None) -> int:
    """``python -m core.hub {download,convert} ...``; expected failures print ``error: ...`` and return 1.

    The CLI functions take keyword-only arguments so that jsonargparse makes every argument a
    ``--flag`` (``--repo_id X``, ``--checkpoint_dir D --model_name N``), required ones included.
    """
    from core.cli import run_cli

    try:
        run_cli({"download": download_cli, "convert": convert_cli}, args=sys.argv[1:] if args is None else args)
    except SystemExit as e:  # run_cli printed the error line; jsonargparse its usage
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
