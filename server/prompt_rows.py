"""Which prompt each prompt row of the KV cache holds: the shared-prefix cache.

HELM sends every instance of a run spec behind the same few-shot prefix (up to ~2,000 tokens), 30 at
a time. A prompt row keeps its prompt's K/V after the request is done, so the next prompt that
starts the same way copies those positions (a memory copy) instead of recomputing them. Rows
are reused least recently used first; a row that a request is still filling is never taken.
"""

from __future__ import annotations

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PromptRows:
    def __init__(self, rows: range) -> None:
        self.rows = list(rows)
        self.tokens: dict[int, np.ndarray] = {r: np.empty(0, dtype=np.int64) for r in self.rows}
        self.owner: dict[int, object | None] = {r: None for r in self.rows}
        self._used: dict[int, int] = {r: 0 for r in self.rows}
        self._clock = 0

    def best_match(self, ids: np.ndarray, limit: int) -> tuple[int | None, int]:
        """The row sharing the longest prefix with ``ids`` (at most ``limit`` tokens), and its length."""
        best, best_len = None, 0
        for r in self.rows:
            n = min(common_prefix(self.tokens[r], ids), limit)
            if n > best_len:
                best, best_len = r, n
        return best, best_len

    def free_row(self, prefer: int | None = None) -> int | None:
        """``prefer`` if nobody holds it, else the least recently used row nobody holds."""
        if prefer is not None and self.owner[prefer] is None:
            return prefer
        free = [r for r in self.rows if self.owner[r] is None]
        return min(free, key=self._used.__getitem__) if free else None

    def claim(self, row: int, owner: object, valid: np.ndarray) -> None:
        """``owner`` fills ``row``; its first ``len(valid)`` positions already hold ``valid``."""
        self.owner[row] = owner
        self.set_tokens(row, valid)

    def set_tokens(self, row: int, valid: np.ndarray) -> None:
        self.tokens[row] = valid
        self._clock += 1
        self._used[row] = self._clock

    def release(self, row: int) -> None:
        """The owner is done with ``row``; its prompt stays cached until the row is reused."""
        self.owner[row] = None

    def forget(self, row: int) -> None:
        """Drop ``row``'s content (after a failed forward, it is not trustworthy)."""
        self.owner[row] = None
        self.tokens[row] = np.empty(0, dtype=np.int64)
