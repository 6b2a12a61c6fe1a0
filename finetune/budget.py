"""Time budgets: the challenge allows 24 hours of finetuning on one GPU; runs must stop before that."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``"24h"``, ``"90m"``, ``"1h30m"``, ``"45s"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    compact = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", compact):
        return float(compact)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"max_time: cannot read {text!r}; write e.g. '24h', '90m', '1h30m' or '45s'")
    return sum(float(n) * _UNITS[u] for n, u in parts)
