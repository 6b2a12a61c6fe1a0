"""bench.soak against the real tiny-model server, briefly: it counts answers and hang-ups, and the server stays up."""

from __future__ import annotations

import json

import pytest

from bench.soak import main


@pytest.mark.slow(reason="starts a real server process; the soak itself runs 4 s")
def test_short_soak_answers_counts_hang_ups_and_leaves_the_server_idle(make_tiny_checkpoint, tmp_path):
    result = main(checkpoint_dir=make_tiny_checkpoint(), device="cpu", out_dir=tmp_path, clients=6, duration_s=4, disconnect_fraction=0.3, seed=1)
    assert json.loads((tmp_path / "soak.json").read_text()) == result
    assert result["errors"] == 0, result["error_samples"]
    assert result["requests_answered"] > 0 and result["hung_up"] > 0
    assert result["latency_p99_s"] >= result["latency_p50_s"] > 0
    assert result["rss_mib_end"] > 0 and result["rss_mib_start"] > 0
    assert result["health_status"] == 200 and result["normal_request_status"] == 200
    assert result["server_exit_code"] in (0, -15) and result["server_exit_s"] < 60  # SIGTERM ended it, no kill needed
