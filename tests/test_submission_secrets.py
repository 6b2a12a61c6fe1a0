"""The submission's secret scan: the forms tokens take in real repos, in any encoding, and symlinks out of the repo.

Fake secrets are assembled at run time so that this file itself passes the scan of the repo.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from submission.package import Entry, SubmissionError, check_entries, tracked_files

HEX40 = "0123456789abcdef" * 2 + "01234567"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfi" + "CY3XAMPL3KEY"  # AWS's documented example, with digits
HF = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"
PEM = "-----BEGIN PGP " + "PRIVATE KEY BLOCK-----\n\nlQOYBF...\n-----END PGP PRIVATE KEY BLOCK-----\n"


def refused(name: str, data: bytes) -> str:
    with pytest.raises(SubmissionError) as info:
        check_entries([Entry("Dockerfile", b"FROM scratch\n"), Entry(name, data)], 5 * 2**20)
    return str(info.value)


@pytest.mark.parametrize(
    "name, text, kind",
    [
        ("train.py", f'import wandb\n\nwandb.login(key="{HEX40}")\n', "train.py:3: looks like a Weights & Biases API key"),
        ("train.py", f'import os\nos.environ["WANDB_API_KEY"] = "{HEX40}"\n', "train.py:2: looks like a Weights & Biases API key"),
        ("run.sh", f"export WANDB_API_KEY={HEX40}\n", "run.sh:1: looks like a Weights & Biases API key"),
        ("conf.yaml", "logger:\n  project: x\n  api_key: " + "3f9a" * 4 + "b2c1d0e9\n", "conf.yaml:3: looks like an API key or password setting"),
        ("settings.json", '{"openai": {"api_key": "' + "Ab12" * 6 + '"}}', "settings.json:1: looks like an API key or password setting"),
        ("creds", f"[default]\naws_secret_access_key = {AWS_SECRET}\n", "creds:2: looks like an AWS secret access key"),
        ("keys.py", f'SECRET = "{AWS_SECRET}"\n', "keys.py:1: looks like an AWS secret access key"),
        ("key.asc", "note\n" + PEM, "key.asc:2: looks like a private key"),
        ("gh.txt", "token ghp_" + "A1b2" * 9 + "\n", "gh.txt:1: looks like a GitHub token"),
    ],
)
def test_secret_forms_are_refused_naming_file_and_line(name, text, kind):
    assert kind in refused(name, text.encode())


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_tokens_are_found_in_any_encoding(encoding):
    text = f"# caf\u00e9 \u00e0 la cr\u00e8me\nHF_TOKEN = '{HF}'\n"
    data = text.encode(encoding)
    if encoding.startswith(("utf-16", "utf-32")):
        assert HF.encode() not in data  # not findable as raw ASCII bytes
    elif encoding != "utf-8-sig":
        with pytest.raises(UnicodeDecodeError):
            data.decode("utf-8")
    assert "notes.txt:2: looks like a Hugging Face token" in refused("notes.txt", data)


def test_token_inside_a_binary_file():
    assert "blob.bin:" in refused("blob.bin", b"\x89PNG\r\n\x1a\n\0\0\xff" + HF.encode() + b"\0\xfe")


@pytest.mark.parametrize(
    "text",
    [
        "api_key: ${WANDB_API_KEY}\n",
        "password: config.password\n",
        "client_secret=constants.OAUTH_CLIENT_SECRET,\n",
        "def f(access_token=access_token_from_env): pass\n",
        'api_key = os.environ["OPENAI_API_KEY"]\n',
        "api_key: <your key here>\n",
        "token = tokenizer.encode(text)\n",
        "wandb: off  # see https://wandb.ai\n",
        f"commit {HEX40}\n",  # a git sha, no wandb on the line
        "FlaxLongT5TransientGlobalAttention2Layer3\n",  # an identifier of 40 characters
        "see https://example.org/path/Abc123/Def456/Ghi789/Jkl0123/x\n",
    ],
)
def test_placeholders_and_code_pass(text):
    check_entries([Entry("Dockerfile", b"FROM scratch\n"), Entry("ok.txt", text.encode())], 5 * 2**20)


def _git_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "a.py").write_text("x = 1\n")
    return repo


def test_symlink_leaving_the_repo_is_refused(tmp_path):
    repo = _git_repo(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the zip\n")
    (repo / "inside.py").symlink_to("a.py")
    (repo / "leak.txt").symlink_to(outside)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    with pytest.raises(SubmissionError, match=re.escape(f"leak.txt: a tracked symlink to {outside.resolve()}, outside the repo")):
        tracked_files(repo)
    (repo / "leak.txt").unlink()
    (repo / "leak.txt").symlink_to("../secret.txt")  # relative, same escape
    with pytest.raises(SubmissionError, match="leak.txt: a tracked symlink"):
        tracked_files(repo)
    subprocess.run(["git", "rm", "-q", "-f", "leak.txt"], cwd=repo, check=True)
    assert tracked_files(repo) == ["a.py", "inside.py"]  # a symlink within the repo is fine


def test_dangling_symlink_is_refused(tmp_path):
    repo = _git_repo(tmp_path)
    (repo / "gone.txt").symlink_to("missing.txt")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    with pytest.raises(SubmissionError, match="gone.txt: a tracked symlink to .*missing.txt, which does not exist"):
        tracked_files(repo)
