"""The finetuning bench on CPU: the case runs every trainer on identical rows and reports comparable numbers."""

from __future__ import annotations

from pathlib import Path

from bench.finetune import run_case, synthetic_rows


def test_synthetic_rows_have_alpaca_and_lima_like_lengths() -> None:
    lengths = sorted(len(r["output"].split()) for r in synthetic_rows("mixed", 400))
    assert lengths[len(lengths) // 2] < 250 < lengths[int(0.9 * len(lengths))]  # mostly short, a long tail
    assert all(len(r["output"].split()) == 4000 for r in synthetic_rows("2048", 3))


def test_case_runs_ours_and_hf_on_the_same_work(tmp_path: Path) -> None:
    out = run_case("tiny-mixed-r8", None, ["ours", "hf-peft"], tmp_path, steps=2)
    ours, hf = out["results"]["ours"], out["results"]["hf-peft"]
    assert "error" not in ours and "error" not in hf, out
    assert ours["speed"]["packing"] and ours["useful_tokens_per_s"] > 0 and hf["useful_tokens_per_s"] > 0
    # the same tokens per optimizer step on average: ours packs rows into as many 2048-token rows as hold them
    assert 0.5 < ours["useful_tokens_per_step"] / hf["useful_tokens_per_step"] < 2
    assert out["ours_vs_hf-peft_tokens_per_s"] > 0 and out["params"] > 0


def test_a_variant_of_ours_runs_with_its_speed_option(tmp_path: Path) -> None:
    out = run_case("tiny-mixed-r8", None, ["ours", "ours-lora-addmm", "ours-bnb-dequant"], tmp_path, steps=2)
    assert "ours-bnb-dequant" not in out["results"]  # a QLoRA lever: nothing to compare without 4-bit layers
    variant = out["results"]["ours-lora-addmm"]
    assert "error" not in variant, variant
    assert variant["speed_overrides"] == {"lora_addmm": True} and variant["speed"]["lora_addmm"] is True
    assert out["results"]["ours"]["speed"]["lora_addmm"] is False
    assert out["ours_vs_ours-lora-addmm_tokens_per_s"] > 0
