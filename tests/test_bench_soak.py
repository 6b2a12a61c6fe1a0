"""bench.soak, briefly: it counts what it sent, the server really cancels the hang-ups, and it reports the server idle after.

The fast test soaks an in-process server (uvicorn in a thread over the batched engine on the tiny
model) through ``--url``/``--server_pid``; the slow one lets the bench start ``python -m server`` itself
and stop it with SIGTERM, as the recorded run does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import uvicorn

from bench.soak import main, percentile
from server.app import create_app
from server.batch_engine import BatchEngine
from server.loading import load_generator


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0 and percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.99) == 3.0 and percentile([], 0.5) is None


@pytest.mark.parametrize(
    ("option", "value"),
    [("clients", 0), ("duration_s", 0.0), ("disconnect_fraction", 1.5), ("warmup_s", 10.0), ("sample_every_s", 0.0)],
)
def test_bad_options_are_refused_naming_them(tmp_path, option, value) -> None:
    args = {"clients": 2, "duration_s": 5.0, "warmup_s": 1.0, option: value}
    with pytest.raises(SystemExit, match=f"--{option}"):
        main(out_dir=tmp_path, url="http://127.0.0.1:9", **args)  # refused before anything connects


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_short_soak_counts_every_request_and_the_server_cancels_the_hang_ups(make_tiny_checkpoint, tmp_path) -> None:
    engine = BatchEngine(load_generator(make_tiny_checkpoint(), device="cpu"), max_batch=16, kv_block_size=8, kv_tokens=4096)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, engine.codec), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        result = main(
            out_dir=tmp_path, url=f"http://127.0.0.1:{port}", server_pid=os.getpid(), clients=8, duration_s=3,
            disconnect_fraction=0.3, warmup_s=1, sample_every_s=0.5, seed=1,
        )  # fmt: skip
        assert engine.idle and engine.pool.held == 0  # the report's "idle" is the engine's own
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()
    assert json.loads((tmp_path / "soak.json").read_text()) == result
    assert result["errors"] == 0, result["error_samples"]
    assert result["requests_sent"] == result["requests_answered"] + result["hung_up"] + result["rejected_503"]
    assert result["requests_answered"] > 0 and result["hung_up"] > 0
    # every hang-up that reached the engine was cancelled there; the rest of what it took was answered
    assert 0 < result["server_cancelled"] <= result["hung_up"]
    assert result["server_requests"] >= result["server_cancelled"] + result["long_answered"]
    assert result["idle_after_s"] is not None and all(result["engine_after"][k] == 0 for k in ("queued", "sequences", "kv_blocks_held"))
    assert result["latency_max_s"] >= result["latency_p99_s"] >= result["latency_p50_s"] > 0
    assert sum(k["n"] for k in result["latency_by_kind"].values()) == result["requests_answered"] - result["long_answered"]
    assert result["rss_mib_start"] > 0 and result["rss_mib_end"] > 0 and result["rss_mib_after_warmup"] > 0
    assert result["timeline"] and all(p["rss_mib"] > 0 and "kv_blocks_held" in p for p in result["timeline"])
    assert result["health_status"] == 200 and result["normal_request_status"] == 200
    assert result["server_exit_code"] is None  # not ours to stop


@pytest.mark.slow(reason="the bench starts a real server process and stops it with SIGTERM, as the recorded run does")
def test_the_bench_starts_and_stops_the_server_itself(make_tiny_checkpoint, tmp_path) -> None:
    result = main(checkpoint_dir=make_tiny_checkpoint(), device="cpu", out_dir=tmp_path, clients=4, duration_s=2, disconnect_fraction=0.3,
                  warmup_s=0, sample_every_s=1, seed=2)  # fmt: skip
    assert result["errors"] == 0, result["error_samples"]
    assert result["requests_answered"] > 0 and result["rss_mib_start"] > 0 and result["rss_mib_idle_after"] > 0
    assert result["idle_after_s"] is not None and result["normal_request_status"] == 200
    # uvicorn shuts down, then re-raises the SIGTERM it caught (-15); 1 would be the drain deadline, -9 our kill
    assert result["server_exit_code"] in (0, -15) and result["server_exit_s"] is not None
    assert "serving" in (tmp_path / "soak_server.log").read_text()
