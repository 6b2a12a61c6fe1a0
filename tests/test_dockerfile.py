"""Docker can't run here, so parse both Dockerfiles and check the pieces that matter: the tested torch as its
CUDA build, no token in any layer, an ungated default model, one copy of the weights."""

import re
import shlex

import pytest

from core.manifest import lookup
from core.paths import REPO_ROOT
from submission.package import eval_dockerfile

WEIGHT_PATTERNS = (".pth", ".safetensors", ".bin", ".gguf", "checkpoints/", "out/")
DOCKERFILES = ("Dockerfile", "Dockerfile.train")
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|AUTH", re.I)


def instructions(path=REPO_ROOT / "Dockerfile", text: str | None = None) -> list[tuple[str, str]]:
    text = path.read_text() if text is None else text
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            rows.append((op.upper(), rest.strip()))
    return rows


def makefile_torch() -> str:
    """The torch `make setup` installs, hence the one the test suite runs on (the Makefile's TORCH)."""
    match = re.search(r"^TORCH\s*\?=\s*(torch==\S+)\s*$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: no `TORCH ?= torch==<version>` line"
    return match.group(1)


def test_cuda_base_image():
    base = [rest for op, rest in instructions() if op == "FROM"]
    assert len(base) == 1 and "cuda" in base[0].lower()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_install_the_tested_torch_as_the_base_images_cuda_build(name):
    ops = instructions(REPO_ROOT / name)
    (base,) = [rest for op, rest in ops if op == "FROM"]
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*runtime\S*", base)
    assert cuda, f"{name}: FROM {base} is not an nvidia/cuda runtime image"
    installs = [rest for op, rest in ops if op == "RUN" and re.search(r"pip install \S*torch==", rest)]
    assert len(installs) == 1, f"{name}: expected one pip install of torch, found {installs}"
    words = shlex.split(installs[0])
    assert makefile_torch() in words, f"{name}: installs {installs[0]!r}, the tests run {makefile_torch()}"
    index = words[words.index("--index-url") + 1]
    assert index == f"https://download.pytorch.org/whl/cu{cuda.group(1)}{cuda.group(2)}", f"{name}: {index} is not {base}'s CUDA"
    for op, rest in ops:  # nothing installed after it may swap torch: the pins go in without a torch line
        if op == "RUN" and "constraints.txt" in rest:
            assert "grep -v '^torch=='" in rest


def test_serves_the_server_entry_point_on_port_80():
    ops = instructions()
    assert ("EXPOSE", "80") in ops
    cmd = [rest for op, rest in ops if op in ("CMD", "ENTRYPOINT")]
    assert len(cmd) == 1
    assert "python -m server" in cmd[0] and "--port 80" in cmd[0] and "--host 0.0.0.0" in cmd[0]
    assert "$CHECKPOINT_DIR" in cmd[0] and any(op == "ENV" and "CHECKPOINT_DIR=" in rest for op, rest in ops)


def test_no_weights_copied_in_and_sources_exist():
    for op, rest in instructions():
        if op not in ("COPY", "ADD"):
            continue
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert not any(p in src for p in WEIGHT_PATTERNS), f"{op} {rest} copies weights into the image"
            assert (REPO_ROOT / src).exists(), f"{op} {rest}: {src} is not in the repo"


def _download_run(ops) -> str:
    (run,) = [rest for op, rest in ops if op == "RUN" and "python -m core.hub download" in rest]
    return run


def test_the_default_build_downloads_an_ungated_model_with_no_secret():
    """The organizers build with no token: the default MODEL_REPO must download without one."""
    ops = instructions()
    (default,) = [rest.split("=", 1)[1] for op, rest in ops if op == "ARG" and rest.startswith("MODEL_REPO=")]
    entry = lookup(default)
    assert not entry.gated, f"Dockerfile: default MODEL_REPO={default} is gated ({entry.gated_source})"
    run = _download_run(ops)
    mount = re.search(r"--mount=type=secret,(\S+)", run)
    assert mount and "required=true" not in mount.group(1)  # an absent secret is fine
    assert re.search(r"if \[ -s /run/secrets/hf_token \]; then export HF_TOKEN=", run)  # read only when given


@pytest.mark.parametrize("source", ["repo", "packaged"])
def test_no_token_can_land_in_a_layer(source):
    text = (REPO_ROOT / "Dockerfile").read_text()
    if source == "packaged":
        text = eval_dockerfile(text, "someone/merged", "Mistral-7B-v0.1")
    ops = instructions(text=text)
    for op, rest in ops:
        if op in ("ARG", "ENV", "LABEL"):  # build args and env vars are kept in the image's history
            assert not SECRET_WORDS.search(rest), f"{op} {rest}: secrets go in with --secret, never as {op}"
        if op == "RUN" and "HF_TOKEN" in rest:
            assert rest.startswith("--mount=type=secret,"), f"RUN {rest[:60]}...: HF_TOKEN outside a secret mount"
            # read twice (is it there, its value into the step's environment), never copied anywhere
            assert rest.count("/run/secrets/hf_token") == 2 and 'export HF_TOKEN="$(cat /run/secrets/hf_token)"' in rest
        if op in ("COPY", "ADD"):
            assert "secret" not in rest.lower() and ".cache/huggingface" not in rest


def test_one_copy_of_the_weights_in_the_image():
    words = shlex.split(_download_run(instructions()).split("python -m core.hub download", 1)[1])
    assert words[words.index("--delete_hf_weights") + 1] == "true"


def test_dockerignore_keeps_weights_out_of_the_build_context():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in ("checkpoints/", "out/", ".venv/", "*.pth", "*.safetensors"):
        assert entry in ignored
