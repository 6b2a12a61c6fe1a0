"""The dequantization bench on CPU: it times bitsandbytes and our compiled forms on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:_check_is_size:FutureWarning", "ignore:bf16 and fp16 are mixed:UserWarning")


def test_bench_times_every_form_on_every_shape(tmp_path: Path) -> None:
    from bench.dequant4bit import main

    result = main(out_dir=tmp_path, shapes=[(64, 128), (96, 64)], repeats=3)
    assert (tmp_path / "dequant4bit.json").is_file() and result["copy_bandwidth_gbs"] > 0
    assert set(result["shapes"]) == {"nf4 64x128", "nf4 96x64", "nf4-dq 64x128", "nf4-dq 96x64"}
    for row in result["shapes"].values():
        assert row["bitsandbytes"]["bit_identical"]  # the reference against itself
        assert all(row[form]["ms"] >= 0 and row[form]["effective_gbs"] > 0 for form in ("bitsandbytes", "compiled", "compiled+cast"))
        assert row["compiled_speedup"] > 0
    totals = result["nf4 all_shapes_twice_ms"]
    assert totals["compiled"] == pytest.approx(2 * sum(result["shapes"][f"nf4 {s}"]["compiled"]["ms"] for s in ("64x128", "96x64")), abs=0.02)
