"""Recipe files: the ``Recipe``/``Source`` dataclasses and ``load_recipe``, which reads a YAML file and refuses
anything the schema (``finetune/recipes/__init__.py``) does not allow, naming the file and the field.

Kept apart from loading and mixing so that a recipe can be checked (and its evaluation sources refused)
without touching ``datasets`` data.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune import eval_guard
from finetune.data import DataError

FORMATS = ("fields", "multiple_choice", "oasst")


def eval_split_reason(dataset: str, config: str | None, split: str, data_files=None, base: Path | None = None) -> str | None:
    """Why a source is data the challenge evaluates on (``finetune.eval_guard``, derived from the shipped HELM confs), or None."""
    found = eval_guard.reasons(dataset, config, split, data_files, base)
    return "; ".join(found) if found else None


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
    hub = _hub_dataset(dataset)
    remote = [f for f in _flat_files(data_files) if f.startswith("hf://") and not re.search(r"@[0-9a-f]{40}(/|$)", f)]
    if revision is not None and revision.strip().lower().startswith(UNPINNED):
        why = revision.strip()[len(UNPINNED) :].strip()
        _check(bool(why), where, f'"{UNPINNED}" needs a reason after it, e.g. "{UNPINNED} no hub access when written"')
        _check(hub or bool(remote), where, f"{dataset!r} reads no data from the hub, so nothing is unpinned; remove revision")
        return None, why
    if revision is not None:
        _check(bool(_SHA.fullmatch(revision.strip())), where, f"{revision!r} is not a commit: give {how} (a branch or tag moves)")
        # datasets passes revision to hub repositories only: a builder (json, csv, ...) or a local folder
        # ignores it, and the card would record a commit nothing was loaded at.
        pin = f"; pin hf:// data files with @<sha> in the URL ({remote[0]})" if remote else ""
        _check(hub, where, f"{dataset!r} is not a hub dataset, so no commit is loaded and revision would be ignored; remove it{pin}")
        return revision.strip(), None
    if hub:
        raise DataError(f"{where}: required for hub dataset {dataset!r}: {how}")
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
    # A builder (json, csv, ...) has no configurations: datasets takes any name as its cache's and reads the same rows.
    builder = f"{dataset!r} is a datasets builder with no configurations, so config {config!r} would change no row; remove it"
    _check(config is None or dataset not in _packaged_builders(), f"{where}.config", builder)
    data_files = _resolve_data_files(raw.get("data_files"), base, f"{where}.data_files")
    revision, unpinned = _parse_revision(revision, dataset, data_files, f"{where}.revision")
    split = raw.get("split", "train")
    _check(isinstance(split, str) and split.strip() != "", f"{where}.split", f"must be a non-empty string, got {split!r}")
    if isinstance(data_files, dict):
        # datasets reads every split's files but returns only `split`'s rows: the others (listed and hashed in the card) are never trained on.
        loaded = {re.sub(r"\[.*?\]$", "", part.strip()).strip() for part in split.split("+")}
        for key in data_files:
            _check(
                key in loaded,
                f"{where}.data_files.{key}",
                f"split {key!r} is not loaded (split: {split}), so no row of its files would be kept; remove it or name it in split",
            )
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
    """Raise one ``DataError`` naming every source on an evaluation split that is not forced.

    ``force_eval_split`` on a source the guard does not refuse would change nothing (the card records
    ``forced_eval_split: false``): refused too, naming the source."""
    bad = []
    base = recipe.path.parent if recipe.path else None
    where = f"{recipe.path}: " if recipe.path else f"recipe {recipe.name!r}: "
    for i, s in enumerate(recipe.sources):
        reason = eval_split_reason(s.dataset, s.config, s.split, s.data_files, base)
        if reason and not s.force_eval_split:
            bad.append(f"  - sources[{i}] {s.name!r}: {reason}")
        _check(
            bool(reason) or not s.force_eval_split,
            f"{where}sources[{i}].force_eval_split",
            f"{s.name!r} is not evaluation data (finetune.eval_guard refuses nothing here), so it would change nothing; remove it",
        )
    if bad:
        raise DataError(
            f"{where}refusing to train on evaluation data (the score would measure memorization):\n"
            + "\n".join(bad)
            + "\nUse another split (e.g. train), or, if you really mean it, set `force_eval_split: true` on the source "
            "(the data card then records forced_eval_split: true)."
        )


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
