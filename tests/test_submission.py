"""make submission: the zip the bot builds, its refusals, submission.json, and Dockerfile.train's replay."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from core.paths import REPO_ROOT
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.lora import LoRAArgs, setup
from submission import reproduce
from submission.package import SubmissionError, package
from tests.test_dockerfile import instructions

WEIGHTS_REPO = "someone/tiny-merged"


@pytest.fixture(scope="module")
def tiny_run(make_tiny_checkpoint, tmp_path_factory):
    base = make_tiny_checkpoint()
    root = tmp_path_factory.mktemp("submission_run")
    final = setup(
        checkpoint_dir=base,
        out_dir=root / "run",
        lora=LoRAArgs(r=4, alpha=8),
        data=DataArgs(train_file=base.parent / "data" / "train.jsonl", max_seq_length=64),
        train=TrainArgs(save_interval=None, log_interval=10, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1, max_steps=3),
        eval=EvalArgs(interval=0),
    )
    return base, final


def test_submission_json_is_complete_and_hashes_match_the_data_card(tiny_run):
    base, final = tiny_run
    m = json.loads((final / "submission.json").read_text())
    assert m["base_model"] == {
        "repo_id": "tiny", "litgpt_config": "tiny", "license": "apache-2.0", "in_manifest": True,
        "repo_id_from": "checkpoint_source.json",  # the checkpoint's own record (core.tiny wrote it), not its path
    }  # fmt: skip
    assert m["method"] == "lora" and m["seed"] == 1337 and m["template"] == "qa"
    assert m["finetune"]["lora"]["r"] == 4 and m["finetune"]["train"]["max_steps"] == 3
    assert re.fullmatch(r"[0-9a-f]{40}", m["versions"]["onegpu"]["sha"])
    for key in ("litgpt", "torch", "lightning", "python"):
        assert m["versions"][key]
    assert "cuda" in m["versions"] and "gpu" in m["hardware"]
    assert m["training"]["steps"] == 3 and m["training"]["seconds"] > 0
    train_file = base.parent / "data" / "train.jsonl"
    assert m["data"]["card"]["sha256"] == hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert m["data"]["card"] == json.loads((final / "data_card.json").read_text())


def test_zip_has_one_dockerfile_no_weights_and_points_at_the_model(tiny_run, tmp_path):
    _, final = tiny_run
    path = package(final, WEIGHTS_REPO, tmp_path / "submission.zip")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        dockerfiles = [n for n in names if n.rsplit("/", 1)[-1] == "Dockerfile"]
        assert dockerfiles == ["Dockerfile"]
        assert not any(n.endswith((".pth", ".safetensors", ".bin", ".lora")) or n.startswith(("checkpoints/", "out/", ".venv/")) for n in names)
        dockerfile = zf.read("Dockerfile").decode()
        assert f"ARG MODEL_REPO={WEIGHTS_REPO}" in dockerfile and "ARG MODEL_NAME=tiny" in dockerfile
        assert json.loads(zf.read("serve_config.json"))["weights_repo"] == WEIGHTS_REPO
        assert zf.read("submission.json") == (final / "submission.json").read_bytes()
        assert {"Dockerfile.train", "submission/train.jsonl", "server/app.py", "checkpoints_manifest.json"} <= set(names)
        assert max(i.file_size for i in zf.infolist()) <= 5 * 2**20
    assert package(final, WEIGHTS_REPO, tmp_path / "again.zip").read_bytes() == path.read_bytes()  # deterministic


@pytest.fixture
def fake_repo(tmp_path):
    """A minimal git checkout to plant problems in."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "Dockerfile", repo / "Dockerfile")
    (repo / "app.py").write_text("print('hi')\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    def add(name: str, data: bytes | str) -> None:
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)

    add("README.md", "ok\n")
    return repo, add


def test_fake_repo_packs_cleanly(tiny_run, fake_repo, tmp_path):
    repo, _ = fake_repo
    package(tiny_run[1], WEIGHTS_REPO, tmp_path / "ok.zip", repo_root=repo)


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("tools/Dockerfile", "FROM scratch\n", "exactly one"),
        ("config.py", "x = 1\nHF_TOKEN = 'hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7'\n", "config.py:2: looks like a Hugging Face token"),
        # (fake secrets are assembled at run time, so this file itself passes the scan)
        ("train.sh", "wandb " + "login " + "0123456789abcdef" * 2 + "01234567\n", "train.sh:1: looks like a Weights & Biases"),
        ("deploy/id_rsa", "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nabc\n", "deploy/id_rsa:1: looks like a private key"),
        ("data/big.txt", b"x" * (6 * 2**20), "data/big.txt: 6.0 MiB is over"),
        ("model.safetensors", b"\0" * 10, "weight files never go in the zip"),
    ],
)
def test_each_problem_is_refused_naming_the_file(tiny_run, fake_repo, tmp_path, name, data, fragment):
    repo, add = fake_repo
    add(name, data)
    with pytest.raises(SubmissionError, match=re.escape(fragment)):
        package(tiny_run[1], WEIGHTS_REPO, tmp_path / "refused.zip", repo_root=repo)
    assert not (tmp_path / "refused.zip").exists()  # nothing written


def _edited_run(final, tmp_path, edit):
    run = tmp_path / "run"
    shutil.copytree(final, run)
    m = json.loads((run / "submission.json").read_text())
    edit(m)
    (run / "submission.json").write_text(json.dumps(m))
    return run


def test_unlisted_base_is_refused_naming_the_override_that_works(tiny_run, tmp_path):
    _, final = tiny_run
    with pytest.raises(SubmissionError, match="weights_repo"):
        package(final, "not a repo id", tmp_path / "x.zip")
    run = _edited_run(final, tmp_path, lambda m: m["base_model"].update(repo_id="someone/base-model", in_manifest=False))
    with pytest.raises(SubmissionError, match="not an approved model") as refused:
        package(run, WEIGHTS_REPO, tmp_path / "x.zip")
    # The message names one override, and it is the one the packager, its CLI and the Makefile take.
    assert "--allow_unlisted true" in str(refused.value) and "ALLOW_UNLISTED=1" in str(refused.value)
    makefile = (REPO_ROOT / "Makefile").read_text()
    (line,) = [ln for ln in makefile.splitlines() if "-m submission.package" in ln]
    assert "$(if $(filter 1 true yes,$(ALLOW_UNLISTED)),--allow_unlisted true)" in line
    cli = subprocess.run(
        [sys.executable, "-m", "submission.package", "--run_dir", str(run), "--weights_repo", WEIGHTS_REPO,
         "--out", str(tmp_path / "u.zip"), "--allow_unlisted", "true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    with zipfile.ZipFile(tmp_path / "u.zip") as zf:
        assert "ARG MODEL_NAME=tiny" in zf.read("Dockerfile").decode()  # the config the run really finetuned


def test_base_id_comes_from_the_checkpoints_record_not_its_path(make_tiny_checkpoint, tmp_path):
    from finetune.provenance import base_model_id

    moved = tmp_path / "anywhere" / "my-base"
    shutil.copytree(make_tiny_checkpoint(), moved)
    assert base_model_id(moved) == ("tiny", "checkpoint_source.json")
    (moved / "checkpoint_source.json").unlink()
    assert base_model_id(moved) == ("my-base", "path")  # converted before records: said so in submission.json


def test_downloads_the_image_could_not_do_are_refused(tiny_run, tmp_path):
    _, final = tiny_run
    with pytest.raises(SubmissionError, match=r"mistralai/Mistral-7B-v0\.1 is gated .*no token"):
        package(final, "mistralai/Mistral-7B-v0.1", tmp_path / "x.zip")
    run = _edited_run(final, tmp_path, lambda m: m.update(method="adapter"))
    with pytest.raises(SubmissionError, match="'adapter' cannot be merged"):
        package(run, WEIGHTS_REPO, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_dockerfile_train_names_every_step_in_order():
    ops = instructions(REPO_ROOT / "Dockerfile.train")
    assert [rest for op, rest in ops if op == "FROM"][0].lower().count("cuda") == 1
    assert ("COPY", ". .") in ops
    cmd = [rest for op, rest in ops if op == "CMD"]
    assert len(cmd) == 1
    steps = re.findall(r"python -m submission\.reproduce (\w+)", cmd[0])
    assert steps == ["download", "data", "finetune", "merge"]
    assert not any(op in ("ARG", "ENV") and "TOKEN" in rest.upper() for op, rest in ops)
    assert "bitsandbytes" in " ".join(rest for op, rest in ops if op == "RUN")  # QLoRA runs need it


def dockerfile_train_steps() -> list[list[str]]:
    """Dockerfile.train's CMD as the argv of each of its commands (``a && b && c``)."""
    (cmd,) = [rest for op, rest in instructions(REPO_ROOT / "Dockerfile.train") if op == "CMD"]
    (shell_line,) = [arg for arg in json.loads(cmd) if "submission.reproduce" in arg]
    return [shlex.split(step) for step in shell_line.split("&&")]


@pytest.mark.slow(reason="Dockerfile.train's four steps each start a Python process (torch + litgpt imports) and rebuild the tiny base")
def test_dockerfile_train_replayed_from_the_unpacked_zip_gives_a_bit_identical_adapter(tiny_run, tmp_path):
    """Docker can't run here: its CMD's commands run as they are, in the unpacked zip, on its own code, with
    nothing else of this checkout (the base model is rebuilt by the download step)."""
    _, final = tiny_run
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(package(final, WEIGHTS_REPO, tmp_path / "s.zip")) as zf:
        zf.extractall(unpacked)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")} | {"HF_HUB_OFFLINE": "1"}
    for argv in dockerfile_train_steps():
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=unpacked, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        if argv[-1] == "download":  # the zip's code ran, not this checkout's
            assert str(unpacked / "checkpoints" / "tiny") in proc.stdout
    original = torch.load(final / "lit_model.pth.lora", weights_only=True)["model"]
    rebuilt = torch.load(unpacked / "out" / "reproduce" / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    assert original.keys() == rebuilt.keys() and all(torch.equal(original[k], rebuilt[k]) for k in original)
    assert (unpacked / "out" / "reproduce" / "merged" / "lit_model.pth").is_file()


SHA = "0123456789abcdef0123456789abcdef01234567"


def test_changed_upstream_dataset_names_the_source_its_hashes_and_its_revision(tmp_path, monkeypatch, capsys):
    import datasets
    import yaml

    from finetune import recipes

    def source(name):
        return {"name": name, "dataset": f"someone/{name}", "revision": SHA, "license": "mit", "fields": {"instruction": "q", "output": "a"}}

    rows = {"someone/a": [{"q": f"a {i}?", "a": "x"} for i in range(3)], "someone/b": [{"q": f"b {i}?", "a": "y"} for i in range(3)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: datasets.Dataset.from_list(rows[path]))
    monkeypatch.setattr(recipes.loading, "_hub_reachable", lambda timeout=0: True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "submission").mkdir()
    (tmp_path / "submission" / "recipe.yaml").write_text(yaml.safe_dump({"name": "t", "sources": [source("a"), source("b")]}))
    _, card = recipes.build(recipes.load_recipe(reproduce.RECIPE))
    (tmp_path / "submission.json").write_text(json.dumps({"data": {"recipe": "recipe.yaml", "card": card}}))
    reproduce.data()
    assert f"data verified: sha256 {card['rows_sha256']}" in capsys.readouterr().out

    rows["someone/b"][1] = {"q": "b 1, edited upstream?", "a": "y"}  # same revision, other content
    with pytest.raises(SystemExit) as changed:
        reproduce.data()
    message = str(changed.value.code)
    _, now = recipes.build(recipes.load_recipe(reproduce.RECIPE))
    b_then, b_now = card["sources"][1]["source_rows_sha256"], now["sources"][1]["source_rows_sha256"]
    assert b_then != b_now and card["sources"][0]["source_rows_sha256"] == now["sources"][0]["source_rows_sha256"]
    assert message.startswith("error: the training data changed upstream: source 'b' (someone/b, split train)")
    assert f"hash to {b_now}, recorded {b_then}, at pinned revision {SHA}" in message
    assert "source 'a'" not in message and f"recorded {card['rows_sha256']}" in message
