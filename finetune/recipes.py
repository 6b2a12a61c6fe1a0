"""Data recipes: YAML files naming open datasets, built into one training set plus a data card.

    python -m finetune.recipes --recipe data/recipes/rtx4090_mix.yaml --out_dir out/data/rtx4090_mix

writes ``train.jsonl`` (rows ``{instruction, input, output, source}`` or ``{messages, source}``, what ``finetune.data.load_rows``
reads) and ``data_card.json`` (every source with its license, counts at each stage, sha256 of each local
data file, and ``rows_sha256``: the sha256 of ``train.jsonl`` itself, so the card proves exactly what was
trained on). Every source is loaded through Hugging Face ``datasets.load_dataset`` (hub ids, or builders
such as ``json``/``csv``/``parquet`` over local files).

Recipe schema (YAML mapping; unknown keys are refused, errors name the file and the field)
-----------------------------------------------------------------------------------------
name              str, required. Names the recipe (and the default output folder).
description       str, optional free text.
template          prompt style the rows are rendered with for length filtering, and the one to train
                  and serve with (default ``qa``; any ``core.prompts`` / litgpt style name).
seed              int (default 1337): caps, fractional weights and the final shuffle derive from it.
dedupe            bool (default true): drop rows whose instruction+input+output (a conversation: every
                  turn; whitespace-collapsed) equal an earlier row's (the first kept, sources in recipe order). Repeats made by a
                  source's own ``weight`` are not duplicates.
max_chars         int, optional: drop rows whose rendered prompt + output is longer (counted); a
                  conversation counts the text of all its turns (its chat template is chosen at training).
max_tokens        int, optional: the same in tokens; ``build(count_tokens=...)`` must be given a
                  ``str -> int`` counter (called on the rendered prompt and on the output, summed).
min_output_chars  int (default 0): drop rows whose output (a conversation: its assistant turns together,
                  stripped) is shorter (counted).
x-...             top-level keys starting with ``x-`` are ignored: a place for YAML anchors
                  (``x-bigbench: &bigbench {...}``, then ``- {<<: *bigbench, name: ..., config: ...}``).
sources           non-empty list of mappings:
  name              str, required, unique: rows carry it as ``source``.
  dataset           str, required: a hub id (``databricks/databricks-dolly-15k``) or a ``datasets``
                    builder (``json``, ``csv``, ``parquet``, ...) used with ``data_files``.
  config            str, optional: the dataset's configuration (``main`` for gsm8k).
  split             str (default ``train``); slicing such as ``train[:10%]`` is passed through.
  data_files        str, list of str, or {split: str | list}: local files (relative paths resolve
                    against the YAML file's folder; globs allowed) or URLs (``hf://...``).
  revision          str, required for a hub dataset: the 40-hex commit sha to load, or ``"unpinned: <why>"``
                    (the build then resolves the hub's current commit, loads exactly that one and records it in
                    the card as ``revision_resolved``, which ``submission.reproduce data`` loads again). A
                    branch or tag is refused: it moves. ``hf://`` data files pin with ``@<sha>`` in the URL.
  license           str, required: the data's license as you understand it (recorded in the card).
  note              str, optional: provenance or license caveats (recorded in the card).
  format            ``fields`` (default), ``multiple_choice`` or ``oasst`` (see below).
  fields            mapping from our keys to the dataset's columns (format ``fields``), one of:
                      instruction, output [, input]   (Alpaca shape)
                      prompt, response
                      messages                        (list of {role, content} / {from, value}
                                                       turns, or a plain list of strings that
                                                       alternate user, assistant; every turn is
                                                       kept, system turns too, and trained with
                                                       a chat template: --data.chat_template)
                    A value is a column, a path into one (``conversations[0]``, ``train.question``),
                    a template with ``{column}`` placeholders (``"{article}\\n\\nSummarize it."``;
                    ``{{``/``}}`` for literal braces), or a list of those joined with a blank line
                    (empty parts skipped). Lists in cells are joined with newlines; numbers become text.
  weight            float > 0 (default 1): 2 repeats the source twice, 0.5 keeps a seeded random half,
                    1.5 = once + a seeded half.
  max_rows          int, optional: seeded random cap (original order kept), applied before weighting.
  filter            {column: value}, optional: keep rows whose column equals the value (a list of
                    values: any of them; ``{file: path}``: the values a text file lists, one a line, ``#``
                    comments skipped), e.g. ``{subject: high_school_physics}``. Matching no row is
                    an error (the message shows values that do occur).
  force_eval_split  bool (default false): allow a source the guard refuses (``finetune.eval_guard``; recorded in the card).
  skip_bad_rows     bool (default false): drop rows that fail normalization instead of raising
                    (counted, first few reasons recorded in the card).

Formats: ``multiple_choice`` takes ``fields: {question, choices, answer}`` (choices: a list column;
answer: an index, the choice's text, or a letter) and renders ``question\\nA. ...\\nB. ...`` with the
letter as output, the shape of HELM's multiple-choice prompts. ``oasst`` reads OpenAssistant message
trees (``message_id``, ``parent_id``, ``role``, ``text``, ``rank``; ``deleted``, ``review_result`` and
``synthetic`` drop messages when present) and pairs each root prompt with its top-ranked (rank 0)
assistant reply; ``filter`` applies to the messages before pairing (e.g. ``{lang: en}``); it takes no
``fields``.

Pipeline of ``build``: per source load -> filter -> format -> cap -> map fields -> normalize
(``finetune.data.normalize_row``; a bad row raises ``DataError`` naming ``<source> row <i>``, the row's
index in the split) -> min_output_chars -> weight; then across sources dedupe -> max_chars/max_tokens ->
seeded shuffle. Sources of data the challenge evaluates (``finetune.eval_guard``: derived from the HELM
confs in ``data/helm/``, matched by dataset id and mirrors, by ``hf://`` data files and by name) are refused by
``load_recipe`` and by ``build`` before anything is loaded. When the hub cannot be reached (no network,
``HF_DATASETS_OFFLINE=1``/``HF_HUB_OFFLINE=1``, a dead ``HF_ENDPOINT``) sources are read from the local
``datasets`` cache only, and every source that is not there is listed in one ``DataError`` with the
offline alternative (``dataset: json`` + ``data_files``).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune import eval_guard
from finetune.data import DataError, Row, normalize_row

FORMATS = ("fields", "multiple_choice", "oasst")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
HUB_PROBE_TIMEOUT_S = 5.0  # one HEAD request to the hub endpoint before any hub source is loaded
BAD_ROWS_RECORDED = 5  # reasons of skipped rows kept in the card, per source


# ----------------------------------------------------------------------------- eval splits


def eval_split_reason(dataset: str, config: str | None, split: str, data_files=None, base: Path | None = None) -> str | None:
    """Why a source is data the challenge evaluates on (``finetune.eval_guard``, derived from the shipped HELM confs), or None."""
    found = eval_guard.reasons(dataset, config, split, data_files, base)
    return "; ".join(found) if found else None


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Source:
    name: str
    dataset: str
    license: str
    fields: dict[str, str | list[str]] = field(default_factory=dict)
    config: str | None = None
    split: str = "train"
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    revision: str | None = None
    revision_unpinned: str | None = None  # why the recipe pins no commit (from ``revision: "unpinned: ..."``)
    weight: float = 1.0
    max_rows: int | None = None
    filter: dict[str, Any] = field(default_factory=dict)
    force_eval_split: bool = False
    format: str = "fields"
    skip_bad_rows: bool = False
    note: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: list[Source]
    template: str = "qa"
    seed: int = 1337
    dedupe: bool = True
    max_chars: int | None = None
    max_tokens: int | None = None
    min_output_chars: int = 0
    description: str = ""
    path: Path | None = None  # the YAML file it was read from


RECIPE_KEYS = {f.name for f in dataclasses.fields(Recipe)} - {"path"}
SOURCE_KEYS = {f.name for f in dataclasses.fields(Source)} - {"revision_unpinned"}
FIELD_SHAPES = "instruction/output[/input], prompt/response or messages"
_PATH = re.compile(r"[^.\[\]{}]+(?:\.[^.\[\]{}]+|\[-?\d+\])*")
_PATH_PART = re.compile(r"\.?([^.\[\]]+)|\[(-?\d+)\]")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def _unknown(keys, known: set[str], where: str) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise DataError(f"{where}: {message}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_str(raw: dict, key: str, where: str) -> str | None:
    value = raw.get(key)
    hint = " (quote it in the YAML)" if isinstance(value, (int, float)) else ""
    _check(value is None or (isinstance(value, str) and value.strip() != ""), f"{where}.{key}", f"must be a non-empty string, got {value!r}{hint}")
    return value


def _column_spec(value: object, where: str, allow_template: bool = True) -> None:
    """A field value: column path, template, or (top level only) a list of those."""
    if isinstance(value, list):
        _check(len(value) > 0, where, "an empty list names no column")
        for i, v in enumerate(value):
            _check(not isinstance(v, list), f"{where}[{i}]", "lists do not nest")
            _column_spec(v, f"{where}[{i}]", allow_template)
        return
    _check(isinstance(value, str) and value.strip() != "", where, f"must be a column name (or a list of them), got {value!r}")
    if "{" in value or "}" in value:
        _check(allow_template, where, "a template is not allowed here; name one column")
        for m in _PLACEHOLDER.finditer(value):
            if m.group(0) not in ("{{", "}}"):
                _check(bool(_PATH.fullmatch(m.group(1).strip())), where, f"bad placeholder {m.group(0)!r} in template")
    else:
        _check(bool(_PATH.fullmatch(value.strip())), where, f"bad column path {value!r} (use col, col[0] or col.key)")


def _parse_fields(raw: object, fmt: str, where: str) -> dict[str, str | list[str]]:
    if fmt == "oasst":
        _check(raw in (None, {}), where, "format oasst pairs prompts and replies itself; remove fields")
        return {}
    _check(raw is not None, where, "required")
    _check(isinstance(raw, dict) and raw, where, f"must map our keys to the dataset's columns, got {raw!r}")
    keys = set(raw)
    if fmt == "multiple_choice":
        _unknown(keys, {"question", "choices", "answer"}, where)
        for key in ("question", "choices", "answer"):
            _check(key in raw, f"{where}.{key}", "required for format multiple_choice")
        _column_spec(raw["question"], f"{where}.question")
        _column_spec(raw["choices"], f"{where}.choices", allow_template=False)
        _column_spec(raw["answer"], f"{where}.answer", allow_template=False)
        _check(not isinstance(raw["choices"], list) and not isinstance(raw["answer"], list), where, "choices and answer name one column each")
        return dict(raw)
    _unknown(keys, {"instruction", "input", "output", "prompt", "response", "messages"}, where)
    ok = ({"instruction", "output"} <= keys <= {"instruction", "input", "output"}) or keys == {"prompt", "response"} or keys == {"messages"}
    _check(ok, where, f"keys {sorted(keys)} are not one shape: {FIELD_SHAPES}")
    for key, value in raw.items():
        _column_spec(value, f"{where}.{key}", allow_template=key != "messages")
        if key == "messages":
            _check(isinstance(value, str), f"{where}.messages", "name one column holding the turns")
    return dict(raw)


def _resolve_data_files(value: object, base: Path, where: str):
    def one(p: object, w: str) -> str:
        _check(isinstance(p, str) and p.strip() != "", w, f"must be a path or URL, got {p!r}")
        if "://" in p:
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    def many(v: object, w: str) -> str | list[str]:
        if isinstance(v, list):
            _check(len(v) > 0, w, "an empty list names no file")
            return [one(p, f"{w}[{i}]") for i, p in enumerate(v)]
        return one(v, w)

    if value is None:
        return None
    if isinstance(value, dict):
        _check(len(value) > 0, where, "an empty mapping names no file")
        return {str(k): many(v, f"{where}.{k}") for k, v in value.items()}
    return many(value, where)


_SHA = re.compile(r"[0-9a-f]{40}")
UNPINNED = "unpinned:"


def _hub_dataset(dataset: str) -> bool:
    """A hub id (``org/name``), as opposed to a ``datasets`` builder (``json``) or a local folder."""
    return dataset not in _packaged_builders() and not Path(dataset).exists()


def _parse_revision(revision: str | None, dataset: str, data_files, where: str) -> tuple[str | None, str | None]:
    """(commit sha or None, why unpinned or None); a hub source must say one or the other."""
    how = f'a 40-hex commit sha (the "History" tab of the dataset on the hub), or "{UNPINNED} <why>"'
    if revision is not None and revision.strip().lower().startswith(UNPINNED):
        why = revision.strip()[len(UNPINNED) :].strip()
        _check(bool(why), where, f'"{UNPINNED}" needs a reason after it, e.g. "{UNPINNED} no hub access when written"')
        return None, why
    if revision is not None:
        _check(bool(_SHA.fullmatch(revision.strip())), where, f"{revision!r} is not a commit: give {how} (a branch or tag moves)")
        return revision.strip(), None
    if _hub_dataset(dataset):
        raise DataError(f"{where}: required for hub dataset {dataset!r}: {how}")
    remote = [f for f in _flat_files(data_files) if f.startswith("hf://") and not re.search(r"@[0-9a-f]{40}(/|$)", f)]
    _check(not remote, where, f"required for data files on the hub without @<sha> ({remote[0] if remote else ''}): {how}")
    return None, None


def _filter_file(want: dict, base: Path, where: str) -> list[str]:
    """``{file: path}``: the values listed in a text file, one a line (blank lines and ``#`` comments skipped)."""
    _check(set(want) == {"file"} and isinstance(want["file"], str), where, f"a mapping must be {{file: <path>}} (one value a line), got {want!r}")
    path = Path(want["file"]).expanduser()
    path = path if path.is_absolute() else (base / path).resolve()
    _check(path.is_file(), f"{where}.file", f"file not found: {path}")
    values = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    _check(bool(values), f"{where}.file", f"{path} lists no value")
    return values


def _parse_source(raw: object, i: int, base: Path, file: str) -> Source:
    where = f"{file}: sources[{i}]"
    _check(isinstance(raw, dict), where, f"must be a mapping, got {type(raw).__name__}")
    _unknown(raw, SOURCE_KEYS, where)
    name = raw.get("name")
    _check(isinstance(name, str) and name.strip() != "", f"{where}.name", "required (a non-empty string)")
    dataset = raw.get("dataset")
    _check(isinstance(dataset, str) and dataset.strip() != "", f"{where}.dataset", "required (a hub id, or a builder such as json with data_files)")
    license_ = raw.get("license")
    _check(license_ is not None, f"{where}.license", "required")
    _check(isinstance(license_, str) and license_.strip() != "", f"{where}.license", f"must be a non-empty string, got {license_!r}")
    config, revision = _opt_str(raw, "config", where), _opt_str(raw, "revision", where)
    data_files = _resolve_data_files(raw.get("data_files"), base, f"{where}.data_files")
    revision, unpinned = _parse_revision(revision, dataset, data_files, f"{where}.revision")
    split = raw.get("split", "train")
    _check(isinstance(split, str) and split.strip() != "", f"{where}.split", f"must be a non-empty string, got {split!r}")
    fmt = raw.get("format", "fields")
    _check(fmt in FORMATS, f"{where}.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    fields = _parse_fields(raw.get("fields"), fmt, f"{where}.fields")
    weight = raw.get("weight", 1)
    number = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
    _check(number and weight > 0, f"{where}.weight", f"must be a number > 0, got {weight!r}")
    max_rows = raw.get("max_rows")
    _check(max_rows is None or (_is_int(max_rows) and max_rows > 0), f"{where}.max_rows", f"must be a positive integer, got {max_rows!r}")
    filt = raw.get("filter") or {}
    _check(isinstance(filt, dict), f"{where}.filter", f"must map columns to values, got {filt!r}")
    filt = {col: _filter_file(want, base, f"{where}.filter.{col}") if isinstance(want, dict) else want for col, want in filt.items()}
    for col, want in filt.items():
        scalar = (str, int, float, bool, type(None))
        ok = isinstance(want, scalar) or (isinstance(want, list) and want and all(isinstance(w, scalar) for w in want))
        _check(ok, f"{where}.filter.{col}", f"must be a value or a non-empty list of values, got {want!r}")
    flags = {}
    for key in ("force_eval_split", "skip_bad_rows"):
        flags[key] = raw.get(key, False)
        _check(isinstance(flags[key], bool), f"{where}.{key}", f"must be true or false, got {flags[key]!r}")
    note = raw.get("note", "")
    _check(isinstance(note, str), f"{where}.note", "must be a string")
    return Source(
        name=name,
        dataset=dataset,
        license=license_,
        fields=fields,
        config=config,
        split=split,
        data_files=data_files,
        revision=revision,
        revision_unpinned=unpinned,
        weight=float(weight),
        max_rows=max_rows,
        filter=dict(filt),
        format=fmt,
        note=note,
        **flags,
    )


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe YAML; errors name the file and the field (``f: sources[2].license: required``)."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise DataError(f"{file}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{file}: invalid YAML: {e}") from None
    _check(isinstance(raw, dict), file, "a recipe must be a YAML mapping")
    _unknown([k for k in raw if not str(k).startswith("x-")], RECIPE_KEYS, file)
    name = raw.get("name")
    _check(isinstance(name, str) and name.strip() != "", f"{file}: name", "required (a non-empty string)")
    template = raw.get("template", "qa")
    _check(isinstance(template, str) and template.strip() != "", f"{file}: template", f"must be a prompt style name, got {template!r}")
    try:
        from core.prompts import get_style

        get_style(template)
    except ValueError as e:
        raise DataError(f"{file}: template: {e}") from None
    seed = raw.get("seed", 1337)
    _check(_is_int(seed), f"{file}: seed", f"must be an integer, got {seed!r}")
    dedupe = raw.get("dedupe", True)
    _check(isinstance(dedupe, bool), f"{file}: dedupe", f"must be true or false, got {dedupe!r}")
    for key in ("max_chars", "max_tokens"):
        v = raw.get(key)
        _check(v is None or (_is_int(v) and v > 0), f"{file}: {key}", f"must be a positive integer, got {v!r}")
    min_out = raw.get("min_output_chars", 0)
    _check(_is_int(min_out) and min_out >= 0, f"{file}: min_output_chars", f"must be an integer >= 0, got {min_out!r}")
    description = raw.get("description", "")
    _check(isinstance(description, str), f"{file}: description", "must be a string")
    sources_raw = raw.get("sources")
    _check(sources_raw is not None, f"{file}: sources", "required (a list of sources)")
    _check(isinstance(sources_raw, list) and sources_raw, f"{file}: sources", "must be a non-empty list of sources")
    sources = [_parse_source(s, i, path.parent, file) for i, s in enumerate(sources_raw)]
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        _check(s.name not in seen, f"{file}: sources[{i}].name", f"{s.name!r} is already the name of sources[{seen.get(s.name)}]")
        seen[s.name] = i
    recipe = Recipe(
        name=name,
        sources=sources,
        template=template,
        seed=seed,
        dedupe=dedupe,
        max_chars=raw.get("max_chars"),
        max_tokens=raw.get("max_tokens"),
        min_output_chars=min_out,
        description=description,
        path=path,
    )
    check_eval_splits(recipe)
    return recipe


def check_eval_splits(recipe: Recipe) -> None:
    """Raise one ``DataError`` naming every source on an evaluation split that is not forced."""
    bad = []
    base = recipe.path.parent if recipe.path else None
    for i, s in enumerate(recipe.sources):
        reason = eval_split_reason(s.dataset, s.config, s.split, s.data_files, base)
        if reason and not s.force_eval_split:
            bad.append(f"  - sources[{i}] {s.name!r}: {reason}")
    if bad:
        where = f"{recipe.path}: " if recipe.path else f"recipe {recipe.name!r}: "
        raise DataError(
            f"{where}refusing to train on evaluation data (the score would measure memorization):\n"
            + "\n".join(bad)
            + "\nUse another split (e.g. train), or, if you really mean it, set `force_eval_split: true` on the source "
            "(the data card then records forced_eval_split: true)."
        )


# ----------------------------------------------------------------------------- loading


def _packaged_builders() -> set[str]:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return set(_PACKAGED_DATASETS_MODULES)


def _flat_files(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _flat_files(v)]
    return list(data_files)


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


# ----------------------------------------------------------------------------- rows


def _cell(row: Mapping[str, Any], path: str) -> Any:
    value: Any = row
    for m in _PATH_PART.finditer(path.strip()):
        key, index = m.group(1), m.group(2)
        if key is not None:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        else:
            if not isinstance(value, (list, tuple)) or not -len(value) <= int(index) < len(value):
                return None
            value = value[int(index)]
    return value


def _text(value: Any) -> Any:
    """A cell as text: strings as they are, numbers as text, lists of scalars joined by newlines."""
    if isinstance(value, (str, type(None))):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return "\n".join(str(v) for v in value)
    return value  # anything else: left for normalize_row to reject with its value shown


def _render(spec: str | list[str], row: Mapping[str, Any]) -> Any:
    if isinstance(spec, list):
        parts = [_render(s, row) for s in spec]
        if any(not isinstance(p, str) for p in parts):
            return next(p for p in parts if not isinstance(p, str))
        return "\n\n".join(p for p in parts if p.strip())
    if "{" not in spec and "}" not in spec:
        return _text(_cell(row, spec))
    missing = []

    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        value = _text(_cell(row, m.group(1)))
        if not isinstance(value, str):
            missing.append(value)
            return ""
        return value

    out = _PLACEHOLDER.sub(sub, spec)
    return missing[0] if missing else out


_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _messages(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [{"role": ("user", "assistant")[i % 2], "content": v} for i, v in enumerate(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value):
        out = []
        for turn in value:
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            out.append({"role": _ROLES.get(str(role).lower(), role), "content": content})
        return out
    return value


def _map_fields(s: Source, row: Mapping[str, Any], where: str) -> dict[str, Any]:
    if s.format == "multiple_choice":
        choices = _cell(row, s.fields["choices"])
        answer = _cell(row, s.fields["answer"])
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices) or len(choices) > len(LETTERS):
            raise DataError(f"{where}: choices must be a list of 1-{len(LETTERS)} strings, got {choices!r}")
        index = None
        if _is_int(answer):
            index = answer
        elif isinstance(answer, str) and answer in choices:
            index = list(choices).index(answer)
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
            index = LETTERS.index(answer.strip().upper())
        elif isinstance(answer, str) and answer.strip().isdigit():
            index = int(answer.strip())
        if index is None or not 0 <= index < len(choices):
            raise DataError(f"{where}: answer {answer!r} does not pick one of the {len(choices)} choices")
        question = _render(s.fields["question"], row)
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        instruction = f"{question}\n{options}" if isinstance(question, str) else question
        return {"instruction": instruction, "input": "", "output": LETTERS[index]}
    if "messages" in s.fields:
        return {"messages": _messages(_cell(row, s.fields["messages"]))}
    return {key: _render(spec, row) for key, spec in s.fields.items()}


def _oasst_pairs(ds, idx: list[int], where: str) -> list[tuple[int, dict[str, Any]]]:
    needed = ["message_id", "parent_id", "role", "text", "rank"]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: format oasst needs columns {needed}; missing {missing} (columns: {ds.column_names})")
    extra = [c for c in ("deleted", "review_result", "synthetic") if c in ds.column_names]
    cols = {c: list(ds[c]) for c in needed + extra}
    keep = set(idx)
    ok = [
        i in keep
        and not ("deleted" in cols and cols["deleted"][i] is True)
        and not ("review_result" in cols and cols["review_result"][i] is False)
        and not ("synthetic" in cols and cols["synthetic"][i] is True)  # model-written messages
        for i in range(len(ds))
    ]
    roots = {cols["message_id"][i]: i for i in range(len(ds)) if ok[i] and cols["role"][i] == "prompter" and cols["parent_id"][i] is None}
    pairs = []
    for i in range(len(ds)):
        parent = cols["parent_id"][i]
        if ok[i] and cols["role"][i] == "assistant" and cols["rank"][i] == 0 and parent in roots:
            pairs.append((i, {"instruction": cols["text"][roots[parent]], "input": "", "output": cols["text"][i]}))
    return pairs


def _matches(value: Any, want: Any) -> bool:
    wants = want if isinstance(want, list) else [want]
    return any(value == w or (isinstance(w, (int, float)) and not isinstance(w, bool) and isinstance(value, str) and value == str(w)) for w in wants)


def _filter_indices(s: Source, ds) -> list[int]:
    if not s.filter:
        return list(range(len(ds)))
    for col in s.filter:
        if col not in ds.column_names:
            raise DataError(f"source {s.name!r}: filter column {col!r} is not in {s.dataset} (columns: {ds.column_names})")
    columns = {col: list(ds[col]) for col in s.filter}
    idx = [i for i in range(len(ds)) if all(_matches(columns[c][i], w) for c, w in s.filter.items())]
    if not idx:
        seen = {c: sorted({repr(v) for v in columns[c]})[:12] for c in s.filter}
        raise DataError(f"source {s.name!r}: filter {s.filter} matched no row of {s.dataset}; values seen: {seen}")
    return idx


def _unmatched_filter_values(s: Source, ds) -> dict[str, list]:
    """For each filter column given a list: the listed values that no row of the dataset holds."""
    out = {}
    for col, want in s.filter.items():
        if isinstance(want, list) and len(want) > 1:
            seen = {str(v) for v in ds.unique(col)} if hasattr(ds, "unique") else {str(v) for v in ds[col]}
            if missing := [w for w in want if str(w) not in seen]:
                out[col] = missing
    return out


def _check_columns(s: Source, ds) -> None:
    for path in _all_paths(s):
        top = _PATH_PART.match(path.strip()).group(1)
        if top not in ds.column_names:
            raise DataError(f"source {s.name!r}: fields name column {top!r}, which {s.dataset} does not have (columns: {ds.column_names})")


def _seeded(recipe: Recipe, s: Source, what: str) -> random.Random:
    return random.Random(f"{recipe.seed}:{s.name}:{what}")


def _short_output(row: Mapping[str, Any], min_chars: int) -> bool:
    """Whether the row's output (a conversation's assistant turns together) is under ``min_chars``."""
    if isinstance(row.get("messages"), list):
        turns = [t for t in row["messages"] if isinstance(t, Mapping) and t.get("role") == "assistant"]
        out = "".join(t["content"] for t in turns if isinstance(t.get("content"), str)) if turns else None
    else:
        out = row.get("output", row.get("response"))
    return min_chars > 0 and isinstance(out, str) and len(out.strip()) < min_chars


def _source_rows(recipe: Recipe, s: Source, ds, stats: dict[str, Any]) -> list[dict[str, str]]:
    """One source through filter -> format -> cap -> fields -> normalize -> min_output -> weight."""
    stats["rows_loaded"] = len(ds)
    idx = _filter_indices(s, ds)
    stats["rows_after_filter"] = len(idx)
    if unmatched := _unmatched_filter_values(s, ds):
        stats["filter_values_unmatched"] = unmatched  # listed values no row has: recorded, never dropped silently
    if s.format == "oasst":
        candidates: list[tuple[int, Any]] = _oasst_pairs(ds, idx, f"source {s.name!r}")
    else:
        _check_columns(s, ds)
        candidates = [(i, None) for i in idx]
    stats["rows_after_format"] = len(candidates)
    if s.max_rows is not None and len(candidates) > s.max_rows:
        chosen = sorted(_seeded(recipe, s, "cap").sample(range(len(candidates)), s.max_rows))
        candidates = [candidates[k] for k in chosen]
    stats["rows_after_cap"] = len(candidates)
    if s.format != "oasst" and candidates:
        top = sorted({_PATH_PART.match(p.strip()).group(1) for p in _all_paths(s)})
        view = ds.select_columns(top).select([i for i, _ in candidates])
        candidates = [(i, row) for (i, _), row in zip(candidates, view)]
    rows, short, bad = [], 0, []
    for i, raw in candidates:
        where = f"{s.name} row {i}"
        try:
            mapped = raw if s.format == "oasst" else _map_fields(s, raw, where)
            if _short_output(mapped, recipe.min_output_chars):
                short += 1
                continue
            row = normalize_row(mapped, where)
        except DataError as e:
            if not s.skip_bad_rows:
                hint = "set `skip_bad_rows: true` on the source to drop such rows, counted in the data card"
                raise DataError(f"{e}\n(source {s.name!r}, {s.dataset}; {hint})") from None
            bad.append(str(e))
            continue
        if _short_output(row, recipe.min_output_chars):
            short += 1
            continue
        rows.append(Row({**row, "source": s.name, "_origin": i}, where))
    stats["rows_dropped_min_output"] = short
    stats["rows_skipped_bad"] = len(bad)
    if bad:
        stats["bad_rows_first"] = bad[:BAD_ROWS_RECORDED]
    whole = int(s.weight)
    frac = s.weight - whole
    weighted = rows * whole
    if frac > 0 and rows:
        extra = sorted(_seeded(recipe, s, "weight").sample(range(len(rows)), round(frac * len(rows))))
        weighted += [rows[k] for k in extra]
    stats["rows_after_weight"] = len(weighted)
    return weighted


def _all_paths(s: Source) -> list[str]:
    paths = []
    for spec in s.fields.values():
        for one in spec if isinstance(spec, list) else [spec]:
            if "{" in one or "}" in one:
                paths += [m.group(1) for m in _PLACEHOLDER.finditer(one) if m.group(0) not in ("{{", "}}")]
            else:
                paths.append(one)
    return paths


def _dedupe_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    if "messages" in row:
        return tuple(f"{t['role']}: {' '.join(t['content'].split())}" for t in row["messages"])
    return tuple(" ".join(row[k].split()) for k in ("instruction", "input", "output"))


def _texts(row: Mapping[str, Any], style) -> tuple[str, ...]:
    """What a row's length is counted on: the rendered prompt and the output, or every turn of a conversation."""
    if "messages" in row:
        return tuple(t["content"] for t in row["messages"])
    return style.apply(row["instruction"], input=row["input"]), row["output"]


def rows_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The rows as JSON lines (sort_keys, UTF-8): what ``train.jsonl`` holds and ``rows_sha256`` hashes."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_file_hashes(s: Source) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for f in _flat_files(s.data_files):
        if "://" in f:
            out[f] = None  # remote: pin `revision` (hf://...@commit) to make it reproducible
            continue
        for p in sorted(glob.glob(f, recursive=True)) if glob.has_magic(f) else [f]:
            out[p] = file_sha256(p) if Path(p).is_file() else None
    return out


def build(
    recipe: Recipe,
    count_tokens: Callable[[str], int] | None = None,
    *,
    probe_timeout: float = HUB_PROBE_TIMEOUT_S,
    revisions: Mapping[str, str | None] | None = None,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Load, mix and filter the recipe's sources; returns ``(rows, data_card)``.

    ``revisions``: {source name: commit} to load instead of the recipe's own (``card_revisions`` of an
    earlier card: what ``submission.reproduce data`` passes, so unpinned sources load the recorded commit).

    Rows are ``{instruction, input, output, source}`` or ``{messages, source}`` in their final (seeded, shuffled) order; the card
    records every source and count, and ``rows_sha256`` over ``rows_bytes(rows)``.
    """
    check_eval_splits(recipe)
    if recipe.max_tokens is not None and count_tokens is None:
        raise DataError(f"recipe {recipe.name!r} sets max_tokens: pass count_tokens (e.g. --tokenizer_dir checkpoints/<model> on the CLI)")
    from core.prompts import get_style

    style = get_style(recipe.template)
    datasets_, resolved = _load_all(recipe, probe_timeout, revisions)
    stats = [dict() for _ in recipe.sources]
    per_source = [_source_rows(recipe, s, ds, st) for s, ds, st in zip(recipe.sources, datasets_, stats)]

    owner: dict[tuple[str, str, str], tuple[int, int]] = {}
    drops = [{"duplicate": 0, "max_chars": 0, "max_tokens": 0} for _ in recipe.sources]
    lengths: dict[tuple[int, int], tuple[int, int | None]] = {}
    kept: list[dict[str, Any]] = []
    final_counts = [0] * len(recipe.sources)
    for k, rows in enumerate(per_source):
        for row in rows:
            origin = (k, row["_origin"])
            if recipe.dedupe:
                first = owner.setdefault(_dedupe_key(row), origin)
                if first != origin:
                    drops[k]["duplicate"] += 1
                    continue
            if origin not in lengths:
                texts = _texts(row, style)
                tokens = sum(count_tokens(t) for t in texts) if recipe.max_tokens is not None else None
                lengths[origin] = (sum(len(t) for t in texts), tokens)
            chars, tokens = lengths[origin]
            if recipe.max_chars is not None and chars > recipe.max_chars:
                drops[k]["max_chars"] += 1
                continue
            if recipe.max_tokens is not None and tokens > recipe.max_tokens:
                drops[k]["max_tokens"] += 1
                continue
            kept.append(Row({key: value for key, value in row.items() if key != "_origin"}, row.where))
            final_counts[k] += 1
    random.Random(f"{recipe.seed}:shuffle").shuffle(kept)

    card_sources = []
    base = recipe.path.parent if recipe.path else None
    for s, st, d, n, rev, rows in zip(recipe.sources, stats, drops, final_counts, resolved, per_source):
        # This source's own rows (its fields, filter, cap and weight applied; before the cross-source dedupe):
        # when the mix's rows_sha256 differs on replay, this names the source that changed.
        source_rows = [{key: value for key, value in row.items() if key != "_origin"} for row in rows]
        card_sources.append(
            {
                "name": s.name,
                "dataset": s.dataset,
                "config": s.config,
                "split": s.split,
                "revision": s.revision,
                "revision_unpinned": s.revision_unpinned,
                "revision_resolved": rev,
                "license": s.license,
                "note": s.note,
                "format": s.format,
                "fields": s.fields,
                "filter": s.filter,
                "weight": s.weight,
                "max_rows": s.max_rows,
                "data_files": _data_file_hashes(s),
                "forced_eval_split": bool(s.force_eval_split and eval_split_reason(s.dataset, s.config, s.split, s.data_files, base)),
                **{k: v for k, v in st.items() if k != "bad_rows_first"},
                "rows_dropped_duplicate": d["duplicate"],
                "rows_dropped_max_chars": d["max_chars"],
                "rows_dropped_max_tokens": d["max_tokens"],
                "rows_kept_after_dedupe_and_filters": n,
                "source_rows_sha256": hashlib.sha256(rows_bytes(source_rows)).hexdigest(),
                **({"bad_rows_first": st["bad_rows_first"]} if "bad_rows_first" in st else {}),
            }
        )
    total_keys = (
        "rows_loaded",
        "rows_after_cap",
        "rows_after_weight",
        "rows_dropped_duplicate",
        "rows_dropped_max_chars",
        "rows_dropped_max_tokens",
        "rows_dropped_min_output",
        "rows_skipped_bad",
        "rows_kept_after_dedupe_and_filters",
    )
    card = {
        "recipe": recipe.name,
        "recipe_file": str(recipe.path) if recipe.path else None,
        "recipe_sha256": file_sha256(recipe.path) if recipe.path and Path(recipe.path).is_file() else None,
        "description": recipe.description,
        "template": recipe.template,
        "seed": recipe.seed,
        "dedupe": recipe.dedupe,
        "max_chars": recipe.max_chars,
        "max_tokens": recipe.max_tokens,
        "min_output_chars": recipe.min_output_chars,
        "datasets_version": _datasets_version(),
        "sources": card_sources,
        "totals": {k: sum(c[k] for c in card_sources) for k in total_keys} | {"rows": len(kept), "sources": len(card_sources)},
        "rows_sha256": hashlib.sha256(rows_bytes(kept)).hexdigest(),
    }
    return kept, card


def card_revisions(card: Mapping[str, Any]) -> dict[str, str | None]:
    """{source name: the commit it was loaded at} from a data card (``build(revisions=...)`` replays them)."""
    return {s["name"]: s.get("revision_resolved") or s.get("revision") for s in card.get("sources", [])}


def _datasets_version() -> str:
    import datasets

    return datasets.__version__


def write_data_card(card: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_rows(rows: list[dict[str, Any]], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rows_bytes(rows))
    return path


# ----------------------------------------------------------------------------- CLI


def main(recipe: Path, out_dir: Path | None = None, tokenizer_dir: Path | None = None) -> Path:
    """Build a data recipe into ``<out_dir>/train.jsonl`` and ``<out_dir>/data_card.json``.

    Args:
        recipe: the recipe YAML (see ``finetune/recipes.py`` for the schema), e.g. data/recipes/rtx4090_mix.yaml.
        out_dir: where to write (default: out/data/<recipe name>).
        tokenizer_dir: a checkpoint directory whose tokenizer counts tokens (needed when the recipe sets max_tokens).
    """
    r = load_recipe(recipe)
    count_tokens = None
    if tokenizer_dir is not None:
        from litgpt import Tokenizer

        tokenizer = Tokenizer(tokenizer_dir)

        def count_tokens(text: str) -> int:
            return len(tokenizer.encode(text))

    rows, card = build(r, count_tokens)
    out_dir = Path(out_dir) if out_dir is not None else Path("out/data") / r.name
    write_rows(rows, out_dir / "train.jsonl")
    write_data_card(card, out_dir / "data_card.json")
    for s in card["sources"]:
        print(
            f"  {s['name']:<28} {s['rows_loaded']:>8} loaded {s['rows_after_cap']:>7} capped {s['rows_kept_after_dedupe_and_filters']:>7} kept  ({s['license']})"
        )
        for col, values in s.get("filter_values_unmatched", {}).items():
            print(f"    note: {len(values)} filter values of {col!r} match no row (listed in the card), e.g. {values[:3]}")
    print(f"{len(rows)} rows -> {out_dir / 'train.jsonl'} (sha256 {card['rows_sha256'][:16]}...); card: {out_dir / 'data_card.json'}")
    return out_dir


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
