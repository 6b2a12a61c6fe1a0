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
  config            str, optional: the dataset's configuration (``main`` for gsm8k); refused for a builder
                    (``json``, ``csv``, ...), which has none.
  split             str (default ``train``); slicing such as ``train[:10%]`` is passed through.
  data_files        str, list of str, or {split: str | list}: local files (relative paths resolve
                    against the YAML file's folder; globs allowed) or URLs (``hf://...``). A mapping names only
                    splits that ``split`` loads (``{train: a.jsonl, test: b.jsonl}`` with ``split: train`` is refused).
  revision          str, required for a hub dataset: the 40-hex commit sha to load, or ``"unpinned: <why>"``
                    (the build then resolves the hub's current commit, loads exactly that one and records it in
                    the card as ``revision_resolved``, which ``submission.reproduce data`` loads again). A
                    branch or tag is refused: it moves. ``hf://`` data files pin with ``@<sha>`` in the URL.
                    A builder or local folder takes none (``datasets`` would ignore it): refused there, except
                    ``"unpinned: <why>"`` beside ``hf://`` files that have no ``@<sha>``.
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
  force_eval_split  bool (default false): allow a source the guard refuses (``finetune.eval_guard``; recorded in the card);
                    refused on a source the guard does not refuse (it would change nothing).
  skip_bad_rows     bool (default false): drop rows that fail normalization instead of raising
                    (counted, first few reasons recorded in the card).

Formats: ``multiple_choice`` takes ``fields: {question, choices, answer}`` (choices: a list column;
answer: an index, the choice's text, or a letter) and renders ``question\\nA. ...\\nB. ...`` with the
letter as output, the shape of HELM's multiple-choice prompts. ``oasst`` reads OpenAssistant message
trees (``message_id``, ``parent_id``, ``role``, ``text``, ``rank``; ``deleted``, ``review_result`` and
``synthetic`` drop messages when present) and pairs each root prompt with its top-ranked (rank 0)
assistant reply; ``filter`` applies to the messages before pairing (e.g. ``{lang: en}``); it takes no
``fields``. The card counts the messages those flags dropped (``oasst_messages_flagged``) and the root
prompts left without a reply (``oasst_prompts_unpaired``).

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

from finetune.recipes.card import card_revisions, rows_bytes, write_data_card, write_rows
from finetune.recipes.cli import main
from finetune.recipes.pipeline import build
from finetune.recipes.schema import Recipe, Source, check_eval_splits, eval_split_reason, load_recipe

__all__ = [
    "Recipe",
    "Source",
    "build",
    "card_revisions",
    "check_eval_splits",
    "eval_split_reason",
    "load_recipe",
    "main",
    "rows_bytes",
    "write_data_card",
    "write_rows",
]
