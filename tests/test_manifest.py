"""checkpoints_manifest.json agrees with litgpt and with core.manifest's memory model, and the
manifest loader rejects malformed files and unlisted models with useful messages."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from core.configs import config_from_name
from core.manifest import (
    MANIFEST_PATH,
    METHODS,
    TRACKS_GIB,
    ManifestError,
    UnlistedModelError,
    load_manifest,
    lookup,
)

RAW = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
ENTRIES = load_manifest()
IDS = list(ENTRIES)

REQUIRED_IDS = {
    "tiny",
    "mistralai/Mistral-7B-v0.1",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-hf",
    "openlm-research/open_llama_3b",
    "openlm-research/open_llama_7b",
    "openlm-research/open_llama_13b",
    "tiiuae/falcon-7b",
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    *(f"EleutherAI/pythia-{s}" for s in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")),
    *(f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")),
}
ACCEPTED_LICENSES = {"apache-2.0", "mit", "bigscience-openrail-m", "bigscience-bloom-rail-1.0", "llama2"}


@functools.cache
def meta_param_count(litgpt_name: str) -> int:
    from litgpt.model import GPT

    with torch.device("meta"):
        model = GPT(config_from_name(litgpt_name))
    return sum(p.numel() for p in model.parameters())


# --- the shipped manifest ---------------------------------------------------------------------


def test_top_level_shape():
    assert RAW["schema_version"] == 1
    assert len(RAW["models"]) == len(ENTRIES)  # no duplicates collapsed away
    assert IDS[0] == "tiny"


@pytest.mark.parametrize("repo_id", IDS)
def test_entry_is_a_litgpt_config_with_matching_hf_id(repo_id):
    entry = ENTRIES[repo_id]
    config = config_from_name(entry.litgpt_config)
    assert config.name == entry.litgpt_config
    if entry.embedded:
        assert entry.litgpt_config == "tiny"
    else:
        assert f"{config.hf_config['org']}/{config.hf_config['name']}" == entry.repo_id


@pytest.mark.parametrize("repo_id", IDS)
def test_params_are_exact(repo_id):
    entry = ENTRIES[repo_id]
    assert entry.params == meta_param_count(entry.litgpt_config)


@pytest.mark.parametrize("repo_id", IDS)
def test_fits_flags_match_estimator(repo_id):
    from core.manifest import fits_track

    entry = ENTRIES[repo_id]
    expected = {track: {m: fits_track(entry.params, m, track) for m in METHODS} for track in TRACKS_GIB}
    assert entry.fits == expected


def test_required_models_present():
    missing = REQUIRED_IDS - set(ENTRIES)
    assert not missing, f"manifest lacks {sorted(missing)}"


def test_embedded_tiny_entry():
    tiny = ENTRIES["tiny"]
    assert tiny.litgpt_config == "tiny"
    assert tiny.family == "LLaMA (embedded test model)"
    assert tiny.license == "apache-2.0"
    assert not tiny.gated


@pytest.mark.parametrize("repo_id", IDS)
def test_license_accepted_or_caveat_noted(repo_id):
    entry = ENTRIES[repo_id]
    assert entry.license == entry.license.lower()
    if entry.license not in ACCEPTED_LICENSES:
        assert "license" in entry.notes.lower(), f"{repo_id}: license {entry.license!r} needs a caveat in notes"


def test_only_base_models():
    tuned = ("instruct", "chat", "code", "math", "-it", "sft", "dpo", "thinking")
    offenders = [r for r in ENTRIES if any(t in r.lower() for t in tuned)]
    assert not offenders


def test_meta_llama_repos_are_gated():
    for entry in ENTRIES.values():
        if entry.repo_id.startswith("meta-llama/"):
            assert entry.gated and entry.license == "llama2"


GATED_ORGS = ("meta-llama/", "mistralai/")  # orgs whose repos ask to accept terms before download


@pytest.mark.parametrize("repo_id", IDS)
def test_gated_flag_has_its_evidence(repo_id):
    """Every flag cites where it comes from; gated orgs are gated; a gated entry cites a URL."""
    entry = ENTRIES[repo_id]
    assert entry.gated_source.startswith("gated" if entry.gated else ("not gated", "embedded"))
    if repo_id.startswith(GATED_ORGS):
        assert entry.gated, f"{repo_id}: {repo_id.split('/')[0]} repos are gated on the hub"
    if entry.gated:
        assert "https://" in entry.gated_source
    if not entry.embedded:
        assert "https://" in entry.gated_source


def test_gated_source_must_agree_with_the_flag(tmp_path):
    with pytest.raises(ManifestError, match=r"models\[1\].*gated_source.*'gated'"):
        load_manifest(_write(tmp_path, _with_second_entry(lambda e: e.update(gated=True))))


def test_litgpt_configs_unique_and_families_grouped():
    names = [e.litgpt_config for e in ENTRIES.values()]
    assert len(names) == len(set(names))
    families = [e.family for e in ENTRIES.values()]
    runs = [f for i, f in enumerate(families) if i == 0 or families[i - 1] != f]
    assert len(runs) == len(set(runs)), f"families are not contiguous: {runs}"


# --- lookup ------------------------------------------------------------------------------------


def test_lookup_listed():
    entry = lookup("mistralai/Mistral-7B-v0.1")
    assert entry is not None and entry.repo_id == "mistralai/Mistral-7B-v0.1"
    assert entry.litgpt_config == "Mistral-7B-v0.1"


def test_lookup_unlisted_says_how_to_override():
    with pytest.raises(UnlistedModelError) as info:
        lookup("someone/not-a-model")
    message = str(info.value)
    assert "someone/not-a-model" in message
    assert "allow_unlisted" in message.lower()
    assert "Did you mean" not in message


def test_lookup_near_miss_suggests_repo_id():
    with pytest.raises(UnlistedModelError, match=r"Did you mean 'mistralai/Mistral-7B-v0\.1'\?"):
        lookup("mistral-7b-v0.1")


# --- malformed manifests -----------------------------------------------------------------------


def _entry(repo_id: str, params: int = 1000) -> dict:
    return {
        "repo_id": repo_id,
        "litgpt_config": repo_id.split("/")[-1],
        "family": "Test",
        "license": "apache-2.0",
        "params": params,
        "gated": False,
        "gated_source": "not gated: test entry",
        "fits": {t: {m: True for m in METHODS} for t in TRACKS_GIB},
        "notes": "",
    }


GOOD = {"schema_version": 1, "models": [_entry("org/a"), _entry("org/b")]}


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2), encoding="utf-8")
    return path


def _with_second_entry(mutate) -> dict:
    data = copy.deepcopy(GOOD)
    mutate(data["models"][1])
    return data


def test_good_manifest_loads(tmp_path):
    entries = load_manifest(_write(tmp_path, GOOD))
    assert list(entries) == ["org/a", "org/b"]
    assert lookup("org/b", _write(tmp_path, GOOD)).params == 1000


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda e: e.pop("license"), "'license'"),
        (lambda e: e.pop("fits"), "'fits'"),
        (lambda e: e.update(params="7B"), "'params'"),
        (lambda e: e.update(params=True), "'params'"),
        (lambda e: e.update(gated="no"), "'gated'"),
        (lambda e: e.pop("gated_source"), "'gated_source'"),
        (lambda e: e.update(repo_id=None), "'repo_id'"),
        (lambda e: e.update(size="7B"), "size"),
    ],
    ids=["missing-license", "missing-fits", "params-str", "params-bool", "gated-str", "gated-source-missing", "repo-id-null", "unknown"],
)
def test_bad_field_names_entry_and_field(tmp_path, mutate, field):
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, _with_second_entry(mutate)))
    message = str(info.value)
    assert "models[1]" in message and field in message


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda e: e["fits"].pop("a100_40gb"), "fits.a100_40gb"),
        (lambda e: e["fits"]["rtx4090_24gb"].pop("qlora"), "fits.rtx4090_24gb"),
        (lambda e: e["fits"]["a100_40gb"].update(full=True), "fits.a100_40gb"),
        (lambda e: e["fits"].update(rtx4090_24gb=True), "fits.rtx4090_24gb"),
        (lambda e: e["fits"]["a100_40gb"].update(lora="yes"), "fits.a100_40gb.lora"),
    ],
    ids=["missing-track", "missing-method", "extra-method", "track-not-table", "flag-not-bool"],
)
def test_bad_fits_table(tmp_path, mutate, fragment):
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, _with_second_entry(mutate)))
    message = str(info.value)
    assert "models[1]" in message and fragment in message


def test_duplicate_repo_id(tmp_path):
    data = copy.deepcopy(GOOD)
    data["models"].append(_entry("org/a"))
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, data))
    message = str(info.value)
    assert "models[2]" in message and "duplicate" in message and "org/a" in message


def test_entry_not_an_object(tmp_path):
    data = copy.deepcopy(GOOD)
    data["models"][1] = "org/b"
    with pytest.raises(ManifestError, match=r"models\[1\].*expected an object"):
        load_manifest(_write(tmp_path, data))


@pytest.mark.parametrize("data", [[], {"schema_version": 1}, {"models": {}}], ids=["list", "no-models", "dict-models"])
def test_top_level_not_a_models_list(tmp_path, data):
    with pytest.raises(ManifestError, match="'models' list"):
        load_manifest(_write(tmp_path, data))


def test_invalid_json_names_the_line(tmp_path):
    text = '{\n  "schema_version": 1,\n  "models": [\n    {"repo_id": "org/a",}\n  ]\n}\n'
    with pytest.raises(ManifestError, match=r"not valid JSON \(line 4,"):
        load_manifest(_write(tmp_path, text))


# --- edge cases of the loader ----------------------------------------------------------------


def test_lookup_accepts_str_path(tmp_path):
    path = str(_write(tmp_path, GOOD))
    with pytest.raises(UnlistedModelError):
        lookup("org/zzz", path)


def test_notes_must_be_a_string(tmp_path):
    with pytest.raises(ManifestError):
        load_manifest(_write(tmp_path, _with_second_entry(lambda e: e.update(notes=42))))


def test_unknown_track_rejected(tmp_path):
    with pytest.raises(ManifestError):
        load_manifest(_write(tmp_path, _with_second_entry(lambda e: e["fits"].update(h100_80gb={"lora": True}))))
