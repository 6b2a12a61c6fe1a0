"""Loading every source through ``datasets.load_dataset``, with the hub probed once: when it cannot be
reached, only the local cache is read, and every source that is not there is listed in one error with
the offline alternative.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from finetune.data import DataError
from finetune.recipes.schema import Recipe, Source, _flat_files, _hub_dataset, _packaged_builders

HUB_PROBE_TIMEOUT_S = 5.0  # one HEAD request to the hub endpoint before any hub source is loaded


def _needs_hub(s: Source) -> bool:
    remote = any("://" in f for f in _flat_files(s.data_files))
    local = s.dataset in _packaged_builders() or Path(s.dataset).exists()
    return remote or not local


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_offline_by_env() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD to the hub endpoint: any HTTP answer means reachable."""
    import requests

    try:
        requests.head(_hub_endpoint(), timeout=timeout, allow_redirects=False)
        return True
    except requests.RequestException:
        return False


@contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """While on: datasets and huggingface_hub act as with HF_HUB_OFFLINE=1 (local cache only, no retries)."""
    if not on:
        yield
        return
    import datasets
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE = True
    reset_sessions()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE = saved
        reset_sessions()


def _is_unreachable(e: BaseException) -> bool:
    import requests

    return isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def _describe(s: Source) -> str:
    extra = f", config {s.config}" if s.config else ""
    extra += f", split {s.split}" if s.split != "train" else ""
    return f"{s.name} ({s.dataset}{extra})"


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of an error, plus its innermost cause (datasets wraps parse errors)."""

    def line(x: BaseException) -> str:
        text = str(x).strip().splitlines()
        return f"{type(x).__name__}: {text[0] if text else ''}"

    cause = e
    while cause.__cause__ is not None or (cause.__context__ is not None and not cause.__suppress_context__):
        cause = cause.__cause__ or cause.__context__
    return line(e) if cause is e else f"{line(e)} (caused by {line(cause)})"


def _resolve_revision(dataset: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """The hub's current commit of a dataset, or None when it cannot be asked."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(dataset, timeout=timeout).sha
    except Exception:  # noqa: BLE001 - unknown is recorded as such (revision_resolved: null)
        return None


def _load_all(recipe: Recipe, probe_timeout: float, revisions: Mapping[str, str | None] | None = None) -> tuple[list, list]:
    """(``datasets.Dataset`` per source, the commit each was loaded at or None); one ``DataError`` listing every failure.

    ``revisions``: commits by source name that win over the recipe's (a data card's ``revision_resolved``).
    """
    import datasets

    missing = [
        f"  - {_describe(s)}: data file not found: {f}"
        for s in recipe.sources
        for f in _flat_files(s.data_files)
        if "://" not in f and not glob.has_magic(f) and not Path(f).exists()
    ]
    if missing:
        raise DataError(f"recipe {recipe.name!r}: local data files are missing:\n" + "\n".join(missing))
    offline_env = _hub_offline_by_env()
    hub_down = offline_env or (any(_needs_hub(s) for s in recipe.sources) and not _hub_reachable(probe_timeout))
    loaded, unreachable, failed = [], [], []
    with _hub_offline(hub_down and not offline_env):
        resolved: list[str | None] = []
        for s in recipe.sources:
            rev = (revisions or {}).get(s.name) or s.revision
            if rev is None and _hub_dataset(s.dataset) and not hub_down:
                rev = _resolve_revision(s.dataset, probe_timeout)  # unpinned: load, and record, exactly one commit
            resolved.append(rev)
            try:
                ds = datasets.load_dataset(s.dataset, s.config, split=s.split, data_files=s.data_files, revision=rev)
            except Exception as e:  # noqa: BLE001 - every failure is reported, per source, below
                offline_miss = hub_down and _needs_hub(s) and isinstance(e, FileNotFoundError)
                (unreachable if _is_unreachable(e) or offline_miss else failed).append((s, e))
                loaded.append(None)
                continue
            if not isinstance(ds, datasets.Dataset):
                failed.append((s, TypeError(f"expected one split, got {type(ds).__name__}")))
            loaded.append(ds)
    if not unreachable and not failed:
        return loaded, resolved
    lines = [f"recipe {recipe.name!r}: {len(unreachable) + len(failed)} of {len(recipe.sources)} sources could not be loaded."]
    if unreachable:
        why = "offline mode is on: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE" if offline_env else f"no answer from {_hub_endpoint()}"
        lines.append(f"The Hugging Face Hub is unreachable ({why}); these sources are not in the local datasets cache:")
        for s, _ in unreachable:
            args = ", ".join(repr(a) for a in (s.dataset, s.config) if a) + f", split={s.split!r}"
            args += f", revision={s.revision!r}" if s.revision else ""
            lines.append(f"  - {_describe(s)}")
            lines.append(f"      elsewhere: datasets.load_dataset({args}).to_json('{s.name}.jsonl')")
        lines += [
            "Offline alternative: download the data on a machine that reaches the hub (the lines above), copy the",
            "files here, and point each source at its file (relative paths resolve against the recipe's folder):",
            "    dataset: json",
            "    data_files: <name>.jsonl",
            "    split: train          # a data file holds one split",
            "and delete its config and revision; fields, filter and format stay as they are. Or copy a filled",
            "datasets cache from such a machine and set HF_DATASETS_CACHE to it.",
        ]
    if failed:
        lines.append("Other failures:")
        lines += [f"  - {_describe(s)}: {_first_line(e)}" for s, e in failed]
    raise DataError("\n".join(lines))
