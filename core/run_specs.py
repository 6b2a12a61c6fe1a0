"""HELM run-spec confs (``data/helm/*.conf``): their entries, parsed into scenario name and arguments.

``make helm`` hands the conf to HELM as it is; the contamination guard (``finetune.eval_guard``)
derives from the same files what the challenge evaluates, so the two cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.paths import REPO_ROOT

HELM_CONF_DIR = REPO_ROOT / "data" / "helm"


@dataclass(frozen=True)
class RunEntry:
    """One ``description`` of a conf: ``big_bench:task=winowhy,subtask=`` -> scenario ``big_bench``, args ``{task: winowhy, subtask: ''}``."""

    scenario: str
    args: dict[str, str]
    conf: Path
    line: int


def parse_run_entries(conf_text: str) -> list[str]:
    """The ``description`` strings of a HELM run-spec conf (HOCON), in order; comment lines skipped."""
    lines = [line for line in conf_text.splitlines() if not line.lstrip().startswith(("#", "//"))]
    return re.findall(r'description\s*:\s*"([^"]*)"', "\n".join(lines))


def parse_description(description: str, where: str = "") -> tuple[str, dict[str, str]]:
    """``scenario:k=v,k=v`` -> (scenario, {k: v}); a malformed one raises ``ValueError`` naming ``where``."""
    scenario, sep, rest = description.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", scenario.strip()):
        raise ValueError(f"{where}: run entry {description!r} is not 'scenario:key=value,...'")
    args = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"{where}: run entry {description!r}: {part!r} is not key=value")
        args[key.strip()] = value.strip()
    return scenario.strip(), args


def read_conf(path: Path) -> list[RunEntry]:
    """Every run entry of one conf file, with its line number (for error messages)."""
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for description in parse_run_entries(line):
            scenario, args = parse_description(description, f"{path}:{number}")
            entries.append(RunEntry(scenario, args, path, number))
    return entries


def shipped_confs(conf_dir: Path = HELM_CONF_DIR) -> list[Path]:
    """The run-spec confs this repository ships (``data/helm/*.conf``), sorted."""
    return sorted(Path(conf_dir).glob("*.conf"))
