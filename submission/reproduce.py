"""Rebuild a submitted model from its ``submission.json``: what ``Dockerfile.train`` runs, step by step.

    python -m submission.reproduce download   # the base model from the manifest (core.hub)
    python -m submission.reproduce data       # the recipe's datasets; the rows must hash as recorded
    python -m submission.reproduce finetune   # the recorded method, config, seed and time budget
    python -m submission.reproduce merge      # a standalone checkpoint (LoRA merged, full copied)

Each step reads ``submission.json`` (and ``submission/recipe.yaml`` or ``submission/train.jsonl``,
which ``make submission`` packs) and writes under ``--out_dir`` (default ``out/reproduce``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.paths import CHECKPOINTS_DIR

RECIPE = Path("submission/recipe.yaml")
TRAIN_FILE = Path("submission/train.jsonl")


def _manifest(path: Path) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"error: {path} not found; run from the unpacked submission (it holds submission.json)")
    return json.loads(Path(path).read_text())


def download(manifest: Path = Path("submission.json"), checkpoint_dir: Path = CHECKPOINTS_DIR) -> None:
    """Download and convert the base model named in the manifest (its HF weight files deleted once converted)."""
    from core.hub import download as hub_download

    base = _manifest(manifest)["base_model"]["repo_id"]
    print(f"base model: {hub_download(base, checkpoint_dir, delete_hf_weights_after=True)}")


def _pinned(source: dict) -> str:
    rev = source.get("revision") or source.get("revision_resolved")
    if source.get("revision"):
        return f"pinned revision {rev}"
    if rev:
        return f"revision {rev} (the commit the hub named when the run loaded it; the recipe pins none: {source.get('revision_unpinned')})"
    return "no revision (a local file or a source that pins none)"


def data_changed(recorded: dict, rebuilt: dict) -> str:
    """One message for rows that no longer hash as recorded: which source changed, its expected and actual
    hashes and the revision it was loaded at; the mix's hashes when no single source can be named."""
    parts = []
    rebuilt_sources = {s["name"]: s for s in rebuilt.get("sources", [])}
    for want in recorded.get("sources", []):
        got = rebuilt_sources.get(want["name"], {})
        where = f"source {want['name']!r} ({want.get('dataset')}{', ' + want['config'] if want.get('config') else ''}, split {want.get('split')})"
        if want.get("source_rows_sha256") and want["source_rows_sha256"] != got.get("source_rows_sha256"):
            parts.append(f"{where}: its rows hash to {got.get('source_rows_sha256')}, recorded {want['source_rows_sha256']}, at {_pinned(want)}")
        elif want.get("rows_loaded") != got.get("rows_loaded"):
            parts.append(f"{where}: {got.get('rows_loaded')} rows loaded, recorded {want.get('rows_loaded')}, at {_pinned(want)}")
        for f, digest in (want.get("data_files") or {}).items():
            if digest and digest != (got.get("data_files") or {}).get(f):
                parts.append(f"{where}: data file {f} hashes to {(got.get('data_files') or {}).get(f)}, recorded {digest}")
    mix = f"all rows hash to {rebuilt.get('rows_sha256')}, the submission recorded {recorded.get('rows_sha256')}"
    if not parts:
        pins = "; ".join(f"{s['name']!r} at {_pinned(s)}" for s in recorded.get("sources", []))
        return f"the training data changed: {mix} ({pins or 'no sources recorded'}); the recipe or the datasets library changed"
    return "the training data changed upstream: " + "; ".join(parts) + f" ({mix})"


def data(manifest: Path = Path("submission.json")) -> None:
    """Load the training data and check it is exactly what the original run used."""
    m = _manifest(manifest)
    card = m["data"]["card"]
    if m["data"].get("recipe"):
        from finetune.recipes import build, card_revisions, load_recipe

        # The commit each source was loaded at (an unpinned recipe source included), not the hub's head.
        _, rebuilt = build(load_recipe(RECIPE), count_tokens=None, revisions=card_revisions(card))
        got, want = rebuilt["rows_sha256"], card.get("rows_sha256")
        if got != want:
            raise SystemExit(f"error: {data_changed(card, rebuilt)}")
    else:
        got, want = hashlib.sha256(TRAIN_FILE.read_bytes()).hexdigest(), card.get("sha256")
        if got != want:
            raise SystemExit(f"error: {TRAIN_FILE} hashes to {got}, the submission recorded {want}: the training file changed")
    print(f"data verified: sha256 {got}")


def finetune(manifest: Path = Path("submission.json"), out_dir: Path = Path("out/reproduce"), checkpoint_dir: Path = CHECKPOINTS_DIR) -> Path:
    """Run the recorded finetune: its config (``hyperparameters.yaml``, kept in submission.json) read back with
    ``--config``, as ``python -m finetune.<method> --config`` reads it, with this machine's paths; resumes if interrupted."""
    import yaml

    from finetune.config import config_class, parse
    from finetune.run import run

    m = _manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = out_dir / "submission_config.yaml"
    recorded.write_text(yaml.safe_dump(m["finetune"], sort_keys=False))
    data = ["--data.recipe", str(RECIPE), "--data.train_file", "null"] if m["data"].get("recipe") else ["--data.train_file", str(TRAIN_FILE)]
    args = ["--config", str(recorded), "--checkpoint_dir", str(Path(checkpoint_dir) / m["base_model"]["repo_id"]), "--out_dir", str(out_dir)]
    return run(parse(config_class(m["method"]), [*args, *data, "--resume", "auto"]))


def merge(manifest: Path = Path("submission.json"), out_dir: Path = Path("out/reproduce")) -> None:
    """Write the standalone checkpoint the eval image would serve."""
    from core.methods import METHODS
    from finetune.merge import merge as merge_run

    method = METHODS[_manifest(manifest)["method"]]
    if not method.mergeable:
        print(f"{method.name} is served unmerged: {out_dir / 'final'}")
        return
    print(f"merged checkpoint: {merge_run(out_dir / 'final', out_dir=out_dir / 'merged')}")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli({"download": download, "data": data, "finetune": finetune, "merge": merge})
