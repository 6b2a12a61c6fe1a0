"""Instruction data: read local JSON/JSONL, render with the shared template, tokenize, batch.

Rows may come in the common shapes:
- ``{"instruction", "input"?, "output"}`` (Alpaca, Dolly after renaming) and ``{"prompt", "response"}``,
  both normalized to ``instruction / input / output`` and rendered with the prompt style;
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: a conversation,
  every turn kept, rendered with a chat template (``core.chat``), the loss on every assistant turn.
A bad row raises ``DataError`` naming the file and line, and nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from litgpt import Tokenizer
from litgpt.prompts import PromptStyle

from core.chat import ROLES, ChatTemplate, ChatTemplateError, encode_conversation
from core.jsonl import RowFileError, read_rows

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt tokens, padding)


class DataError(ValueError):
    """A data file or row is malformed; the message names the file and line."""


class Row(dict):
    """A normalized row that remembers where it came from (``file:line``), for errors found later."""

    def __init__(self, fields: dict, where: str) -> None:
        super().__init__(fields)
        self.where = where


def normalize_messages(msgs: object, where: str) -> list[dict[str, str]]:
    """A conversation as ``[{role, content}]``, every turn kept; refused (naming the turn) unless well formed."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be a {{role, content}} object, got {m!r}")
        if extra := sorted(set(m) - {"role", "content"}):
            raise DataError(f"{where}: messages[{i}] has keys {extra}; a turn is {{role, content}} only")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {m.get('content')!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to learn")
    return turns


def normalize_row(row: object, where: str) -> Row:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        if extra := sorted(set(row) - {"messages", "source"}):
            raise DataError(f"{where}: a conversation row holds 'messages' only, got also {extra}")
        return Row({"messages": normalize_messages(row["messages"], where)}, where)
    if "prompt" in row or "response" in row:
        out = {"instruction": row.get("prompt"), "input": "", "output": row.get("response")}
    else:
        out = {"instruction": row.get("instruction"), "input": row.get("input", ""), "output": row.get("output")}
    for field, value in out.items():
        if not isinstance(value, str):
            shape = "instruction/input/output, prompt/response or messages"
            raise DataError(f"{where}: field {field!r} must be a string (row shapes accepted: {shape}), got {value!r}")
    if not out["output"].strip():
        raise DataError(f"{where}: empty output")
    return Row(out, where)


def as_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """An instruction row as the one exchange it is, for runs that render everything with a chat template."""
    if "messages" in row:
        return row["messages"]
    user = f"{row['instruction']}\n{row['input']}" if row["input"] else row["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def load_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a .json (list) or .jsonl file, normalized; errors name ``file:line``.

    Read by ``core.jsonl``: JSONL split at ``\n`` only, a UTF-8 byte-order mark skipped, no rows an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        rows = read_rows(path)
    except RowFileError as e:
        raise DataError(str(e)) from None
    return [normalize_row(raw, where) for where, raw in rows]


def encode_row(
    row: dict, tokenizer: Tokenizer, style: PromptStyle, max_seq_length: int, mask_prompt: bool = True, chat: ChatTemplate | None = None
) -> dict[str, torch.Tensor]:
    """Token ids and labels for one row; the response ends with EOS so the model learns to stop.

    With ``chat`` every row is a conversation in that template, labelled on its assistant turns;
    without, a conversation is an error and instruction rows take ``style``. A row longer than
    ``max_seq_length`` is cut to it; ``labels_cut`` says how many labelled tokens that took off its end.
    """
    if chat is not None:
        try:
            ids, assistant = encode_conversation(tokenizer, chat, as_messages(row))
        except ChatTemplateError as e:
            raise DataError(f"{getattr(row, 'where', 'a row')}: {e}") from None
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.clone()
        if mask_prompt:
            labels[~torch.tensor(assistant, dtype=torch.bool)] = IGNORE_INDEX
    else:
        if "messages" in row:
            raise DataError(f"{getattr(row, 'where', 'a row')}: a conversation needs a chat template (--data.chat_template)")
        prompt = style.apply(row["instruction"], input=row["input"])
        prompt_ids = tokenizer.encode(prompt, max_length=max_seq_length)
        response_ids = tokenizer.encode(row["output"], bos=False, eos=True, max_length=max_seq_length)
        input_ids = torch.cat((prompt_ids, response_ids)).long()
        labels = input_ids.clone()
        if mask_prompt:
            labels[: len(prompt_ids)] = IGNORE_INDEX
    cut = int((labels[max_seq_length:] != IGNORE_INDEX).sum())
    return {"input_ids": input_ids[:max_seq_length], "labels": labels[:max_seq_length], "labels_cut": cut}


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
