"""The contamination guard refuses what HELM evaluates, as the shipped confs say, by id, mirror, hf:// file and name."""

import re
from pathlib import Path

import pytest

from core.paths import REPO_ROOT
from core.run_specs import shipped_confs
from finetune import eval_guard
from finetune.data import DataError
from finetune.recipes import load_recipe

FIXTURE_CONF = REPO_ROOT / "tests" / "fixtures" / "run_specs_full_coarse_600_budget.conf"
SHARED = Path("/work/shared/challenge")  # the workspace's copy of the organizers' files, where present
for parent in REPO_ROOT.parents:  # or shared/ beside any folder above the checkout
    if (parent / "shared" / "challenge").is_dir():
        SHARED = parent / "shared" / "challenge"
        break


def big_bench_tasks(conf: Path) -> set[str]:
    """Read independently of core.run_specs: every task= of a big_bench description."""
    return set(re.findall(r'"big_bench:[^"]*?\btask=([^,"]+)', conf.read_text()))


def refused(dataset, config=None, split="train", data_files=None, base=None) -> bool:
    return bool(eval_guard.reasons(dataset, config, split, data_files, base))


def test_the_shipped_confs_include_the_challenges_coarse_conf():
    assert shipped_confs(), "data/helm/*.conf is empty"
    assert big_bench_tasks(FIXTURE_CONF) <= eval_guard.evaluated().tasks.keys()
    assert len(eval_guard.evaluated().tasks) >= 18


@pytest.mark.parametrize("conf", [*shipped_confs(), FIXTURE_CONF], ids=lambda p: p.name)
def test_every_big_bench_task_of_every_conf_is_refused_in_every_split_and_mirror(conf):
    tasks = big_bench_tasks(conf)
    assert tasks
    for task in tasks:
        for split in ("train", "validation", "default", "train[:10%]"):
            assert refused("tasksource/bigbench", task, split), (task, split)
        assert refused("google/bigbench", task)
        assert refused("json", data_files=f"hf://datasets/tasksource/bigbench/{task}/train-00000-of-00001.parquet")
        assert refused("json", data_files=f"data/bigbench/{task}.jsonl")


@pytest.mark.skipif(not (SHARED / "run_specs_full_coarse_600_budget.conf").is_file(), reason="shared/challenge is not present")
def test_the_organizers_conf_is_covered():
    assert big_bench_tasks(SHARED / "run_specs_full_coarse_600_budget.conf") <= eval_guard.evaluated().tasks.keys()
    scenarios = set(re.findall(r'description: "([a-z_]+):', (SHARED / "run_specs_full_coarse_600_budget.conf").read_text()))
    assert scenarios <= eval_guard.evaluated().scenarios.keys()


@pytest.mark.skipif(not (SHARED / "README.md").is_file(), reason="shared/challenge is not present")
def test_the_closed_set_is_the_one_the_challenge_names():
    readme = (SHARED / "README.md").read_text()
    closed = " ".join(readme[readme.index("closed set ~") :].split("\n")[:2])
    for word in ("sam_sum", "corr2cause", "ETHICS", "MATH", "CNN/DM"):
        assert word in closed
    labels = " ".join(b.label for b in eval_guard.CLOSED_SET)
    assert all(w in labels for w in ("SAMSum", "corr2cause", "ETHICS", "MATH", "CNN/DailyMail"))


def test_the_tasks_the_old_list_let_through_are_refused():
    # The list: in the conf, not in the hand-typed list this guard replaced.
    for task in (
        "auto_debugging",
        "code_line_description",
        "conceptual_combinations",
        "formal_fallacies_syllogisms_negation",
        "linguistics_puzzles",
        "logic_grid_puzzle",
        "novel_concepts",
        "operators",
        "play_dialog_same_or_different",
        "repeat_copy_logic",
        "strategyqa",
        "symbol_interpretation",
        "vitaminc_fact_verification",
        "winowhy",
    ):
        assert refused("tasksource/bigbench", task), task
    assert not refused("tasksource/bigbench", "navigate") and not refused("tasksource/bigbench", "date_understanding")


def test_big_bench_hard_subsets_of_evaluated_tasks_are_refused():
    assert refused("lukaemon/bbh", "formal_fallacies", "test")
    assert refused("maveriq/bigbenchhard", "logical_deduction_five_objects")
    assert not refused("lukaemon/bbh", "navigate", "test")


@pytest.mark.parametrize(
    "dataset, config, split",
    [
        ("lighteval/mmlu", "abstract_algebra", "test"),
        ("EleutherAI/hendrycks_ethics", "justice", "test"),
        ("EleutherAI/truthful_qa_binary", None, "validation"),
        ("lighteval/bbq_helm", "all", "train"),
        ("someone/mmlu-copy", None, "test"),  # named like MMLU
        ("someone/gsm8k_mirror", "main", "test"),
    ],
)
def test_mirrors_and_look_alikes_are_refused(dataset, config, split):
    assert refused(dataset, config, split)


@pytest.mark.parametrize(
    "files, is_refused",
    [
        ("hf://datasets/cais/mmlu/all/test-00000-of-00001.parquet", True),
        ("hf://datasets/cais/mmlu@c30699e/abstract_algebra/dev-00000-of-00001.parquet", True),
        ("https://huggingface.co/datasets/cais/mmlu/resolve/main/all/validation-00000-of-00001.parquet", True),
        ("hf://datasets/cais/mmlu/auxiliary_train/train-00000-of-00001.parquet", False),
        ("hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet", True),
        ("hf://datasets/openai/gsm8k/main/train-00000-of-00001.parquet", False),
        ({"train": ["hf://datasets/heegyu/bbq/data/Age.jsonl"]}, True),  # BBQ: every split
        ("hf://datasets/knkarthick/samsum/test.csv", True),
        ("mmlu/test/abstract_algebra_test.csv", True),  # HELM's own MMLU layout, under the recipe's folder
        ("mmlu/val/anatomy_val.csv", True),
        ("gsm8k.jsonl", True),  # no split in the name: cannot be told from GSM8K test
        ("gsm8k_train.jsonl", False),
        ("lima/train.jsonl", False),
    ],
)
def test_data_files_are_judged_by_their_path(tmp_path, files, is_refused):
    assert refused("json", data_files=files, base=tmp_path) == is_refused


def test_a_conf_with_an_unknown_scenario_is_an_error_naming_its_line(tmp_path):
    conf = tmp_path / "x.conf"
    conf.write_text('entries: [\n# a comment\n{description: "new_scenario:model=neurips/local", priority: 1}\n]\n')
    with pytest.raises(ValueError, match=r"x.conf:3: HELM scenario 'new_scenario' is evaluated.*SCENARIO_DATA"):
        eval_guard.reasons("json", None, "train", confs=(conf,))


def test_a_recipe_naming_an_evaluated_task_is_refused_and_the_shipped_ones_name_none(tmp_path):
    tasks = set().union(*(big_bench_tasks(c) for c in shipped_confs()))
    for name in ("rtx4090_mix.yaml", "a100_mix.yaml"):
        recipe = load_recipe(REPO_ROOT / "data" / "recipes" / name)
        configs = {s.config for s in recipe.sources if "bigbench" in s.dataset}
        assert configs and not configs & tasks, (name, configs & tasks)
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nsources:\n  - {name: w, dataset: tasksource/bigbench, config: winowhy, license: apache-2.0, revision: 'unpinned: t',"
        " fields: {instruction: inputs, output: 'targets[0]'}}\n"
        "  - {name: m, dataset: json, data_files: 'hf://datasets/cais/mmlu/all/test-*.parquet', license: mit, revision: 'unpinned: t',"
        " fields: {instruction: question, output: answer}}\n"
    )
    with pytest.raises(DataError, match=r"(?s)sources\[0\] 'w': BIG-bench task winowhy.*run_specs_challenge.conf:\d+.*sources\[1\] 'm': MMLU"):
        load_recipe(path)
