"""Docker can't run here, so parse the eval Dockerfile and check the pieces that matter."""

import re
import shlex

from core.paths import REPO_ROOT

WEIGHT_PATTERNS = (".pth", ".safetensors", ".bin", ".gguf", "checkpoints/", "out/")


def instructions(path=REPO_ROOT / "Dockerfile") -> list[tuple[str, str]]:
    text = path.read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            rows.append((op.upper(), rest.strip()))
    return rows


def test_cuda_base_image():
    base = [rest for op, rest in instructions() if op == "FROM"]
    assert len(base) == 1 and "cuda" in base[0].lower()


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


def test_weights_are_downloaded_by_our_hub_code_without_baking_a_token():
    ops = instructions()
    runs = " ".join(rest for op, rest in ops if op == "RUN")
    assert "python -m core.hub download" in runs
    assert not any(op in ("ARG", "ENV") and "TOKEN" in rest.upper() for op, rest in ops)  # secrets via --secret only


def test_dockerignore_keeps_weights_out_of_the_build_context():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in ("checkpoints/", "out/", ".venv/", "*.pth", "*.safetensors"):
        assert entry in ignored
