"""Data recipes (finetune.recipes): schema checks, mixing, eval-split refusal, offline errors, data cards.

Everything is offline: sources are local JSON/JSONL/CSV files in tmp_path, loaded through the same
``datasets.load_dataset`` path as hub sources (``dataset: json`` / ``csv``), with a datasets cache in
tmp and sockets disabled. The offline-error test runs the CLI in subprocesses with
``HF_DATASETS_OFFLINE=1`` and with ``HF_ENDPOINT`` pointing at a closed port.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune import recipes
from finetune.data import DataError, load_rows
from finetune.recipes import Recipe, Source, build, eval_split_reason, load_recipe, rows_bytes

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "data" / "recipes"


@pytest.fixture(scope="module")
def _datasets_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_datasets_cache")


@pytest.fixture(autouse=True)
def offline(monkeypatch, _datasets_cache):
    """A private datasets cache, and no network: any socket connect fails the test loudly."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", _datasets_cache)

    def no_connect(self, address):
        raise AssertionError(f"test tried the network: connect({address!r})")

    monkeypatch.setattr(socket.socket, "connect", no_connect)


SHA = "0123456789abcdef0123456789abcdef01234567"  # a well-formed commit (no hub is asked)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(tmp_path: Path, sources: list[dict], name: str = "t", **top) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": name, **top, "sources": sources}, sort_keys=False), encoding="utf-8")
    return path


def qa_rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"q": f"{prefix} question {i}?", "a": f"answer {i}"} for i in range(n)]


def src(name: str, data_files: str, **kw) -> dict:
    return {"name": name, "dataset": "json", "data_files": data_files, "license": "mit", "fields": {"instruction": "q", "output": "a"}, **kw}


def run(tmp_path: Path, sources: list[dict], count_tokens=None, **top):
    return build(load_recipe(write_recipe(tmp_path, sources, **top)), count_tokens)


# ----------------------------------------------------------------------------- field mapping


def test_fields_list_join_template_and_types(tmp_path):
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "What is 6*7?", "context": "Arithmetic.", "answer": 42, "meta": {"tags": ["x", "y"]}},
            {"question": "Name a prime.", "context": "", "answer": 7, "meta": {"tags": ["z"]}},
        ],
    )
    rows, card = run(
        tmp_path,
        [
            {
                "name": "mix",
                "dataset": "json",
                "data_files": "d.jsonl",
                "license": "cc-by-4.0",
                "fields": {"instruction": ["question", "context"], "input": "meta.tags[0]", "output": "Answer: {answer}"},
            }
        ],
        seed=1,
    )
    by_q = {r["instruction"]: r for r in rows}
    assert by_q["What is 6*7?\n\nArithmetic."] == {
        "instruction": "What is 6*7?\n\nArithmetic.",
        "input": "x",
        "output": "Answer: 42",
        "source": "mix",
    }
    assert by_q["Name a prime."]["output"] == "Answer: 7"  # the empty context is skipped, not joined
    assert card["sources"][0]["fields"]["instruction"] == ["question", "context"]


def test_messages_prompt_response_and_csv(tmp_path):
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
        ],
    )
    write_jsonl(tmp_path / "lima.jsonl", [{"conversations": ["Tell me a fact.", "Water boils at 100 C.", "More?", "No."]}])
    write_jsonl(tmp_path / "pr.jsonl", [{"p": "Say yes.", "r": "yes"}])
    (tmp_path / "t.csv").write_text("question,answer\nIs the sky blue?,yes\n", encoding="utf-8")
    rows, card = run(
        tmp_path,
        [
            {"name": "chat", "dataset": "json", "data_files": "chat.jsonl", "license": "mit", "fields": {"messages": "messages"}},
            {"name": "lima", "dataset": "json", "data_files": "lima.jsonl", "license": "mit", "fields": {"messages": "conversations"}},
            {"name": "pr", "dataset": "json", "data_files": "pr.jsonl", "license": "mit", "fields": {"prompt": "p", "response": "r"}},
            {"name": "csv", "dataset": "csv", "data_files": "t.csv", "license": "mit", "fields": {"instruction": "question", "output": "answer"}},
        ],
    )
    got = {r["source"]: r["messages"] if "messages" in r else (r["instruction"], r["input"], r["output"]) for r in rows}
    assert got == {  # conversations keep every turn, the system turn included
        "chat": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "lima": [
            {"role": "user", "content": "Tell me a fact."},
            {"role": "assistant", "content": "Water boils at 100 C."},
            {"role": "user", "content": "More?"},
            {"role": "assistant", "content": "No."},
        ],
        "pr": ("Say yes.", "", "yes"),
        "csv": ("Is the sky blue?", "", "yes"),
    }
    assert [s["rows_loaded"] for s in card["sources"]] == [1, 1, 1, 1]


def test_multiple_choice_and_oasst_formats(tmp_path):
    write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": "2+2?", "choices": ["3", "4", "5"], "answer": "1"},
            {"question": "Sky?", "choices": ["green", "blue"], "answer": "B"},
        ],
    )
    write_jsonl(
        tmp_path / "oasst.jsonl",
        [
            {
                "message_id": "p1",
                "parent_id": None,
                "role": "prompter",
                "text": "Why is the sea salty?",
                "rank": None,
                "lang": "en",
                "deleted": False,
            },
            {"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "Rivers carry minerals.", "rank": 0, "lang": "en", "deleted": False},
            {"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "Worse answer.", "rank": 1, "lang": "en", "deleted": False},
            {"message_id": "p2", "parent_id": "a1", "role": "prompter", "text": "Follow-up?", "rank": None, "lang": "en", "deleted": False},
            {"message_id": "a3", "parent_id": "p2", "role": "assistant", "text": "Deeper turn.", "rank": 0, "lang": "en", "deleted": False},
            {"message_id": "p3", "parent_id": None, "role": "prompter", "text": "Hola?", "rank": None, "lang": "es", "deleted": False},
            {"message_id": "a4", "parent_id": "p3", "role": "assistant", "text": "Hola.", "rank": 0, "lang": "es", "deleted": False},
        ],
    )
    rows, card = run(
        tmp_path,
        [
            {
                "name": "mc",
                "dataset": "json",
                "data_files": "mc.jsonl",
                "license": "mit",
                "format": "multiple_choice",
                "fields": {"question": "question", "choices": "choices", "answer": "answer"},
            },
            {"name": "oasst", "dataset": "json", "data_files": "oasst.jsonl", "license": "apache-2.0", "format": "oasst", "filter": {"lang": "en"}},
        ],
    )
    got = sorted((r["source"], r["instruction"], r["output"]) for r in rows)
    assert got == [
        ("mc", "2+2?\nA. 3\nB. 4\nC. 5", "B"),
        ("mc", "Sky?\nA. green\nB. blue", "B"),
        ("oasst", "Why is the sea salty?", "Rivers carry minerals."),  # root prompt + rank-0 reply only
    ]
    oasst = card["sources"][1]
    assert (oasst["rows_loaded"], oasst["rows_after_filter"], oasst["rows_after_format"]) == (7, 5, 1)


def test_oasst_counts_flagged_messages_and_prompts_left_unpaired(tmp_path):
    """A root prompt whose top reply was deleted, failed review or was synthetic vanished from the mix uncounted."""

    def msg(mid, parent, role, text, rank=None, **flags):
        return {
            "message_id": mid,
            "parent_id": parent,
            "role": role,
            "text": text,
            "rank": rank,
            "deleted": False,
            "review_result": True,
            "synthetic": False,
        } | flags

    write_jsonl(
        tmp_path / "oasst.jsonl",
        [
            msg("p1", None, "prompter", "Kept prompt?"),
            msg("a1", "p1", "assistant", "Kept reply.", 0),
            msg("p2", None, "prompter", "Prompt whose reply was deleted?"),
            msg("a2", "p2", "assistant", "Deleted reply.", 0, deleted=True),
            msg("p3", None, "prompter", "Prompt that failed review?", review_result=False),
            msg("a3", "p3", "assistant", "Reply to it.", 0),
            msg("p4", None, "prompter", "Prompt with a synthetic reply?"),
            msg("a4", "p4", "assistant", "Model-written.", 0, synthetic=True),
        ],
    )
    rows, card = run(tmp_path, [{"name": "oasst", "dataset": "json", "data_files": "oasst.jsonl", "license": "apache-2.0", "format": "oasst"}])
    s = card["sources"][0]
    assert [r["output"] for r in rows] == ["Kept reply."] and s["rows_after_format"] == 1
    assert (s["oasst_messages_flagged"], s["oasst_prompts_unpaired"]) == (3, 2)  # a2, p3, a4; p2 and p4 lost their reply


# ----------------------------------------------------------------------------- weights, caps, dedupe, filters


def test_weights_repeat_and_halve_seeded(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(10, "a"))
    write_jsonl(tmp_path / "b.jsonl", qa_rows(10, "b"))
    sources = [src("twice", "a.jsonl", weight=2), src("half", "b.jsonl", weight=0.5)]
    rows, card = run(tmp_path, sources)
    counts = {s["name"]: (s["rows_after_weight"], s["rows_kept_after_dedupe_and_filters"]) for s in card["sources"]}
    assert counts == {"twice": (20, 20), "half": (5, 5)}  # the source's own repeats are not duplicates
    twice = [r["instruction"] for r in rows if r["source"] == "twice"]
    assert all(twice.count(q) == 2 for q in set(twice)) and len(set(twice)) == 10
    again, card2 = run(tmp_path, sources)
    assert again == rows and card2["rows_sha256"] == card["rows_sha256"]  # deterministic, order included
    other, _ = run(tmp_path, sources, seed=7)
    half = lambda rs: sorted(r["instruction"] for r in rs if r["source"] == "half")  # noqa: E731
    assert len(half(other)) == 5 and (half(other) != half(rows) or other != rows)  # the seed drives it
    rows15, card15 = run(tmp_path, [src("one_and_half", "a.jsonl", weight=1.5)])
    assert card15["sources"][0]["rows_after_weight"] == 15 and len(rows15) == 15


def test_max_rows_caps_before_weighting(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(50))
    rows, card = run(tmp_path, [src("a", "a.jsonl", max_rows=7, weight=2)])
    s = card["sources"][0]
    assert (s["rows_loaded"], s["rows_after_cap"], s["rows_after_weight"], len(rows)) == (50, 7, 14, 14)
    again, _ = run(tmp_path, [src("a", "a.jsonl", max_rows=7, weight=2)])
    assert sorted(r["instruction"] for r in again) == sorted(r["instruction"] for r in rows)


def test_dedupe_across_sources_keeps_first(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(5))
    write_jsonl(tmp_path / "b.jsonl", qa_rows(3) + [{"q": "  q question 1?", "a": "answer 1"}] + qa_rows(2, "new"))
    rows, card = run(tmp_path, [src("a", "a.jsonl"), src("b", "b.jsonl")])
    b = card["sources"][1]
    assert b["rows_dropped_duplicate"] == 4 and b["rows_kept_after_dedupe_and_filters"] == 2  # whitespace-insensitive
    assert {r["source"] for r in rows if r["instruction"].startswith("q ")} == {"a"}
    assert card["totals"]["rows"] == len(rows) == 7
    kept, card_off = run(tmp_path, [src("a", "a.jsonl"), src("b", "b.jsonl")], dedupe=False)
    assert len(kept) == 11 and card_off["totals"]["rows_dropped_duplicate"] == 0


def test_length_filters_with_fake_token_counter(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "short", "a": "ok"}, {"q": "word " * 40, "a": "ok"}, {"q": "x" * 300, "a": "ok"}])
    path = write_recipe(tmp_path, [src("a", "a.jsonl")], max_tokens=20)
    with pytest.raises(DataError, match="max_tokens"):
        build(load_recipe(path))
    calls = []

    def words(text: str) -> int:
        calls.append(text)
        return len(text.split())

    rows, card = build(load_recipe(path), words)
    assert sorted(r["instruction"] for r in rows) == ["short", "x" * 300]  # 'word' x40 is 41+ tokens
    assert card["sources"][0]["rows_dropped_max_tokens"] == 1
    assert "short\nAnswer:" in calls  # counted on the prompt as the template renders it
    rows, card = run(tmp_path, [src("a", "a.jsonl")], max_chars=250)
    assert len(rows) == 2 and card["sources"][0]["rows_dropped_max_chars"] == 1


def test_min_output_chars(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "a", "a": "yes"}, {"q": "b", "a": " "}, {"q": "c", "a": "a longer answer"}])
    rows, card = run(tmp_path, [src("a", "a.jsonl")], min_output_chars=4)
    assert [r["instruction"] for r in rows] == ["c"] and card["sources"][0]["rows_dropped_min_output"] == 2


def test_filter_equality_lists_and_errors(tmp_path):
    write_jsonl(
        tmp_path / "m.jsonl",
        [{"q": f"q{i}", "a": "A", "subject": s, "level": i % 3} for i, s in enumerate(["physics", "law", "physics", "art", "law", "physics"])],
    )
    rows, card = run(tmp_path, [src("m", "m.jsonl", filter={"subject": "physics"})])
    assert sorted(r["instruction"] for r in rows) == ["q0", "q2", "q5"]
    assert card["sources"][0]["rows_after_filter"] == 3 and card["sources"][0]["filter"] == {"subject": "physics"}
    rows, _ = run(tmp_path, [src("m", "m.jsonl", filter={"subject": ["law", "art"], "level": 1})])
    assert sorted(r["instruction"] for r in rows) == ["q1", "q4"]
    with pytest.raises(DataError, match=r"'m'.*filter column 'topic'.*columns"):
        run(tmp_path, [src("m", "m.jsonl", filter={"topic": "x"})])
    with pytest.raises(DataError, match=r"matched no row.*'physics'"):
        run(tmp_path, [src("m", "m.jsonl", filter={"subject": "Physics"})])


# ----------------------------------------------------------------------------- eval splits


@pytest.mark.parametrize(
    "dataset, config, split, refused",
    [
        ("truthful_qa", "multiple_choice", "validation", True),
        ("truthfulqa/truthful_qa", "generation", "train", True),
        ("cais/mmlu", "all", "test", True),
        ("cais/mmlu", "abstract_algebra", "dev", True),
        ("hendrycks_test", "philosophy", "validation", True),
        ("cais/mmlu", "all", "auxiliary_train", False),
        ("cais/mmlu", "auxiliary_train", "train", False),
        ("openai/gsm8k", "main", "test", True),
        ("gsm8k", "main", "train[:50%]+test[:10]", True),
        ("openai/gsm8k", "main", "train", False),
        ("abisee/cnn_dailymail", "3.0.0", "test", True),
        ("abisee/cnn_dailymail", "3.0.0", "train", False),
        ("Samsung/samsum", None, "test", True),
        ("samsum", None, "train", False),
        ("hendrycks/competition_math", None, "test", True),
        ("lighteval/MATH", "all", "test", True),
        ("heegyu/bbq", None, "train", True),
        ("lighteval/bbq_helm", "all", "test", True),
        ("hendrycks/ethics", "justice", "test", True),
        ("tasksource/bigbench", "navigate", "validation", False),  # not a task HELM evaluates
        ("tasksource/bigbench", "navigate", "train", False),
        ("tasksource/bigbench", "winowhy", "train", True),  # HELM's own test instances come from all examples
        ("databricks/databricks-dolly-15k", None, "train", False),
    ],
)
def test_eval_split_table(dataset, config, split, refused):
    assert (eval_split_reason(dataset, config, split) is not None) == refused


def test_eval_split_refused_before_any_loading(tmp_path, monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise AssertionError("load_dataset must not be called for a refused recipe")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr(recipes.loading, "_hub_reachable", boom)
    write_jsonl(tmp_path / "a.jsonl", qa_rows(2))
    sources = [
        src("ok", "a.jsonl"),
        {
            "name": "tqa",
            "dataset": "truthful_qa",
            "config": "generation",
            "split": "validation",
            "license": "apache-2.0",
            "revision": SHA,
            "fields": {"instruction": "question", "output": "best_answer"},
        },
    ]
    with pytest.raises(DataError) as e:
        load_recipe(write_recipe(tmp_path, sources))
    msg = str(e.value)
    assert "recipe.yaml" in msg and "'tqa'" in msg and "TruthfulQA" in msg and "force_eval_split: true" in msg
    # a Recipe built in code is refused by build() itself, before loading or probing anything
    recipe = Recipe(
        name="code",
        sources=[
            Source(
                name="mmlu", dataset="cais/mmlu", config="all", split="test", license="mit", fields={"instruction": "question", "output": "answer"}
            )
        ],
    )
    with pytest.raises(DataError, match=r"(?s)'mmlu'.*MMLU.*force_eval_split: true"):
        build(recipe)


def test_forced_eval_split_is_recorded(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"question": "Can pigs fly?", "best_answer": "No."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(recipes.loading, "_hub_reachable", lambda timeout=0: True)
    path = write_recipe(
        tmp_path,
        [
            {
                "name": "tqa",
                "dataset": "truthful_qa",
                "config": "generation",
                "split": "validation",
                "revision": SHA,
                "license": "apache-2.0",
                "force_eval_split": True,
                "fields": {"instruction": "question", "output": "best_answer"},
            }
        ],
    )
    rows, card = build(load_recipe(path))
    assert rows == [{"instruction": "Can pigs fly?", "input": "", "output": "No.", "source": "tqa"}]
    assert card["sources"][0]["forced_eval_split"] is True
    assert calls == [("truthful_qa", "generation", {"split": "validation", "data_files": None, "revision": SHA})]


def test_force_eval_split_on_data_the_guard_allows_is_refused(tmp_path):
    """On a source the guard does not refuse, force_eval_split changed nothing (the card said forced_eval_split: false)."""
    write_jsonl(tmp_path / "a.jsonl", qa_rows(3))
    path = write_recipe(tmp_path, [src("a", "a.jsonl"), src("b", "a.jsonl", force_eval_split=True)])
    with pytest.raises(DataError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: sources[1].force_eval_split: 'b' is not evaluation data")
    recipe = load_recipe(write_recipe(tmp_path, [src("a", "a.jsonl")]))
    forced = dataclasses.replace(recipe, sources=[dataclasses.replace(recipe.sources[0], force_eval_split=True)])
    with pytest.raises(DataError, match=re.escape("sources[0].force_eval_split")):
        build(forced)  # build checks a Recipe made in code too


# ----------------------------------------------------------------------------- revisions


def hub_source(**kw) -> dict:
    return {"name": "h", "dataset": "someone/qa", "license": "mit", "fields": {"instruction": "q", "output": "a"}, **kw}


@pytest.mark.parametrize(
    "revision, expected",
    [
        (None, "sources[0].revision: required for hub dataset 'someone/qa': a 40-hex commit sha"),
        ("main", "sources[0].revision: 'main' is not a commit"),
        ("v1.0", "is not a commit"),
        ("unpinned:", "needs a reason"),
    ],
)
def test_a_hub_source_must_pin_a_commit_or_say_why_not(tmp_path, revision, expected):
    source = hub_source(**({"revision": revision} if revision is not None else {}))
    with pytest.raises(DataError, match=re.escape(expected)):
        load_recipe(write_recipe(tmp_path, [source]))
    with pytest.raises(DataError, match="required for data files on the hub without @<sha>"):
        load_recipe(write_recipe(tmp_path, [src("f", "hf://datasets/someone/qa/train.jsonl")]))
    load_recipe(write_recipe(tmp_path, [src("f", f"hf://datasets/someone/qa@{SHA}/train.jsonl")]))  # pinned in the URL


def test_a_revision_nothing_reads_is_refused(tmp_path):
    """datasets reads revision for a hub repository only: on a builder over local files it changed nothing
    and the card recorded the build as loaded at that commit."""
    write_jsonl(tmp_path / "a.jsonl", qa_rows(3))
    rows, card = run(tmp_path, [src("f", "a.jsonl")])
    for revision, expected in [
        (SHA, "sources[0].revision: 'json' is not a hub dataset, so no commit is loaded and revision would be ignored"),
        ("unpinned: local", "sources[0].revision: 'json' reads no data from the hub, so nothing is unpinned"),
    ]:
        path = write_recipe(tmp_path, [src("f", "a.jsonl", revision=revision)])
        with pytest.raises(DataError) as e:
            load_recipe(path)
        assert str(e.value).startswith(f"{path}: ") and expected in str(e.value)
    remote = "hf://datasets/someone/qa/train.jsonl"
    with pytest.raises(DataError, match=re.escape(f"pin hf:// data files with @<sha> in the URL ({remote})")):
        load_recipe(write_recipe(tmp_path, [src("f", remote, revision=SHA)]))
    load_recipe(write_recipe(tmp_path, [src("f", remote, revision="unpinned: no hub here")]))  # says why the URL is unpinned
    assert card["sources"][0]["revision_resolved"] is None and len(rows) == 3


def test_a_config_on_a_builder_is_refused(tmp_path):
    """json/csv/... have no configurations: datasets took any config name (as a cache name) and read the same rows."""
    write_jsonl(tmp_path / "a.jsonl", qa_rows(3))
    path = write_recipe(tmp_path, [src("f", "a.jsonl", config="main")])
    with pytest.raises(DataError) as e:
        load_recipe(path)
    expected = f"{path}: sources[0].config: 'json' is a datasets builder with no configurations, so config 'main' would change no row"
    assert str(e.value).startswith(expected)
    load_recipe(write_recipe(tmp_path, [hub_source(config="main", revision=SHA)]))  # a hub dataset's config is read


def test_data_files_of_a_split_that_is_not_loaded_are_refused(tmp_path):
    """{train: a, test: b} with split train read b's file and hashed it in the card, and no row of it was kept."""
    write_jsonl(tmp_path / "a.jsonl", qa_rows(3))
    write_jsonl(tmp_path / "b.jsonl", qa_rows(2, "b"))
    path = write_recipe(tmp_path, [src("f", {"train": "a.jsonl", "extra": "b.jsonl"})])
    with pytest.raises(DataError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: sources[0].data_files.extra: split 'extra' is not loaded (split: train)")
    rows, card = run(tmp_path, [src("f", {"train": "a.jsonl", "extra": "b.jsonl"}, split="train[:2]+extra")])
    assert len(rows) == 4 and card["sources"][0]["rows_loaded"] == 4  # both named in split: both read


def test_unpinned_sources_load_one_resolved_commit_recorded_and_replayed(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append(kwargs["revision"])
        return datasets.Dataset.from_list(qa_rows(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(recipes.loading, "_hub_reachable", lambda timeout=0: True)
    monkeypatch.setattr(recipes.loading, "_resolve_revision", lambda dataset, timeout=0: "f" * 40)
    recipe = load_recipe(write_recipe(tmp_path, [hub_source(revision="unpinned: no hub here"), hub_source(name="p", revision=SHA)]))
    _, card = build(recipe)
    assert calls == ["f" * 40, SHA]  # the unpinned source loads the commit the hub named, not a moving head
    first, second = card["sources"]
    assert (first["revision"], first["revision_unpinned"], first["revision_resolved"]) == (None, "no hub here", "f" * 40)
    assert (second["revision"], second["revision_resolved"]) == (SHA, SHA)
    monkeypatch.setattr(recipes.loading, "_resolve_revision", lambda dataset, timeout=0: "e" * 40)  # the hub moved on
    calls.clear()
    _, again = build(recipe, revisions=recipes.card_revisions(card))
    assert calls == ["f" * 40, SHA] and again["rows_sha256"] == card["rows_sha256"]


def test_every_shipped_hub_source_pins_a_commit_or_says_why_not():
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        for s in load_recipe(path).sources:
            if recipes.schema._hub_dataset(s.dataset):
                assert (s.revision is None) != (s.revision_unpinned is None), (path.name, s.name)
                assert s.revision_unpinned is None or len(s.revision_unpinned) > 40, (path.name, s.name)


def test_every_pinned_shipped_source_is_recorded_in_the_cards_note():
    """A pinned commit names the card it was read from: data/recipes/CARDS.md holds each pinned dataset and sha."""
    cards = (RECIPES_DIR / "CARDS.md").read_text(encoding="utf-8")
    pinned = {(s.dataset, s.revision) for path in RECIPES_DIR.glob("*.yaml") for s in load_recipe(path).sources if s.revision}
    assert ("Muennighoff/natural-instructions", "a29a9757125f4bb1c26445ad0d2ef7d9b2cc9c4c") in pinned
    for dataset, revision in pinned:
        assert f"`{dataset}`" in cards and revision in cards, (dataset, revision)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["sources"][2].pop("license"), "sources[2].license: required"),
        (lambda r: r["sources"][0].update(wieght=2), "sources[0]: unknown key 'wieght' (did you mean 'weight'?)"),
        (lambda r: r["sources"][1].update(weight=0), "sources[1].weight: must be a number > 0"),
        (lambda r: r["sources"][1].update(max_rows=-3), "sources[1].max_rows: must be a positive integer"),
        (lambda r: r["sources"][0].update(fields={"instruction": "q", "response": "a"}), "sources[0].fields: keys"),
        (lambda r: r["sources"][0].pop("fields"), "sources[0].fields: required"),
        (lambda r: r["sources"][0].update(format="alpaca"), "sources[0].format: must be one of"),
        (lambda r: r["sources"][0].update(filter={"subject": {"nested": 1}}), "sources[0].filter.subject"),
        (lambda r: r["sources"][1].update(name="a"), "sources[1].name: 'a' is already the name of sources[0]"),
        (lambda r: r["sources"][0].pop("dataset"), "sources[0].dataset: required"),
        (lambda r: r.update(template="no-such-style"), "template: unknown prompt style"),
        (lambda r: r.update(dedup=True), "unknown key 'dedup' (did you mean 'dedupe'?)"),
        (lambda r: r.update(max_tokens="2k"), "max_tokens: must be a positive integer"),
        (lambda r: r.update(sources=[]), "sources: must be a non-empty list"),
        (lambda r: r.pop("name"), "name: required"),
    ],
)
def test_bad_recipe_fields_are_named(tmp_path, mutate, expected):
    raw = {"name": "bad", "sources": [src("a", "a.jsonl"), src("b", "a.jsonl"), src("c", "a.jsonl")]}
    mutate(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: ") or str(e.value).startswith(str(path))
    assert expected in str(e.value)


def test_bad_row_names_source_and_row(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(2) + [{"q": "no answer here", "a": None}] + qa_rows(1, "z"))
    with pytest.raises(DataError) as e:
        run(tmp_path, [src("good", "a.jsonl", max_rows=1), src("shaky", "a.jsonl")])
    msg = str(e.value)
    assert msg.startswith("shaky row 2: field 'output' must be a string") and "skip_bad_rows" in msg
    rows, card = run(tmp_path, [src("shaky", "a.jsonl", skip_bad_rows=True)])
    s = card["sources"][0]
    assert len(rows) == 3 and s["rows_skipped_bad"] == 1 and s["bad_rows_first"][0].startswith("shaky row 2:")
    with pytest.raises(DataError, match=r"'a'.*fields name column 'question'.*columns"):
        run(tmp_path, [src("a", "a.jsonl", fields={"instruction": "question", "output": "a"})])
    with pytest.raises(DataError, match=r"data file not found: .*missing\.jsonl"):
        run(tmp_path, [src("a", "missing.jsonl")])


def test_unreachable_hub_sources_are_listed_in_process(tmp_path, monkeypatch):
    """The hub probe failing switches datasets to cache-only: no retries, every missing source listed."""
    import datasets

    monkeypatch.setattr(recipes.loading, "_hub_offline_by_env", lambda: False)
    monkeypatch.setattr(recipes.loading, "_hub_reachable", lambda timeout=0: False)
    write_jsonl(tmp_path / "a.jsonl", qa_rows(2))
    sources = [
        src("local", "a.jsonl"),
        {
            "name": "hub1",
            "dataset": "nobody-xyz/first-set",
            "license": "mit",
            "revision": "unpinned: test",
            "fields": {"instruction": "q", "output": "a"},
        },
        {
            "name": "hub2",
            "dataset": "nobody-xyz/second-set",
            "config": "main",
            "license": "mit",
            "revision": "unpinned: test",
            "fields": {"prompt": "q", "response": "a"},
        },
    ]
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        run(tmp_path, sources)
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "2 of 3 sources could not be loaded" in msg and "unreachable" in msg
    assert "hub1 (nobody-xyz/first-set)" in msg and "hub2 (nobody-xyz/second-set, config main)" in msg
    assert "local (" not in msg and "dataset: json" in msg and "data_files:" in msg
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode was only switched on for the loading


def test_offline_cli_lists_every_unreachable_source(tmp_path):
    """For real: HF_DATASETS_OFFLINE=1, and a dead HF_ENDPOINT; one message, no traceback, no retry waits."""
    write_jsonl(tmp_path / "a.jsonl", qa_rows(3))
    recipe = write_recipe(
        tmp_path,
        [
            {
                "name": "dolly",
                "dataset": "databricks/databricks-dolly-15k",
                "license": "cc-by-sa-3.0",
                "revision": "unpinned: test",
                "fields": {"instruction": "instruction", "input": "context", "output": "response"},
            },
            src("local", "a.jsonl"),
            {
                "name": "gsm8k",
                "dataset": "openai/gsm8k",
                "config": "main",
                "license": "mit",
                "revision": "unpinned: test",
                "fields": {"instruction": "question", "output": "answer"},
            },
        ],
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    base.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2", PYTHONPATH=str(REPO))
    envs = {"offline": {**base, "HF_DATASETS_OFFLINE": "1"}, "dead_endpoint": {**base, "HF_ENDPOINT": "http://127.0.0.1:9"}}
    start = time.monotonic()
    procs = {
        label: subprocess.Popen(
            [sys.executable, "-m", "finetune.recipes", "--recipe", str(recipe), "--out_dir", str(tmp_path / label)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label, env in envs.items()
    }
    results = {label: (p.communicate(timeout=120), p.returncode) for label, p in procs.items()}
    assert time.monotonic() - start < 50  # the hub client's retry backoff alone would be 23 s per source
    for label, ((out, err), rc) in results.items():
        assert rc == 1, (label, out, err)
        assert "Traceback" not in err, (label, err)
        assert "error: recipe 't': 2 of 3 sources could not be loaded." in err, (label, err)
        assert "Hugging Face Hub is unreachable" in err
        assert "dolly (databricks/databricks-dolly-15k)" in err and "gsm8k (openai/gsm8k, config main)" in err
        assert "load_dataset('openai/gsm8k', 'main', split='train')" in err
        assert "dataset: json" in err and "data_files:" in err
        assert "local (" not in err
        assert not (tmp_path / label / "train.jsonl").exists()
    assert "offline mode is on" in results["offline"][0][1]
    assert "http://127.0.0.1:9" in results["dead_endpoint"][0][1]


# ----------------------------------------------------------------------------- cards, CLI, shipped recipes


def test_data_card_hashes_and_cli_output(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", qa_rows(6))
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", qa_rows(4, "b"))
    path = write_recipe(tmp_path, [src("a", "a.jsonl"), src("b", ["sub/b.jsonl"], weight=0.5)])
    rows, card = build(load_recipe(path))
    files = {**card["sources"][0]["data_files"], **card["sources"][1]["data_files"]}
    assert files == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "a.jsonl", tmp_path / "sub" / "b.jsonl")}
    assert card["rows_sha256"] == hashlib.sha256(rows_bytes(rows)).hexdigest()
    assert card["recipe_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["totals"]["rows"] == len(rows) == 8 and card["template"] == "qa" and card["seed"] == 1337
    for key in (
        "dataset",
        "config",
        "split",
        "revision",
        "license",
        "data_files",
        "rows_loaded",
        "rows_after_cap",
        "rows_after_weight",
        "rows_kept_after_dedupe_and_filters",
        "forced_eval_split",
    ):
        assert key in card["sources"][0]
    out = recipes.main(recipe=path, out_dir=tmp_path / "out")
    train = out / "train.jsonl"
    written = json.loads((out / "data_card.json").read_text())
    assert hashlib.sha256(train.read_bytes()).hexdigest() == written["rows_sha256"] == card["rows_sha256"]
    assert [json.loads(line) for line in train.read_text().splitlines()] == rows
    assert [dict(r, source=rows[i]["source"]) for i, r in enumerate(load_rows(train))] == rows  # finetune.data reads it


def test_cli_refuses_a_tokenizer_no_max_tokens_reads(tmp_path):
    """--tokenizer_dir counts tokens for max_tokens only; without it the tokenizer was loaded and never asked."""
    write_jsonl(tmp_path / "a.jsonl", qa_rows(3))
    path = write_recipe(tmp_path, [src("a", "a.jsonl")], max_chars=100)
    with pytest.raises(DataError) as e:
        recipes.main(recipe=path, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "no_tokenizer_read")
    assert str(e.value).startswith(f"--tokenizer_dir: {tmp_path / 'no_tokenizer_read'} would not be read: {path} sets no max_tokens")
    assert not (tmp_path / "out").exists()


def test_shipped_recipes_parse_and_avoid_eval_splits():
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    assert {p.name for p in paths} >= {"a100_mix.yaml", "rtx4090_mix.yaml", "tiny_local.yaml"}
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.template == "qa"
        for s in recipe.sources:
            assert not s.force_eval_split and eval_split_reason(s.dataset, s.config, s.split) is None, (path.name, s.name)
            assert s.license.strip(), (path.name, s.name)
    mix = load_recipe(RECIPES_DIR / "rtx4090_mix.yaml")
    datasets_used = {s.dataset for s in mix.sources}
    assert {
        "GAIR/lima",
        "databricks/databricks-dolly-15k",
        "OpenAssistant/oasst1",
        "cais/mmlu",
        "openai/gsm8k",
        "TIGER-Lab/MathInstruct",
        "abisee/cnn_dailymail",
        "knkarthick/samsum",
        "tasksource/bigbench",
    } <= datasets_used
    generated = ("math50k_camel", "college_math", "TheoremQA", "gsm_rft", "PoT/", "airoboros", "PRM-800K", "leetcode_ne")
    for name in ("rtx4090_mix.yaml", "a100_mix.yaml"):
        for s in load_recipe(RECIPES_DIR / name).sources:
            wanted = json.dumps(s.filter)
            assert not any(g in wanted for g in generated), (name, s.name, wanted)
    tiny = load_recipe(RECIPES_DIR / "tiny_local.yaml")
    assert tiny.sources[0].data_files == str(REPO / "data" / "generated" / "tiny" / "train.jsonl")


def test_tiny_local_builds_from_fresh_tiny_data(tmp_path):
    from core.tiny import build_tiny

    build_tiny(tmp_path / "tiny", tmp_path / "data")
    data_file = tmp_path / "data" / "train.jsonl"
    recipe = load_recipe(RECIPES_DIR / "tiny_local.yaml")
    recipe = dataclasses.replace(recipe, sources=[dataclasses.replace(recipe.sources[0], data_files=str(data_file))])
    rows, card = build(recipe)
    assert len(rows) == 3000 == card["sources"][0]["rows_loaded"] == card["totals"]["rows"]
    assert card["sources"][0]["data_files"] == {str(data_file): hashlib.sha256(data_file.read_bytes()).hexdigest()}
    assert {r["source"] for r in rows} == {"tiny_synthetic"}
    # the CLI with a real tokenizer for max_tokens (the tiny checkpoint's own)
    path = tmp_path / "tiny_tokens.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny_tokens",
                "max_tokens": 12,
                "sources": [
                    {
                        "name": "tiny",
                        "dataset": "json",
                        "data_files": "data/train.jsonl",
                        "license": "generated",
                        "fields": {"instruction": "instruction", "input": "input", "output": "output"},
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    out = recipes.main(recipe=path, out_dir=tmp_path / "out", tokenizer_dir=tmp_path / "tiny")
    card = json.loads((out / "data_card.json").read_text())
    s = card["sources"][0]
    assert s["rows_dropped_max_tokens"] > 0 and s["rows_kept_after_dedupe_and_filters"] == 3000 - s["rows_dropped_max_tokens"]
