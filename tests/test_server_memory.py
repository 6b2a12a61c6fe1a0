"""The CPU server's memory follows the served window, not the model's block_size.

SmolLM2-135M (litgpt's config, random weights) has an 8,192-token block_size; with the old row cache
(17 rows of the whole block_size) its server held 15.8 GB. Served as ``python -m server`` on the
CPU (fp32: 0.65 GB of weights) with a full-window echo and a few shorter prompts, the process stays under
1.5 GB resident. The same holds for the real SmolLM2-135M (``core.smollm2``, real weights and tokenizer);
its resident memory is printed (``pytest -s``): 1.29 GiB after the requests (peak 1.55 GiB), CPU fp32, measured here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.random_checkpoint import write_random_checkpoint
from core.configs import config_from_name

LIMIT_BYTES = 1.5e9


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


@pytest.mark.slow(reason="writes, loads and serves a 135M-parameter model in a real server process")
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc")
@pytest.mark.parametrize("weights", ["random", "real"])
def test_a_135m_model_with_an_8k_block_size_serves_under_1_5_gb(request, make_tiny_checkpoint, tmp_path, weights: str) -> None:
    assert config_from_name("SmolLM2-135M").block_size == 8192
    if weights == "real":
        checkpoint = request.getfixturevalue("smollm2_checkpoint")
    else:
        checkpoint = write_random_checkpoint("SmolLM2-135M", tmp_path / "smollm2", make_tiny_checkpoint())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "server", "--checkpoint_dir", str(checkpoint), "--port", str(port), "--device", "cpu"]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        words = "the quick brown fox jumps over the lazy dog " * 300  # a long few-shot prompt: left-truncated to the window
        bodies = [{"prompt": words[:1500] + f" question {i}", "max_new_tokens": 8, "temperature": 0} for i in range(3)]
        bodies.append({"prompt": words, "max_new_tokens": 0, "echo_prompt": True})
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(url + "/process", json=b, timeout=300), bodies))
        assert [a.status_code for a in answers] == [200] * len(bodies)
        assert answers[-1].json()["truncated_prompt_tokens"] > 0
        rss = _rss(process.pid)
        print(f"SmolLM2-135M ({weights} weights) server: resident {rss / 2**30:.2f} GiB, peak {_rss(process.pid, 'VmHWM') / 2**30:.2f} GiB")
        assert rss < LIMIT_BYTES, f"resident {rss / 2**30:.2f} GiB (peak {_rss(process.pid, 'VmHWM') / 2**30:.2f} GiB)"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
