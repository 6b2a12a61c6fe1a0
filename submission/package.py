"""``make submission``: the zip the leaderboard bot takes, checked before it is written.

The bot unzips, builds the first file named ``Dockerfile`` it finds, and runs HELM against it; the
organizers later rebuild the model with ``Dockerfile.train``. So the zip holds: the eval
``Dockerfile`` (pointing at the merged model the user uploaded to the HF hub), ``Dockerfile.train``,
``submission.json`` (how the model was made), ``serve_config.json`` (where the weights come from),
and the repo's tracked source. Never weights.

Refused, with the reason: a second ``Dockerfile``, a file over the size bound, weight files, a base
model that is not in the manifest, a tracked symlink that leads out of the repo (its target's content
would be zipped), and anything that looks like a secret in any text encoding (``submission/secrets.py``:
HF/W&B/AWS/OpenAI/GitHub tokens, private keys, ``api_key:`` settings). The zip is deterministic
(sorted names, fixed timestamps).
"""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.manifest import UnlistedModelError, lookup
from core.methods import METHODS
from core.paths import REPO_ROOT
from submission.secrets import scan

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".gguf", ".ckpt", ".lora", ".adapter", ".adapter_v2")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
ZIP_TIME = (2023, 10, 1, 0, 0, 0)


class SubmissionError(ValueError):
    """The submission would be rejected or unsafe; the message says which file and why."""


@dataclass(frozen=True)
class Entry:
    arcname: str  # path inside the zip
    data: bytes


def tracked_files(repo_root: Path) -> list[str]:
    """The repo's tracked files (so checkpoints/, out/ and .venv never get in)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SubmissionError(f"{repo_root}: `git ls-files` failed ({e}); make submission packs the tracked files of a git checkout") from None
    root = repo_root.resolve()
    files = []
    for p in sorted(p for p in out.decode(errors="surrogateescape").split("\0") if p):
        path = repo_root / p
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise SubmissionError(
                    f"{p}: a tracked symlink to {target}, outside the repo; its content would be zipped. Remove it or copy the file in"
                )
            if not target.exists():
                raise SubmissionError(f"{p}: a tracked symlink to {target}, which does not exist")
        if path.is_file():  # a tracked file deleted from the checkout, or a symlink to a directory whose files are tracked, adds nothing
            files.append(p)
    return files


def eval_dockerfile(template: str, weights_repo: str, litgpt_config: str) -> str:
    """The repo's Dockerfile with its build arguments pointing at the uploaded merged model."""
    replacements = {"MODEL_REPO": weights_repo, "MODEL_NAME": litgpt_config, "ALLOW_UNLISTED": "true"}
    for arg, value in replacements.items():
        template, n = re.subn(rf"^ARG {arg}=.*$", f"ARG {arg}={value}", template, flags=re.M)
        if n != 1:
            raise SubmissionError(f"Dockerfile: expected one `ARG {arg}=` line to set, found {n}")
    return template


def check_entries(entries: list[Entry], max_file_bytes: int) -> None:
    """Raise SubmissionError for the first problem found, naming the file (and line for secrets)."""
    dockerfiles = [e.arcname for e in entries if Path(e.arcname).name == "Dockerfile"]
    if dockerfiles != ["Dockerfile"]:
        extra = [d for d in dockerfiles if d != "Dockerfile"]
        raise SubmissionError(
            f"the bot builds the first file named Dockerfile it finds, so there must be exactly one, at the top: "
            f"found {dockerfiles}. Rename or remove {extra or 'the missing top-level one'} (e.g. Dockerfile.dev)."
        )
    for e in entries:
        if e.arcname.endswith(WEIGHT_SUFFIXES):
            raise SubmissionError(f"{e.arcname}: weight files never go in the zip; upload them to the HF hub and point MODEL_REPO at them")
        if len(e.data) > max_file_bytes:
            raise SubmissionError(
                f"{e.arcname}: {len(e.data) / 2**20:.1f} MiB is over the {max_file_bytes / 2**20:.1f} MiB bound per file "
                "(raise --max_file_mb if it really belongs in the submission)"
            )
        if found := scan(e.data):
            kind, line, start = found
            article = "an" if kind[0] in "AEIOU" else "a"
            raise SubmissionError(f"{e.arcname}:{line}: looks like {article} {kind} ({start}…); remove it and rotate it, it may have leaked")


def _base_config(manifest: dict, run_dir: Path, allow_unlisted: bool) -> str:
    """The litgpt config the eval image converts the uploaded weights with; an unlisted base needs ``allow_unlisted``."""
    base = manifest["base_model"]["repo_id"]
    try:
        return lookup(base).litgpt_config
    except UnlistedModelError as e:
        if not allow_unlisted:
            raise SubmissionError(f"submission.json: base model {base!r} is not an approved model in the manifest. {e}") from None
    from core.checkpoints import load_config

    return manifest["base_model"].get("litgpt_config") or load_config(Path(run_dir)).name


def check_downloads(manifest: dict, weights_repo: str) -> None:
    """The organizers build the eval image with no secret: refuse what it could not download, saying why."""
    from core.manifest import load_manifest

    method = METHODS.get(manifest["method"])
    if method is not None and not method.mergeable:
        raise SubmissionError(
            f"submission.json: method {method.name!r} cannot be merged, and the eval image serves one merged model "
            f"downloaded from weights_repo; finetune with lora or full for a submission"
        )
    entry = load_manifest().get(weights_repo)
    if entry is not None and entry.gated:
        raise SubmissionError(
            f"weights_repo: {weights_repo} is gated on the hub ({entry.gated_source}); the organizers build the image "
            "with no token, so its download would fail. Upload your merged model to a public repo of your own and point weights_repo at it"
        )


def collect(run_dir: Path, weights_repo: str, repo_root: Path = REPO_ROOT, allow_unlisted: bool = False) -> list[Entry]:
    manifest_path = Path(run_dir) / "submission.json"
    if not manifest_path.is_file():
        raise SubmissionError(f"{run_dir}: no submission.json; point --run_dir at a finetune run's final/ directory")
    manifest = json.loads(manifest_path.read_text())
    base = manifest["base_model"]["repo_id"]
    litgpt_config = _base_config(manifest, run_dir, allow_unlisted)
    if not HF_REPO_ID.match(weights_repo):
        raise SubmissionError(f"weights_repo: {weights_repo!r} is not a Hugging Face repo id (org/name) of your uploaded merged model")
    check_downloads(manifest, weights_repo)

    entries = [Entry(p, (repo_root / p).read_bytes()) for p in tracked_files(repo_root) if p != "Dockerfile"]
    dockerfile = eval_dockerfile((repo_root / "Dockerfile").read_text(), weights_repo, litgpt_config)
    serve_config = {"weights_repo": weights_repo, "litgpt_config": litgpt_config, "base_model": base, "use_template": False}
    entries += [
        Entry("Dockerfile", dockerfile.encode()),
        Entry("submission.json", manifest_path.read_bytes()),
        Entry("serve_config.json", json.dumps(serve_config, indent=2).encode()),
    ]
    data = manifest["data"]
    if data.get("recipe"):
        entries.append(Entry("submission/recipe.yaml", Path(data["recipe"]).read_bytes()))
    elif data.get("train_file"):
        entries.append(Entry("submission/train.jsonl", Path(data["train_file"]).read_bytes()))
    return sorted(entries, key=lambda e: e.arcname)


def package(
    run_dir: Path, weights_repo: str, out: Path = Path("dist/submission.zip"), max_file_mb: float = 5.0,
    repo_root: Path = REPO_ROOT, allow_unlisted: bool = False,
) -> Path:  # fmt: skip
    """Check everything, then write the zip; nothing is written when a check fails."""
    entries = collect(run_dir, weights_repo, repo_root, allow_unlisted)
    check_entries(entries, int(max_file_mb * 2**20))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for e in entries:
            info = zipfile.ZipInfo(e.arcname, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, e.data)
    return out


def main(run_dir: Path, weights_repo: str, out: Path = Path("dist/submission.zip"), max_file_mb: float = 5.0, allow_unlisted: bool = False) -> None:
    """Write the submission zip for the leaderboard bot.

    Args:
        run_dir: the finetune run's final/ directory (it holds submission.json).
        weights_repo: HF repo id where you uploaded the merged model in HF format (``make export``, then
            ``huggingface-cli upload``); the eval image downloads and converts it at build time.
        out: the zip to write.
        max_file_mb: refuse any file larger than this.
        allow_unlisted: package a finetune of a base model that is not in the manifest (make submission
            ALLOW_UNLISTED=1); the challenge only accepts approved base models.
    """
    try:
        path = package(run_dir, weights_repo, out, max_file_mb, allow_unlisted=allow_unlisted)
    except SubmissionError as e:
        raise SystemExit(f"error: {e}") from None
    with zipfile.ZipFile(path) as zf:
        n, size = len(zf.namelist()), sum(i.file_size for i in zf.infolist())
    print(f"wrote {path}: {n} files, {size / 2**20:.1f} MiB unpacked; weights come from {weights_repo}")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
