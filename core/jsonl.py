"""Row files (a ``.json`` list or ``.jsonl`` lines) read one way everywhere: training data and eval tasks.

JSONL lines end at ``\\n`` only: a JSON string may hold U+2028, U+2029, NEL or a form feed raw, and
``str.splitlines`` would split at those too. A UTF-8 byte-order mark is skipped (editors on Windows
write one). A file that is not UTF-8, is not valid JSON, or holds no rows is an error naming it (and
the line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RowFileError(ValueError):
    """A row file that cannot be read; the message names the file and, where there is one, the line."""


def read_text(path: Path) -> str:
    """The file as UTF-8 text, without a byte-order mark."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RowFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """Each row's JSON value with where it is (``file:line`` for JSONL, ``file: row i`` for a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise RowFileError(f"{path}: file not found")
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RowFileError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RowFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise RowFileError(f"{path}: a .json file must hold a list of rows")
        rows = [(f"{path}: row {i}", raw) for i, raw in enumerate(data)]
    if not rows:
        raise RowFileError(f"{path}: no rows (the file is empty)")
    return rows
