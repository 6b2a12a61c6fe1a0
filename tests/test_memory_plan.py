"""The memory planner: estimates by part, the fastest plan that fits, stepping down on a real OOM, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from litgpt.utils import save_config

from core.configs import config_from_name
from finetune.memory_plan import GIB, ModelShape, Plan, candidates, choose, estimate_gib, main, probe_plan

MISTRAL = ModelShape(  # ModelShape.of(Mistral-7B with r16 LoRA on every linear layer and the head)
    linear_params=7_110_393_856,
    other_params=131_338_240,
    trainable_params=42_520_576,
    n_layer=32,
    n_embd=4096,
    kv_size=1024,
    intermediate=14336,
    vocab=32000,
)


def test_shape_of_a_lora_model_counts_frozen_and_trainable_parameters() -> None:
    import dataclasses

    from core.methods import METHODS

    method = METHODS["lora"]
    flags = {f"lora_{k}": True for k in ("query", "key", "value", "projection", "mlp", "head")}
    with torch.device("meta"):
        model = method.litgpt.GPT(
            method.litgpt.Config(**{**dataclasses.asdict(config_from_name("Mistral-7B-v0.1")), "lora_r": 16, "lora_alpha": 32, **flags})
        )
    method.freeze_all_but_trainable(model)
    assert ModelShape.of(model) == MISTRAL
    assert sum(p.numel() for p in model.parameters()) == MISTRAL.linear_params + MISTRAL.other_params + MISTRAL.trainable_params


def test_estimates_grow_the_way_memory_does() -> None:
    bf16 = estimate_gib(MISTRAL, 2048, False, None, False)
    nf4 = estimate_gib(MISTRAL, 2048, False, "bnb.nf4", False)
    assert 13 < bf16["weights"] < 14 and 3.5 < nf4["weights"] < 4.5  # 2 bytes vs ~0.56 bytes per linear weight
    assert estimate_gib(MISTRAL, 4096, False, None, False)["activations"] == pytest.approx(2 * bf16["activations"])
    assert estimate_gib(MISTRAL, 2048, True, None, False)["activations"] < bf16["activations"] / 10
    full = estimate_gib(dataclass_replace(MISTRAL, trainable_params=7_241_732_096, linear_params=0, other_params=0), 2048, True, None, True)
    assert full["weights"] > 50  # weights, gradients and two AdamW states


def dataclass_replace(shape: ModelShape, **changes) -> ModelShape:
    import dataclasses

    return dataclasses.replace(shape, **changes)


def test_choose_prefers_no_checkpointing_then_the_largest_micro_batch() -> None:
    assert candidates(8, 2048)[:4] == [(8, False), (4, False), (2, False), (1, False)]
    big = choose(MISTRAL, 80, 2048, 8, None, False)
    assert big.fits and not big.checkpoint_blocks and big.micro_batch_size >= 2
    qlora_4090 = choose(MISTRAL, 24, 2048, 8, "bnb.nf4", False)
    assert qlora_4090.fits and not qlora_4090.checkpoint_blocks and qlora_4090.micro_batch_size == 1
    bf16_4090 = choose(MISTRAL, 24, 2048, 8, None, False)
    assert bf16_4090.fits and bf16_4090.checkpoint_blocks
    hopeless = choose(MISTRAL, 8, 2048, 8, None, False)
    assert not hopeless.fits and "DOES NOT FIT" in hopeless.describe()


def test_probe_plan_steps_down_past_plans_that_run_out_of_memory() -> None:
    plans = [Plan(4, False, 70, 80), Plan(2, False, 40, 80), Plan(1, True, 20, 80)]
    tried = []

    def step(plan: Plan) -> None:
        tried.append(plan.micro_batch_size)
        if plan.micro_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    logs = []
    assert probe_plan(step, plans, log=logs.append) == plans[1]
    assert tried == [4, 2] and "ran out of memory" in logs[0]
    with pytest.raises(RuntimeError, match="quantize"):
        probe_plan(lambda p: (_ for _ in ()).throw(torch.OutOfMemoryError()), plans, log=logs.append)


def test_cli_plans_every_track_from_the_config_alone(tmp_path: Path, capsys) -> None:
    save_config(config_from_name("Mistral-7B-v0.1"), tmp_path)  # model_config.yaml only, no weights
    plans = main(tmp_path, quantize="bnb.nf4")
    out = capsys.readouterr().out
    assert set(plans) == {"rtx4090", "a100-40gb", "a100-80gb"} and all(p.fits for p in plans.values())
    assert "rtx4090" in out and "micro_batch_size" in out
    full = main(tmp_path, method="full", gpu_memory_gib=24)
    assert not full["this GPU"].fits and "no track fits" in capsys.readouterr().out
    assert main(model_name="Mistral-7B-v0.1", quantize="bnb.nf4") == plans  # the same, before any download
    with pytest.raises(ValueError, match="model_name"):
        main()


def test_budget_plans_for_what_the_card_leaves_the_allocator() -> None:
    from core.gpu_memory import CUDA_CONTEXT_GIB
    from finetune.memory_plan import Budget

    a100 = Budget(40.0)
    assert a100.usable_gib == 40.0 - CUDA_CONTEXT_GIB
    assert a100.plan_gib == a100.usable_gib - 2.0  # 5% of 40 GiB is more than 1 GiB
    assert Budget(12.0).plan_gib == 12.0 - CUDA_CONTEXT_GIB - 1.0  # at least 1 GiB
    # the 40 GiB A100 track now plans a 14B LoRA for 37.25 GiB, not 40
    plans = main(model_name="Qwen2.5-14B", lora_r=8, max_seq_length=2048, gpu_memory_gib=40)
    assert plans["this GPU"].budget_gib == a100.plan_gib and plans["this GPU"].peak_gib <= a100.plan_gib


def test_probe_plan_steps_down_past_a_peak_over_the_limit(monkeypatch) -> None:
    plans = [Plan(4, False, 30, 37), Plan(2, False, 20, 37)]
    peaks = iter([38.0 * GIB, 25.0 * GIB])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: next(peaks))
    logs = []
    assert probe_plan(lambda p: None, plans, log=logs.append, limit_gib=37.0) == plans[1]
    assert "peaked at 38.0 GiB" in logs[0] and "over the 37.0 GiB" in logs[0] and "peaked at 25.0 GiB" in logs[1]


def test_several_devices_plan_one_devices_memory_replicated_or_sharded(tmp_path: Path, capsys) -> None:
    one = estimate_gib(MISTRAL, 2048, False, None, False)
    ddp = estimate_gib(MISTRAL, 2048, False, None, False, devices=2, strategy="ddp")
    fsdp = estimate_gib(MISTRAL, 2048, False, None, False, devices=4, strategy="fsdp")
    for part in ("weights", "trainable+optimizer", "activations", "logits"):
        assert ddp[part] == one[part]  # DDP replicates the model on every GPU
        assert fsdp[part] == pytest.approx(one[part] / 4 if part in ("weights", "trainable+optimizer") else one[part])
    assert ddp["ddp buckets"] == pytest.approx(MISTRAL.trainable_params * 2 / GIB)  # the all-reduce's gradient copy
    block = (one["weights"] + MISTRAL.trainable_params * 2 / GIB) / MISTRAL.n_layer
    assert fsdp["fsdp gathered"] == pytest.approx(2 * block)  # two blocks unsharded at a time
    assert fsdp["total"] < one["total"] - 9 < ddp["total"] - 9
    # A full finetune of Mistral-7B does not fit one 40 GB card, nor 8 with DDP; sharded over 8 it does.
    full_shape = dataclass_replace(MISTRAL, trainable_params=7_241_732_096, linear_params=0, other_params=0)
    assert not choose(full_shape, 37, 2048, 8, None, True).fits
    assert not choose(full_shape, 37, 2048, 8, None, True, devices=8, strategy="ddp").fits
    sharded = choose(full_shape, 37, 2048, 8, None, True, devices=8, strategy="fsdp")
    assert sharded.fits and sharded.micro_batch_size == 1  # 8 rows a step over 8 GPUs: one row each
    assert choose(MISTRAL, 80, 2048, 8, None, False, devices=4).micro_batch_size <= 2  # a divisor of 8 / 4
    with pytest.raises(ValueError, match="global_batch_size: 6 rows do not split over 4 devices"):
        choose(MISTRAL, 80, 2048, 6, None, False, devices=4)

    save_config(config_from_name("Mistral-7B-v0.1"), tmp_path)
    plans = main(tmp_path, method="full", devices=8, strategy="fsdp", global_batch_size=8)
    assert plans["a100-40gb"].fits and "x 8 (fsdp, per GPU)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"^quantize: bnb.nf4 \(QLoRA\) trains on one device"):
        main(tmp_path, quantize="bnb.nf4", devices=2)
    with pytest.raises(ValueError, match="global_batch_size: 16 rows do not split over --devices 3"):
        main(tmp_path, devices=3)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--method", "full", "--quantize", "bnb.nf4"], "error: quantize: full finetuning trains every weight and cannot train bnb.nf4 ones"),
        (["--method", "adapter", "--lora_r", "8"], "error: lora_r: adapter has no LoRA layers, so the rank changes nothing in its plan"),
        (["--strategy", "fsdp"], "error: strategy: fsdp shards over several GPUs and one device plans alone"),
        (["--quantize", "bnb.nf3"], "error: quantize: choose one of bnb.nf4, bnb.fp4, bnb.nf4-dq, bnb.fp4-dq, bnb.int8-training, got 'bnb.nf3'"),
    ],
)
def test_cli_refuses_an_option_the_plan_would_not_read(capsys, flags, expected) -> None:
    """Accepted, each of these would print the plan without it (the full plan ignores quantize, adapters have no rank)."""
    from core.cli import run_cli

    with pytest.raises(SystemExit) as stopped:
        run_cli(main, args=["--model_name", "Mistral-7B-v0.1", *flags])
    assert stopped.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(expected) and "micro_batch_size" not in captured.out
    assert main(model_name="Mistral-7B-v0.1", method="adapter", lora_r=16)  # the default rank with another method still plans
