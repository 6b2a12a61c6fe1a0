"""The contamination guard: which data sources the challenge's HELM evaluation draws its test instances from.

What is evaluated is derived from the HELM run-spec confs this repository ships (``data/helm/*.conf``,
the confs ``make helm`` runs): every scenario they name, and for BIG-bench every task. What this file
adds by hand is only what a conf cannot say: where each HELM scenario's data lives on the hub (the
dataset and its known mirrors), which of its splits HELM evaluates, and the names that identify it in
a file path. A conf that names a scenario missing here is an error, so a new conf cannot slip past.
The closed (hidden) set ships no conf; its scenarios are the ones the challenge names
(shared/challenge/README.md: SAMSum, corr2cause, ETHICS, MATH, CNN/DM).

A source is matched three ways:
- by dataset id: the benchmark's own id or a known mirror (``cais/mmlu``, ``lighteval/mmlu``, ...);
- by data files: ``hf://datasets/<id>/...`` and ``https://huggingface.co/datasets/<id>/resolve/...``
  name their dataset and file; the split is read from the file name (``test-00000-of-00001.parquet``);
- by name: a dataset id or a data file path holding a benchmark's name (``mmlu``, ``gsm8k``, a BIG-bench
  task such as ``winowhy``) as a word, with the split read from the path (``mmlu/test/x_test.csv``).
  A path with no split word is refused unless the benchmark's every split is evaluated anyway.

HELM's BIG-bench scenario shuffles ALL of a task's examples (seed 0) and carves its own test set, so
every split of an evaluated task leaks, in any mirror, and so do BIG-Bench Hard's subsets of those
tasks (``formal_fallacies``, ``logical_deduction_five_objects``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from core.run_specs import HELM_CONF_DIR, read_conf, shipped_confs


@dataclass(frozen=True)
class Benchmark:
    """Where a HELM scenario's instances come from."""

    label: str
    hub_ids: tuple[str, ...]  # the dataset and its known mirrors on the Hugging Face Hub
    splits: frozenset[str] | None  # the splits HELM draws from; None: every split (HELM re-splits the whole set)
    names: tuple[str, ...]  # words that identify it in a dataset id or a file path
    per_task: bool = False  # BIG-bench: only the configurations named after an evaluated task


def _b(label: str, hub_ids: tuple[str, ...], splits: tuple[str, ...] | None, names: tuple[str, ...], per_task: bool = False) -> Benchmark:
    return Benchmark(label, tuple(i.lower() for i in hub_ids), None if splits is None else frozenset(splits), names, per_task)


_MMLU_SPLITS = ("test", "validation", "dev")  # test is evaluated, dev holds HELM's 5 shots; validation too, to be safe
_BBH_MIRRORS = ("lukaemon/bbh", "maveriq/bigbenchhard", "Joschka/big_bench_hard")

# HELM scenario name (the part of a run entry before ':') -> where its data lives.
SCENARIO_DATA: dict[str, Benchmark] = {
    "mmlu": _b(
        "MMLU",
        ("cais/mmlu", "hendrycks_test", "lukaemon/mmlu", "tasksource/mmlu", "hails/mmlu_no_train", "lighteval/mmlu"),
        _MMLU_SPLITS,
        ("mmlu", "hendrycks_test"),
    ),
    "truthful_qa": _b(
        "TruthfulQA",
        ("truthful_qa", "truthfulqa/truthful_qa", "EleutherAI/truthful_qa_mc", "EleutherAI/truthful_qa_binary", "lighteval/truthfulqa_helm"),
        None,
        ("truthful_qa", "truthfulqa"),
    ),
    "gsm": _b("GSM8K", ("gsm8k", "openai/gsm8k"), ("test",), ("gsm8k",)),
    "summarization_cnndm": _b(
        "CNN/DailyMail", ("cnn_dailymail", "abisee/cnn_dailymail", "ccdv/cnn_dailymail"), ("test",), ("cnn_dailymail", "cnndm")
    ),
    "bbq": _b("BBQ", ("heegyu/bbq", "lighteval/bbq_helm", "Elfsong/BBQ"), None, ("bbq",)),
    "big_bench": _b(
        "BIG-bench", ("tasksource/bigbench", "bigbench", "google/bigbench", *_BBH_MIRRORS), None, ("bigbench", "big_bench", "bbh"), per_task=True
    ),
}
# The closed set (no conf ships; shared/challenge/README.md names its scenarios).
CLOSED_SET: tuple[Benchmark, ...] = (
    _b("SAMSum (closed set)", ("samsum", "Samsung/samsum", "knkarthick/samsum"), ("test",), ("samsum",)),
    _b("corr2cause (closed set)", ("causalnlp/corr2cause", "causal-nlp/corr2cause"), ("test",), ("corr2cause",)),
    _b("ETHICS (closed set)", ("hendrycks/ethics", "lighteval/hendrycks_ethics", "EleutherAI/hendrycks_ethics"), ("test",), ("hendrycks_ethics",)),
    _b(
        "MATH (closed set)",
        ("hendrycks/competition_math", "competition_math", "lighteval/MATH", "EleutherAI/hendrycks_math"),
        ("test",),
        ("competition_math", "hendrycks_math"),
    ),
    _b("CNN/DailyMail (closed set)", SCENARIO_DATA["summarization_cnndm"].hub_ids, ("test",), ("cnn_dailymail", "cnndm")),
)

SPLIT_WORDS = {
    "test": "test",
    "testing": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "dev",
    "train": "train",
    "training": "train",
}
_HF_FILE = re.compile(r"^(?:hf://datasets/|https?://huggingface\.co/datasets/)([^/@]+/[^/@]+)(?:@[^/]+)?/(?:(?:resolve|blob)/[^/]+/)?(.*)$")


@dataclass(frozen=True)
class Evaluated:
    """What the shipped confs evaluate: scenarios (with the conf line that names each) and BIG-bench tasks."""

    scenarios: dict[str, str]  # scenario -> "data/helm/x.conf:12"
    tasks: dict[str, str]  # BIG-bench task -> "data/helm/x.conf:20"


def evaluated(confs: tuple[Path, ...] | None = None) -> Evaluated:
    """Scenarios and BIG-bench tasks of ``confs`` (default: every shipped ``data/helm/*.conf``)."""
    return _evaluated(tuple(confs) if confs is not None else tuple(shipped_confs()))


@lru_cache(maxsize=8)
def _evaluated(confs: tuple[Path, ...]) -> Evaluated:
    if not confs:
        raise FileNotFoundError(f"no HELM run-spec conf in {HELM_CONF_DIR}: the contamination guard derives what is evaluated from them")
    scenarios: dict[str, str] = {}
    tasks: dict[str, str] = {}
    for conf in confs:
        for e in read_conf(conf):
            where = f"{_rel(e.conf)}:{e.line}"
            if e.scenario not in SCENARIO_DATA:
                raise ValueError(
                    f"{where}: HELM scenario {e.scenario!r} is evaluated, but finetune/eval_guard.py does not know where its data "
                    f"lives; add it to SCENARIO_DATA (known: {', '.join(sorted(SCENARIO_DATA))})"
                )
            scenarios.setdefault(e.scenario, where)
            if e.scenario == "big_bench":
                if not e.args.get("task"):
                    raise ValueError(f"{where}: big_bench run entry without task=")
                tasks.setdefault(e.args["task"].lower(), where)
    return Evaluated(scenarios, tasks)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(HELM_CONF_DIR.parents[1]))
    except ValueError:
        return str(path)


def _benchmarks(ev: Evaluated) -> list[tuple[Benchmark, str]]:
    """(benchmark, why it is evaluated) for every evaluated scenario and the closed set."""
    return [(SCENARIO_DATA[s], where) for s, where in ev.scenarios.items()] + [(b, "the challenge's closed set") for b in CLOSED_SET]


def holds_word(name: str, text: str) -> bool:
    """Whether ``text`` holds ``name`` as a word (letters and digits do not continue it on either side)."""
    return re.search(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])", text.lower()) is not None


def _task_of_config(config: str | None, tasks: dict[str, str]) -> str | None:
    """The evaluated task a configuration holds: the task itself, a subtask, or a BIG-Bench Hard subset of it."""
    c = (config or "").lower()
    for t in tasks:
        if c and (c == t or c.startswith(t + "_") or t.startswith(c + "_")):
            return t
    return None


def _task_in_text(text: str, tasks: dict[str, str]) -> str | None:
    return next((t for t in tasks if holds_word(t, text)), None)


def _split_words(text: str) -> set[str]:
    return {SPLIT_WORDS[w] for w in re.split(r"[^a-z0-9]+", text.lower()) if w in SPLIT_WORDS}


def _split_names(split: str) -> set[str]:
    """``train[:10%]+test`` -> {train, test}."""
    return {re.sub(r"\[.*?\]$", "", part.strip()).strip().lower() for part in split.split("+")}


def _verdict(b: Benchmark, why: str, what: str, splits: set[str] | None, task: str | None, ev: Evaluated) -> str | None:
    """The refusal for ``what`` (splits None: unknown) against benchmark ``b``, or None when it is not evaluated."""
    if b.per_task:
        if task is None:
            return None
        why = ev.tasks[task]
        return f"{b.label} task {task}: {what} (every split: HELM draws its test instances from all of a task's examples; {why})"
    if b.splits is None:
        return f"{b.label}: {what} (HELM evaluates every split; {why})"
    if splits is None or not splits:
        return f"{b.label}: {what} names no split (train/validation/test) and HELM evaluates {'/'.join(sorted(b.splits))}; {why}"
    hit = splits & b.splits
    return f"{b.label}: {what}, split {'/'.join(sorted(hit))} ({why})" if hit else None


def _file_tail(path: str, base: Path | None) -> str:
    """The part of a local path that names it: relative to the recipe's folder, else its last three components."""
    p = Path(path)
    if base is not None:
        try:
            return p.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return PurePosixPath(*p.parts[-3:]).as_posix() if p.parts else path


def reasons(
    dataset: str, config: str | None, split: str, data_files=None, base: Path | None = None, confs: tuple[Path, ...] | None = None
) -> list[str]:
    """Why a recipe source would train on evaluated data; empty when it would not.

    ``data_files``: a path/URL, a list, or {split: ...} as ``datasets.load_dataset`` takes them; ``base``:
    the recipe's folder (local paths are judged by their part below it).
    """
    ev = evaluated(confs)
    out: list[str] = []
    ds = dataset.strip().strip("/").lower()
    for b, why in _benchmarks(ev):
        if ds in b.hub_ids:
            task = _task_of_config(config, ev.tasks) if b.per_task else None
            r = _verdict(b, why, f"{dataset}" + (f" (config {config})" if config else "") + f" split {split}", _split_names(split), task, ev)
        elif any(holds_word(n, ds) for n in b.names):
            task = (_task_of_config(config, ev.tasks) or _task_in_text(ds, ev.tasks)) if b.per_task else None
            r = _verdict(
                b,
                why,
                f"{dataset} (named like {b.label})" + (f" config {config}" if config else "") + f" split {split}",
                _split_names(split),
                task,
                ev,
            )
        else:
            r = None
        if r:
            out.append(r)
    for f in _flat(data_files):
        out += _file_reasons(f, base, ev)
    if not out and ds not in {i for b, _ in _benchmarks(ev) for i in b.hub_ids} and (task := _task_in_text(ds, ev.tasks)):
        out.append(_verdict(SCENARIO_DATA["big_bench"], "", f"dataset {dataset} (named after the task)", None, task, ev))
    return list(dict.fromkeys(out))


def _file_reasons(f: str, base: Path | None, ev: Evaluated) -> list[str]:
    m = _HF_FILE.match(f)
    hub_id, inner = (m.group(1).lower(), m.group(2)) if m else (None, _file_tail(f, base) if "://" not in f else f)
    text = f"{hub_id or ''}/{inner}"
    splits = _split_words(PurePosixPath(inner).as_posix())
    out = []
    for b, why in _benchmarks(ev):
        named = hub_id in b.hub_ids if hub_id else False
        if not (named or any(holds_word(n, text) for n in b.names)):
            continue
        task = _task_in_text(inner, ev.tasks) or _task_of_config(PurePosixPath(inner).parts[0] if inner else None, ev.tasks) if b.per_task else None
        if r := _verdict(b, why, f"data file {f}", splits, task, ev):
            out.append(r)
    if not out and (task := _task_in_text(inner, ev.tasks)):  # a BIG-bench task's own file, wherever it lives
        out.append(_verdict(SCENARIO_DATA["big_bench"], "", f"data file {f} (named after the task)", None, task, ev))
    return out


def _flat(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _flat(v)]
    return [str(f) for f in data_files]
