"""The vetted Natural Instructions list is the script's output, names no evaluated set, and the recipes use it."""

import json
import re

from core.paths import REPO_ROOT
from core.run_specs import shipped_confs
from finetune import eval_guard
from finetune.recipes import build, load_recipe
from scripts import natural_instructions as ni


def test_the_shipped_list_is_the_scripts_output():
    kept, dropped = ni.vet(ni.upstream_tasks())
    assert ni.VETTED.read_text(encoding="utf-8") == ni.render(kept, dropped), "run: python -m scripts.natural_instructions"
    assert len(kept) + len(dropped) == len(ni.upstream_tasks()) == 593


def test_no_vetted_task_is_named_after_an_evaluated_set():
    tasks = [t for t in ni.VETTED.read_text().splitlines() if t and not t.startswith("#")]
    conf_tasks = set().union(*(re.findall(r'"big_bench:[^"]*?\btask=([^,"]+)', c.read_text()) for c in shipped_confs()))
    names = {n for b in (*eval_guard.SCENARIO_DATA.values(), *eval_guard.CLOSED_SET) for n in b.names}
    for task in tasks:
        words = set(task.split("_"))
        assert not any(eval_guard.holds_word(w, task) for w in conf_tasks | names), task
        assert not words & {"samsum", "strategyqa", "wsc", "mmlu", "gsm8k", "xsum", "bigbench"}, task
    # Tasks the upstream list kept that this challenge evaluates (closed set, BIG-bench) are gone.
    assert "task1572_samsum_summary" in ni.upstream_tasks() and "task1572_samsum_summary" not in tasks
    assert not [t for t in tasks if "strategyqa" in t]


def test_both_mixes_train_on_the_vetted_list():
    vetted = [t for t in ni.VETTED.read_text().splitlines() if t and not t.startswith("#")]
    for name in ("rtx4090_mix.yaml", "a100_mix.yaml"):
        source = next(s for s in load_recipe(REPO_ROOT / "data" / "recipes" / name).sources if s.name == "natural_instructions")
        assert source.filter == {"task_name": vetted} and source.license.startswith("apache-2.0")


def test_a_filter_file_keeps_listed_values_and_records_those_no_row_has(tmp_path):
    (tmp_path / "tasks.txt").write_text("# comment\ntask1_a\n\ntask3_c\ntask9_missing\n")
    rows = [
        {"task_name": f"task{i}_{c}", "definition": f"Do {c}.", "inputs": f"in {i}", "targets": f"out {i}"} for i, c in ((1, "a"), (2, "b"), (3, "c"))
    ]
    (tmp_path / "ni.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        "name: r\nsources:\n  - {name: ni, dataset: json, data_files: ni.jsonl, license: apache-2.0,"
        " filter: {task_name: {file: tasks.txt}}, fields: {instruction: definition, input: inputs, output: targets}}\n"
    )
    kept, card = build(load_recipe(tmp_path / "r.yaml"))
    assert sorted(r["input"] for r in kept) == ["in 1", "in 3"]
    assert card["sources"][0]["filter_values_unmatched"] == {"task_name": ["task9_missing"]}
