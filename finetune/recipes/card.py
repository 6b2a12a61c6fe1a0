"""The data card: every source with its license and counts at each stage, the sha256 of each local
data file, of each source's rows and of ``train.jsonl`` itself, so the card proves what was trained on.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.integrity import sha256_file
from finetune.recipes.schema import Recipe, Source, _flat_files, eval_split_reason


def rows_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The rows as JSON lines (sort_keys, UTF-8): what ``train.jsonl`` holds and ``rows_sha256`` hashes."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _data_file_hashes(s: Source) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for f in _flat_files(s.data_files):
        if "://" in f:
            out[f] = None  # remote: pin `revision` (hf://...@commit) to make it reproducible
            continue
        for p in sorted(glob.glob(f, recursive=True)) if glob.has_magic(f) else [f]:
            out[p] = sha256_file(p) if Path(p).is_file() else None
    return out


def data_card(
    recipe: Recipe,
    per_source: list[list[dict[str, Any]]],
    stats: list[dict[str, Any]],
    drops: list[dict[str, int]],
    final_counts: list[int],
    resolved: list[str | None],
    kept: list[dict[str, Any]],
) -> dict[str, Any]:
    """The card of one build: ``per_source`` before the cross-source dedupe, ``kept`` the final rows."""
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
        "recipe_sha256": sha256_file(recipe.path) if recipe.path and Path(recipe.path).is_file() else None,
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
    return card


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
