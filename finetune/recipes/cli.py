"""``python -m finetune.recipes``: build a recipe into ``train.jsonl`` and ``data_card.json``."""

from __future__ import annotations

from pathlib import Path

from finetune.data import DataError
from finetune.recipes.card import write_data_card, write_rows
from finetune.recipes.pipeline import build
from finetune.recipes.schema import load_recipe


def main(recipe: Path, out_dir: Path | None = None, tokenizer_dir: Path | None = None) -> Path:
    """Build a data recipe into ``<out_dir>/train.jsonl`` and ``<out_dir>/data_card.json``.

    Args:
        recipe: the recipe YAML (see ``finetune/recipes/__init__.py`` for the schema), e.g. data/recipes/rtx4090_mix.yaml.
        out_dir: where to write (default: out/data/<recipe name>).
        tokenizer_dir: a checkpoint directory whose tokenizer counts tokens (needed when the recipe sets max_tokens; refused otherwise).
    """
    r = load_recipe(recipe)
    if tokenizer_dir is not None and r.max_tokens is None:  # only max_tokens counts tokens: the tokenizer would go unread
        raise DataError(f"--tokenizer_dir: {tokenizer_dir} would not be read: {recipe} sets no max_tokens; drop it or set max_tokens")
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
