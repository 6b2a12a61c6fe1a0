"""Rows from the loaded sources: per source filter -> format -> cap -> fields -> normalize -> min_output
-> weight, then across sources dedupe -> max_chars/max_tokens -> seeded shuffle.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from finetune.data import DataError, Row, normalize_row
from finetune.recipes.fields import _all_paths, _map_fields, _oasst_pairs
from finetune.recipes.schema import _PATH_PART, Recipe, Source

BAD_ROWS_RECORDED = 5  # reasons of skipped rows kept in the card, per source


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
        candidates: list[tuple[int, Any]] = _oasst_pairs(ds, idx, f"source {s.name!r}", stats)
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


def _dedupe_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    if "messages" in row:
        return tuple(f"{t['role']}: {' '.join(t['content'].split())}" for t in row["messages"])
    return tuple(" ".join(row[k].split()) for k in ("instruction", "input", "output"))


def _texts(row: Mapping[str, Any], style) -> tuple[str, ...]:
    """What a row's length is counted on: the rendered prompt and the output, or every turn of a conversation."""
    if "messages" in row:
        return tuple(t["content"] for t in row["messages"])
    return style.apply(row["instruction"], input=row["input"]), row["output"]


def mix(
    recipe: Recipe, per_source: list[list[dict[str, Any]]], style, count_tokens: Callable[[str], int] | None
) -> tuple[list[dict[str, Any]], list[dict[str, int]], list[int]]:
    """(kept rows in their final order, drops per source and reason, rows kept per source) across all sources."""
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
    return kept, drops, final_counts
