"""A source's ``fields``: column paths (``col[0].key``), ``{column}`` templates and the formats
(``multiple_choice``, ``messages``, ``oasst``) that turn one dataset row into one of ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from finetune.data import DataError
from finetune.recipes.schema import _PATH_PART, _PLACEHOLDER, Source, _is_int

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _cell(row: Mapping[str, Any], path: str) -> Any:
    value: Any = row
    for m in _PATH_PART.finditer(path.strip()):
        key, index = m.group(1), m.group(2)
        if key is not None:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        else:
            if not isinstance(value, (list, tuple)) or not -len(value) <= int(index) < len(value):
                return None
            value = value[int(index)]
    return value


def _text(value: Any) -> Any:
    """A cell as text: strings as they are, numbers as text, lists of scalars joined by newlines."""
    if isinstance(value, (str, type(None))):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return "\n".join(str(v) for v in value)
    return value  # anything else: left for normalize_row to reject with its value shown


def _render(spec: str | list[str], row: Mapping[str, Any]) -> Any:
    if isinstance(spec, list):
        parts = [_render(s, row) for s in spec]
        if any(not isinstance(p, str) for p in parts):
            return next(p for p in parts if not isinstance(p, str))
        return "\n\n".join(p for p in parts if p.strip())
    if "{" not in spec and "}" not in spec:
        return _text(_cell(row, spec))
    missing = []

    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        value = _text(_cell(row, m.group(1)))
        if not isinstance(value, str):
            missing.append(value)
            return ""
        return value

    out = _PLACEHOLDER.sub(sub, spec)
    return missing[0] if missing else out


_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _messages(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [{"role": ("user", "assistant")[i % 2], "content": v} for i, v in enumerate(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value):
        out = []
        for turn in value:
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            out.append({"role": _ROLES.get(str(role).lower(), role), "content": content})
        return out
    return value


def _map_fields(s: Source, row: Mapping[str, Any], where: str) -> dict[str, Any]:
    if s.format == "multiple_choice":
        choices = _cell(row, s.fields["choices"])
        answer = _cell(row, s.fields["answer"])
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices) or len(choices) > len(LETTERS):
            raise DataError(f"{where}: choices must be a list of 1-{len(LETTERS)} strings, got {choices!r}")
        index = None
        if _is_int(answer):
            index = answer
        elif isinstance(answer, str) and answer in choices:
            index = list(choices).index(answer)
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
            index = LETTERS.index(answer.strip().upper())
        elif isinstance(answer, str) and answer.strip().isdigit():
            index = int(answer.strip())
        if index is None or not 0 <= index < len(choices):
            raise DataError(f"{where}: answer {answer!r} does not pick one of the {len(choices)} choices")
        question = _render(s.fields["question"], row)
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        instruction = f"{question}\n{options}" if isinstance(question, str) else question
        return {"instruction": instruction, "input": "", "output": LETTERS[index]}
    if "messages" in s.fields:
        return {"messages": _messages(_cell(row, s.fields["messages"]))}
    return {key: _render(spec, row) for key, spec in s.fields.items()}


def _oasst_pairs(ds, idx: list[int], where: str, stats: dict[str, Any] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(index of the reply, its row) for each root prompt and its rank-0 reply; ``stats`` gets what was left out:
    ``oasst_messages_flagged`` (deleted, failed review, synthetic) and ``oasst_prompts_unpaired`` (root prompts kept
    that no kept rank-0 reply answers), so a prompt whose reply was flagged is counted, not lost unseen."""
    needed = ["message_id", "parent_id", "role", "text", "rank"]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: format oasst needs columns {needed}; missing {missing} (columns: {ds.column_names})")
    extra = [c for c in ("deleted", "review_result", "synthetic") if c in ds.column_names]
    cols = {c: list(ds[c]) for c in needed + extra}
    keep = set(idx)
    ok = [
        i in keep
        and not ("deleted" in cols and cols["deleted"][i] is True)
        and not ("review_result" in cols and cols["review_result"][i] is False)
        and not ("synthetic" in cols and cols["synthetic"][i] is True)  # model-written messages
        for i in range(len(ds))
    ]
    roots = {cols["message_id"][i]: i for i in range(len(ds)) if ok[i] and cols["role"][i] == "prompter" and cols["parent_id"][i] is None}
    pairs = []
    for i in range(len(ds)):
        parent = cols["parent_id"][i]
        if ok[i] and cols["role"][i] == "assistant" and cols["rank"][i] == 0 and parent in roots:
            pairs.append((i, {"instruction": cols["text"][roots[parent]], "input": "", "output": cols["text"][i]}))
    if stats is not None:
        stats["oasst_messages_flagged"] = sum(1 for i in keep if not ok[i])
        stats["oasst_prompts_unpaired"] = len(roots) - len({cols["parent_id"][i] for i, _ in pairs})
    return pairs


def _all_paths(s: Source) -> list[str]:
    paths = []
    for spec in s.fields.values():
        for one in spec if isinstance(spec, list) else [spec]:
            if "{" in one or "}" in one:
                paths += [m.group(1) for m in _PLACEHOLDER.finditer(one) if m.group(0) not in ("{{", "}}")]
            else:
                paths.append(one)
    return paths
