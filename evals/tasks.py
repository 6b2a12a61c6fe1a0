"""Eval tasks from local files, in the shapes HELM's scenarios read, turned into HELM-style requests.

- ``*.csv``: MMLU's own layout (``question,A,B,C,D,answer``, one question a row, a header row optional;
  HELM reads these very files). Prompted as HELM's MMLU adapter does: an instruction line, ``shots``
  solved examples from the head of the file (not scored), then ``Question: ...\\nA. ...\\nAnswer:``.
  Scored by the answer letter's logprob (each letter's continuation scored through ``/process`` with
  ``echo_prompt``), and by HELM's exact match of the one greedy token (``max_new_tokens`` 1, stop ``\\n``).
- ``*.jsonl`` with ``question`` and ``answer`` (``... #### 42``): GSM8K's layout. HELM's prompt
  (``Q: ...\\nA: ... The answer is 42.``, ``shots`` from the head of the file), greedy, 400 new
  tokens, stop ``\\n\\n``; scored by the final number.
- ``*.jsonl``/``*.json`` rows in a training shape (``instruction/input/output``, ``prompt/response``):
  a recipe's held-out rows. Rendered with the checkpoint's own template (``prompt_style.yaml``),
  greedy, stop at a blank line; exact match and ROUGE-L against ``output``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.jsonl import RowFileError, read_rows

LETTERS = "ABCDEFGHIJ"
MMLU_HEADER = ["question", "A", "B", "C", "D", "answer"]


class TaskError(ValueError):
    """A task file that cannot be read: the message names the file and line."""


@dataclass(frozen=True)
class Item:
    prompt: str
    gold: str  # a letter (multiple choice), a number (gsm) or the reference text
    choices: tuple[str, ...] = ()  # multiple choice: the letters offered


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "gsm" | "generation"
    items: list[Item]
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)


def _mmlu_block(question: str, options: list[str], answer: str | None) -> str:
    lines = [f"Question: {question}"] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def load_mmlu_csv(path: Path, shots: int) -> Task:
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not part of the header
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    start = 1 if rows and [c.strip() for c in rows[0]] == MMLU_HEADER else 0
    parsed = []
    for number, row in enumerate(rows[start:], start + 1):
        if len(row) < 4:
            raise TaskError(f"{path}:{number}: expected question, 2+ choices and an answer letter; got {len(row)} columns")
        question, options, answer = row[0], row[1:-1], row[-1].strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise TaskError(f"{path}:{number}: answer {row[-1]!r} is not one of {', '.join(LETTERS[: len(options)])}")
        parsed.append((question, options, answer))
    if len(parsed) <= shots:
        raise TaskError(f"{path}: {len(parsed)} questions leave none to score after {shots} shots (--shots)")
    subject = Path(path).stem.replace("_test", "").replace("_val", "").replace("_dev", "").replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    context = head + "".join(_mmlu_block(q, o, a) for q, o, a in parsed[:shots])
    items = [Item(context + _mmlu_block(q, o, None), a, tuple(LETTERS[: len(o)])) for q, o, a in parsed[shots:]]
    return Task(Path(path).stem, "multiple_choice", items, max_new_tokens=1, stop=["\n"])


def _read_rows(path: Path) -> list[dict]:
    """A .jsonl/.json task file's rows, read as training data is (``core.jsonl``); each must be an object."""
    try:
        rows = read_rows(path)
    except RowFileError as e:
        raise TaskError(str(e)) from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise TaskError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    return [row for _, row in rows]


def gsm_solution(answer: str) -> str:
    """GSM8K's ``reasoning\\n#### 42`` as HELM shows it in shots: calculator notes dropped, ``The answer is 42.``"""
    reasoning, _, number = answer.partition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return f"{reasoning} The answer is {number.strip()}."


def load_gsm(path: Path, rows: list[dict], shots: int) -> Task:
    from evals.scoring import final_number

    for number, r in enumerate(rows, 1):
        if "####" not in str(r.get("answer", "")):
            raise TaskError(f"{path}:{number}: a GSM8K answer ends with '#### <number>'")
    if len(rows) <= shots:
        raise TaskError(f"{path}: {len(rows)} problems leave none to score after {shots} shots (--shots)")
    context = "".join(f"Q: {r['question']}\nA: {gsm_solution(r['answer'])}\n\n" for r in rows[:shots])
    items = [Item(context + f"Q: {r['question']}\nA:", final_number(r["answer"]) or "") for r in rows[shots:]]
    return Task(Path(path).stem, "gsm", items, max_new_tokens=400, stop=["\n\n"])


def load_rows_task(path: Path, rows: list[dict], template, max_new_tokens: int) -> Task:
    items = []
    for number, r in enumerate(rows, 1):
        if "instruction" in r and "output" in r:
            prompt, gold = template.apply(r["instruction"], input=r.get("input", "")), r["output"]
        elif "prompt" in r and "response" in r:
            prompt, gold = template.apply(r["prompt"], input=""), r["response"]
        else:
            raise TaskError(f"{path}:{number}: a row needs instruction/output, prompt/response (or question/answer for GSM8K); keys: {sorted(r)}")
        items.append(Item(prompt, str(gold)))
    return Task(Path(path).stem, "generation", items, max_new_tokens=max_new_tokens, stop=["\n\n"])


def load_task(path: Path, shots: int, template, max_new_tokens: int = 128) -> Task:
    """One task file, by its shape; ``template``: the prompt style held-out rows are rendered with."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    if path.suffix == ".csv":
        return load_mmlu_csv(path, shots)
    if path.suffix not in (".jsonl", ".json"):
        raise TaskError(f"{path}: a task file is .csv (MMLU layout) or .jsonl/.json (GSM8K layout or training rows)")
    rows = _read_rows(path)
    if {"question", "answer"} <= rows[0].keys() and "instruction" not in rows[0]:
        return load_gsm(path, rows, shots)
    return load_rows_task(path, rows, template, max_new_tokens)
