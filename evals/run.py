"""``python -m evals``: score a checkpoint (or a running server) on local task files; a table and JSON.

    python -m evals --checkpoint_dir checkpoints/tiny-lora --tasks data/generated/tiny/test.jsonl
    python -m evals --url http://127.0.0.1:8080 --tasks mmlu/test/anatomy_test.csv gsm8k_test.jsonl --out out/eval.json

Every request goes through the server's ``/process`` contract, exactly as HELM's ``neurips/local``
client sends it: with ``--checkpoint_dir`` the real app and engine are built in this process (what
``make serve`` runs), with ``--url`` a server already running is asked. ``evals.tasks`` says how each
file shape is prompted and scored; ``evals.scoring`` how the intervals are computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from evals.scoring import bootstrap, final_number, normalize, rouge_l, wilson
from evals.tasks import Item, Task, TaskError, load_task

GREEDY = 1e-7  # what HELM sends for temperature 0
PRIMARY = {"multiple_choice": "accuracy", "gsm": "exact_match", "generation": "exact_match"}


class EvalError(RuntimeError):
    """The server refused or failed a request: the message names the task, item and status."""


@contextmanager
def in_process(checkpoint_dir: Path, device: str = "auto", engine: str = "auto") -> Iterator[Any]:
    """A client of the real app over ``checkpoint_dir``: the engine ``python -m server`` would pick."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.engine import make_engine
    from server.loading import load_generator

    generator = load_generator(checkpoint_dir, device=device)
    with TestClient(create_app(make_engine(generator, engine), generator.codec)) as client:
        yield client


@contextmanager
def over_http(url: str, timeout: float = 600.0) -> Iterator[Any]:
    import httpx

    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
        yield client


def _post(client, body: dict, where: str) -> dict:
    response = client.post("/process", json=body)
    if response.status_code != 200:
        raise EvalError(f"{where}: /process answered {response.status_code}: {response.text[:300]}")
    return response.json()


def continuation_logprob(client, prompt: str, continuation: str, where: str) -> float:
    """log P(continuation | prompt): the echoed tokens covering the continuation's characters, summed.

    Counted from the end, so a prompt the server left-truncated to fit its window still scores right.
    """
    body = {"prompt": prompt + continuation, "echo_prompt": True, "max_new_tokens": 0, "temperature": GREEDY, "top_k_per_token": 0}
    tokens = _post(client, body, where)["tokens"]
    covered, total = 0, 0.0
    for token in reversed(tokens):
        if covered >= len(continuation):
            break
        covered += len(token["text"])
        total += token["logprob"]
    return total


def generate(client, task: Task, item: Item, where: str) -> str:
    body = {
        "prompt": item.prompt,
        "temperature": GREEDY,
        "max_new_tokens": task.max_new_tokens,
        "stop_sequences": task.stop,
        "top_k_per_token": 1,
        "num_return_sequences": 1,
        "echo_prompt": False,
    }
    return _post(client, body, where)["text"]


def score_item(client, task: Task, index: int) -> dict:
    item, where = task.items[index], f"{task.name} item {index}"
    text = generate(client, task, item, where)
    if task.kind == "multiple_choice":
        letters = {c: continuation_logprob(client, item.prompt, f" {c}", where) for c in item.choices}
        chosen = max(letters, key=letters.get)
        return {
            "gold": item.gold,
            "output": text,
            "letter_logprobs": letters,
            "chosen": chosen,
            "accuracy": float(chosen == item.gold),
            "exact_match": float(text.strip() == item.gold),
        }
    if task.kind == "gsm":
        return {"gold": item.gold, "output": text, "exact_match": float(final_number(text) == item.gold and item.gold != "")}
    return {"gold": item.gold, "output": text, "exact_match": float(normalize(text) == normalize(item.gold)), "rouge_l": rouge_l(text, item.gold)}


def summarize(task: Task, results: list[dict]) -> dict:
    n = len(results)
    metrics = {}
    for name in ("accuracy", "exact_match"):
        if results and name in results[0]:
            k = int(sum(r[name] for r in results))
            lo, hi = wilson(k, n)
            metrics[name] = {"value": k / n if n else math.nan, "ci95": [lo, hi], "interval": "wilson"}
    if results and "rouge_l" in results[0]:
        values = [r["rouge_l"] for r in results]
        lo, hi = bootstrap(values)
        metrics["rouge_l"] = {"value": sum(values) / n, "ci95": [lo, hi], "interval": "bootstrap"}
    return {"kind": task.kind, "n": n, "primary": PRIMARY[task.kind], "metrics": metrics}


def evaluate(client, tasks: list[Task], threads: int = 4) -> dict:
    """Score every item of every task (``threads`` requests in flight, as helm-run's default); per-task summaries."""
    out = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for task in tasks:
            results = list(pool.map(lambda i, t=task: score_item(client, t, i), range(len(task.items))))
            out[task.name] = {**summarize(task, results), "items": results}
    return out


def overall(scores: dict) -> float:
    """The mean of each task's primary metric: what ``--eval.score_interval`` ranks checkpoints by."""
    values = [t["metrics"][t["primary"]]["value"] for t in scores.values()]
    return sum(values) / len(values) if values else math.nan


def table(scores: dict) -> str:
    lines = [f"{'task':<28} {'kind':<16} {'n':>5}  {'metric':<12} {'score':>7}  95% interval"]
    for name, t in scores.items():
        for metric, m in t["metrics"].items():
            star = "*" if metric == t["primary"] else " "
            lines.append(
                f"{name:<28} {t['kind']:<16} {t['n']:>5}  {metric + star:<12} {m['value']:>7.1%}  "
                f"[{m['ci95'][0]:.1%}, {m['ci95'][1]:.1%}] ({m['interval']})"
            )
    lines.append(f"overall (mean of the * metrics): {overall(scores):.1%}")
    return "\n".join(lines)


SHOTS, MAX_NEW_TOKENS = 5, 128  # main's defaults


def refuse_unread(loaded: list[Task], url: str | None, shots: int, template: str | None, max_new_tokens: int, device: str, engine: str) -> None:
    """An option none of these tasks (or a server already running) reads, set all the same, is refused naming it."""
    if url is not None and (device, engine) != ("auto", "auto"):
        name = "device" if device != "auto" else "engine"
        raise SystemExit(f"error: --{name}: sets up the checkpoint served in this process; the server at {url} runs as it was started, drop it")
    kinds = {t.kind for t in loaded}
    if "generation" not in kinds and (template is not None or max_new_tokens != MAX_NEW_TOKENS):
        name = "template" if template is not None else "max_new_tokens"
        raise SystemExit(
            f"error: --{name}: only row tasks (instruction/output) read it, and none of --tasks is one (MMLU and GSM8K use HELM's prompts)"
        )
    if kinds == {"generation"} and shots != SHOTS:
        raise SystemExit("error: --shots: only MMLU and GSM8K tasks put solved examples in front, and every one of --tasks is rows")


def main(
    tasks: list[Path],
    checkpoint_dir: Path | None = None,
    url: str | None = None,
    shots: int = SHOTS,
    max_items: int | None = None,
    template: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    threads: int = 4,
    device: str = "auto",
    engine: Literal["auto", "batched", "serial"] = "auto",
    out: Path | None = None,
) -> dict:
    """Score a model on local task files through the server's /process contract; prints a table, writes JSON.

    Args:
        tasks: task files: MMLU-layout .csv, GSM8K-layout .jsonl, or rows (instruction/input/output) such
            as a recipe's held-out rows (see evals/tasks.py).
        checkpoint_dir: a checkpoint to serve in this process (merged, base, or an unmerged run directory).
        url: a server already running (make serve), instead of checkpoint_dir.
        shots: solved examples, from the head of each MMLU/GSM8K file, put in front of every prompt (not scored);
            refused when every task is rows.
        max_items: score at most this many items per task (the first ones after the shots).
        template: prompt style for row tasks; default the checkpoint's own (prompt_style.yaml), else qa. Refused
            without a row task.
        max_new_tokens: generation budget for row tasks (MMLU uses 1, GSM8K 400, as HELM); refused without a row task.
        threads: requests in flight (helm-run's default is 4).
        device: where an in-process checkpoint runs (auto, cpu, cuda); refused with --url.
        engine: the serving engine of an in-process checkpoint; refused with --url.
        out: write the scores (and every item's output) to this JSON file.
    """
    from core.prompts import get_style, load_style

    if (checkpoint_dir is None) == (url is None):
        raise SystemExit("error: give exactly one of --checkpoint_dir (serve it here) or --url (a running server)")
    if shots < 0 or threads < 1 or (max_items is not None and max_items < 1):
        raise SystemExit("error: --shots must be >= 0, --threads >= 1 and --max_items >= 1")
    style_name = template
    style = get_style(template) if template else (load_style(checkpoint_dir) if checkpoint_dir else None)
    if style is None:
        style_name, style = "qa", get_style("qa")
    try:
        loaded = [load_task(p, shots, style, max_new_tokens) for p in tasks]
    except TaskError as e:
        raise SystemExit(f"error: {e}") from None
    refuse_unread(loaded, url, shots, template, max_new_tokens, device, engine)
    if max_items is not None:
        loaded = [Task(t.name, t.kind, t.items[:max_items], t.max_new_tokens, t.stop) for t in loaded]
    client_cm = in_process(Path(checkpoint_dir), device, engine) if checkpoint_dir else over_http(url)
    with client_cm as client:
        scores = evaluate(client, loaded, threads)
    report = {
        "model": str(checkpoint_dir or url),
        "shots": shots,
        "template": style_name or type(style).__name__,
        "overall": overall(scores),
        "tasks": scores,
    }
    print(table(scores))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"scores -> {out}")
    return report
