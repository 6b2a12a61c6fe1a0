"""``python -m finetune.recipes --recipe <yaml> --out_dir <dir>``."""

from core.cli import run_cli
from finetune.recipes.cli import main

run_cli(main, prog="python -m finetune.recipes")
