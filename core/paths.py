"""Where things live. Everything generated goes under ``checkpoints/`` and ``out/`` (both git-ignored)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"
OUT_DIR = REPO_ROOT / "out"
