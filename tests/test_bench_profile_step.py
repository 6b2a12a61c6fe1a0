"""The step profiler on CPU: it runs our real training step and accounts for its time by category."""

from __future__ import annotations

from pathlib import Path

from bench.profile_step import category, main


def test_kernel_names_fall_into_categories() -> None:
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert category("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NTN") == "gemm"
    assert category("flash_fwd_kernel") == "attention"
    assert category("triton_poi_fused__to_copy_bitwise_and_index_mul_0") == "dequantize_4bit"
    assert category("void multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert category("aten::_foreach_addcdiv_") == "optimizer"
    assert category("Memcpy HtoD (Pinned -> Device)") == "copies"
    assert category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1") == "other"


def test_profile_of_the_tiny_model(tmp_path: Path) -> None:
    result = main(out_dir=tmp_path / "out", model_name="tiny", work_dir=tmp_path / "work", steps=2, max_seq_length=64, lora_r=4)
    assert (tmp_path / "out" / "profile_step-bf16.json").is_file()
    assert result["step_ms"] > 0 and result["busy_ms"]["gemm"] > 0 and result["top"]
    assert result["speed"]["compiled"] is False and result["speed"]["dequantize_4bit"] is None  # CPU, no 4-bit layers
    assert 0 < sum(result["busy_share"].values())
