"""A small instruction dataset the repo generates itself: synthetic tasks with exact answers.

No license questions, no hub, and a held-out split with exact-match scoring, so the demo can show
that finetuning really teaches the tiny model something. Every task needs the model to read the
input (a copy, a digit comparison, a parity check) rather than memorize answers, and the held-out
split never repeats a training input.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "apple banana cherry grape lemon mango melon orange peach pear plum cat dog horse cow sheep goat "
    "duck goose rabbit mouse fox wolf bear deer owl eagle red green blue yellow violet hammer saw drill "
    "ladder brush river bridge market baker library stone water light bread cheese fish flower"
).split()

Example = dict[str, str]


def _parity(rng: random.Random) -> Example:
    n = rng.randrange(0, 10_000)
    return {"instruction": f"Is {n} even or odd?", "input": "", "output": "even" if n % 2 == 0 else "odd"}


def _larger(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 100), 2)
    return {"instruction": f"Which number is larger, {a} or {b}?", "input": "", "output": str(max(a, b))}


def _repeat(rng: random.Random) -> Example:
    words = " ".join(rng.sample(WORDS, 3))
    return {"instruction": "Repeat the words exactly.", "input": words, "output": words}


TASKS: dict[str, Callable[[random.Random], Example]] = {"parity": _parity, "larger": _larger, "repeat": _repeat}


def generate(n_train: int = 3000, n_test: int = 150, seed: int = 1337) -> tuple[list[Example], list[Example]]:
    """Deterministic train and held-out splits, tasks interleaved evenly; no held-out input is in train."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    splits: list[list[Example]] = []
    for size in (n_test, n_train):
        split: list[Example] = []
        while len(split) < size:
            name = list(TASKS)[len(split) % len(TASKS)]
            ex = TASKS[name](rng)
            key = (ex["instruction"], ex["input"])
            if key in seen:
                continue
            seen.add(key)
            split.append({**ex, "task": name})
        splits.append(split)
    test, train = splits
    return train, test


def write_jsonl(rows: list[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def exact_match(prediction: str, answer: str) -> bool:
    """The answer must be the whole first line of the prediction, up to surrounding spaces."""
    return prediction.strip().split("\n")[0].strip() == answer.strip()
