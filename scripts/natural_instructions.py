"""The vetted Natural Instructions task list the recipes train on: derived, then written with its reasons.

    python -m scripts.natural_instructions            # rewrites data/natural_instructions/vetted_tasks.txt

Start: ``train_tasks_dehelm.txt``, the Natural Instructions authors' own English training split with
the tasks that overlap HELM's scenarios removed (allenai/natural-instructions, splits/default/, copied
verbatim at commit ``UPSTREAM_COMMIT``; 593 tasks). That list predates this challenge's closed set and
BIG-bench subset, so on top of it every task is left out whose name holds, as a word:
- a name the contamination guard matches benchmarks by (``finetune.eval_guard``: mmlu, gsm8k, samsum,
  cnn_dailymail, bbq, truthfulqa, bigbench, ...);
- a BIG-bench task that the shipped HELM confs evaluate (strategyqa, winowhy, ...), derived from the confs;
- a dataset an evaluated set was built from, or a look-alike of one (``SOURCE_WORDS`` below, each with why).
Task names in Natural Instructions are ``task<N>_<source dataset>_<what>``, so the source dataset is
in the name; that is what makes a name-based vetting meaningful. ``tests/test_natural_instructions.py``
checks that the shipped list is this script's output.
"""

from __future__ import annotations

from pathlib import Path

from core.paths import DATA_DIR
from finetune import eval_guard

NI_DIR = DATA_DIR / "natural_instructions"
UPSTREAM = NI_DIR / "train_tasks_dehelm.txt"
UPSTREAM_COMMIT = "433c58865b2d6ffc07ed883942beceb007380883"
VETTED = NI_DIR / "vetted_tasks.txt"

# Words naming a dataset that an evaluated set was built from (or that is too close to one to keep).
SOURCE_WORDS: dict[str, str] = {
    "wsc": "BIG-bench winowhy (evaluated) is built on the Winograd Schema Challenge's sentences",
    "mwsc": "a Winograd Schema Challenge variant (see wsc)",
    "winograd": "see wsc",
    "vitaminc": "BIG-bench vitaminc_fact_verification (evaluated) is VitaminC",
    "xsum": "HELM's XSum summarization scenario (not in the challenge's confs; left out as a look-alike of its summarization)",
    "extreme_abstract_summarization": "XSum ('extreme summarization') under another name",
    "ethics": "ETHICS (closed set)",
    "truthful": "TruthfulQA",
    "gsm": "GSM8K",
    "mathdataset": "a 'math dataset' task: left out rather than checked against MATH (closed set)",
}


def exclusion_words() -> dict[str, str]:
    """Word -> why it excludes a task: the guard's benchmark names, the confs' BIG-bench tasks, SOURCE_WORDS."""
    words = {}
    for b in (*eval_guard.SCENARIO_DATA.values(), *eval_guard.CLOSED_SET):
        for name in b.names:
            words.setdefault(name, f"{b.label} (finetune.eval_guard)")
    for task, where in eval_guard.evaluated().tasks.items():
        words.setdefault(task, f"BIG-bench task evaluated by HELM ({where})")
    for word, why in SOURCE_WORDS.items():
        words.setdefault(word, why)
    return words


def vet(tasks: list[str]) -> tuple[list[str], dict[str, str]]:
    """(kept tasks in upstream order, {left-out task: why})."""
    words = exclusion_words()
    kept, dropped = [], {}
    for task in tasks:
        hit = next((w for w in words if eval_guard.holds_word(w, task)), None)
        if hit is None:
            kept.append(task)
        else:
            dropped[task] = f"{hit!r}: {words[hit]}"
    return kept, dropped


def upstream_tasks(path: Path = UPSTREAM) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def render(kept: list[str], dropped: dict[str, str]) -> str:
    """The vetted list with a header saying where it came from and every task left out, with why."""
    header = [
        "# Natural Instructions tasks the recipes train on (filter: {task_name: {file: ...}}).",
        "# Written by `python -m scripts.natural_instructions` from train_tasks_dehelm.txt (allenai/natural-instructions",
        f"# splits/default/ at {UPSTREAM_COMMIT}, {len(kept) + len(dropped)} tasks): do not edit by hand.",
        f"# {len(kept)} kept; {len(dropped)} left out because their name holds a word of an evaluated set:",
        *(f"#   {task}: {why}" for task, why in dropped.items()),
    ]
    return "\n".join(header + kept) + "\n"


def main(out: Path = VETTED) -> Path:
    """Write the vetted task list (default: data/natural_instructions/vetted_tasks.txt).

    Args:
        out: where to write it.
    """
    kept, dropped = vet(upstream_tasks())
    Path(out).write_text(render(kept, dropped), encoding="utf-8")
    print(f"{len(kept)} tasks kept, {len(dropped)} left out -> {out}")
    return Path(out)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
