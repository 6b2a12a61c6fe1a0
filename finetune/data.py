"""Instruction data: read local JSON/JSONL, render with the shared template, tokenize, batch.

Rows may come in the common shapes; all are normalized to ``instruction / input / output``:
- ``{"instruction", "input"?, "output"}`` (Alpaca, Dolly after renaming),
- ``{"prompt", "response"}``,
- ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` (first user turn -> instruction,
  the assistant turn that follows -> output).
A bad row raises ``DataError`` naming the file and line, and nothing is silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from litgpt import Tokenizer
from litgpt.prompts import PromptStyle

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt tokens, padding)


class DataError(ValueError):
    """A data file or row is malformed; the message names the file and line."""


def normalize_row(row: object, where: str) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        user = next((i for i, m in enumerate(msgs) if m.get("role") == "user"), None)
        if user is None or user + 1 >= len(msgs) or msgs[user + 1].get("role") != "assistant":
            raise DataError(f"{where}: 'messages' needs a user turn followed by an assistant turn")
        out = {"instruction": msgs[user].get("content"), "input": "", "output": msgs[user + 1].get("content")}
    elif "prompt" in row or "response" in row:
        out = {"instruction": row.get("prompt"), "input": "", "output": row.get("response")}
    else:
        out = {"instruction": row.get("instruction"), "input": row.get("input", ""), "output": row.get("output")}
    for field, value in out.items():
        if not isinstance(value, str):
            shape = "instruction/input/output, prompt/response or messages"
            raise DataError(f"{where}: field {field!r} must be a string (row shapes accepted: {shape}), got {value!r}")
    if not out["output"].strip():
        raise DataError(f"{where}: empty output")
    return out


def load_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a .json (list) or .jsonl file, normalized; errors name ``file:line``.

    JSONL lines end at ``\n`` only: JSON strings may hold U+2028 and other characters that
    ``str.splitlines`` would also break at. A UTF-8 byte-order mark is skipped. No rows is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            rows.append(normalize_row(raw, f"{path}:{lineno}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        rows = [normalize_row(raw, f"{path}: row {i}") for i, raw in enumerate(data)]
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def encode_row(row: dict[str, str], tokenizer: Tokenizer, style: PromptStyle, max_seq_length: int, mask_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Token ids and labels for one row; the response ends with EOS so the model learns to stop."""
    prompt = style.apply(row["instruction"], input=row["input"])
    prompt_ids = tokenizer.encode(prompt, max_length=max_seq_length)
    response_ids = tokenizer.encode(row["output"], bos=False, eos=True, max_length=max_seq_length)
    input_ids = torch.cat((prompt_ids, response_ids))[:max_seq_length].long()
    labels = input_ids.clone()
    if mask_prompt:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class Collate:
    """Right-pad a list of encoded rows into one batch (labels padded with IGNORE_INDEX).

    ``mask`` marks real tokens. Right padding needs no attention mask: causal attention never lets a
    real token see the padding after it.
    """

    pad_id: int = 0

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        x = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            x[i, :n], y[i, :n], mask[i, :n] = r["input_ids"], r["labels"], True
        return {"input_ids": x, "labels": y, "mask": mask, "target_index": target_index(y)}


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``labels[:, 1:]`` of the positions with a target.

    Computed on the CPU with the batch, so the loss can pick its rows on the GPU without waiting
    for it (a boolean mask there would stall the CPU every step).
    """
    return (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
