"""``build``: a recipe's sources loaded, mixed and filtered into the training rows and their data card."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from finetune.data import DataError
from finetune.recipes.card import data_card
from finetune.recipes.loading import HUB_PROBE_TIMEOUT_S, _load_all
from finetune.recipes.mixing import _source_rows, mix
from finetune.recipes.schema import Recipe, check_eval_splits


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
    kept, drops, final_counts = mix(recipe, per_source, style, count_tokens)
    return kept, data_card(recipe, per_source, stats, drops, final_counts, resolved, kept)
