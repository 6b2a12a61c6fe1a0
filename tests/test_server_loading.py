"""Serving loads every kind of checkpoint the finetune scripts write, and refuses what can't work."""

import shutil
import subprocess
import sys

import pytest
import torch

from core.checkpoints import WEIGHTS, CheckpointError
from core.precision import SERVE_QUANTIZE
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.lora import LoRAArgs, setup
from finetune.merge import merge
from server.loading import load_generator
from server.schemas import ProcessRequest

PROMPTS = ["Is 4821 even or odd?\nAnswer:", "Repeat the words exactly.\nfox owl pear\nAnswer:", " leading space, 東京 🙂"]


@pytest.fixture(scope="module")
def lora_run(make_tiny_checkpoint, tmp_path_factory):
    """A short real LoRA run (adapters on every layer) and its merged twin."""
    base = make_tiny_checkpoint()
    root = tmp_path_factory.mktemp("lora_run")
    adapter = setup(
        checkpoint_dir=base,
        out_dir=root / "run",
        lr=1e-2,  # large, so the few steps move the adapters far from zero
        lora=LoRAArgs(r=4, alpha=8),
        data=DataArgs(train_file=base.parent / "data" / "train.jsonl", max_seq_length=64),
        train=TrainArgs(save_interval=None, log_interval=5, global_batch_size=4, micro_batch_size=4, lr_warmup_steps=1, max_steps=5),
        eval=EvalArgs(interval=0, max_iters=1),
    )
    unmerged = root / "unmerged"
    shutil.copytree(adapter, unmerged)
    merged = merge(adapter, out_dir=root / "merged")
    return base, unmerged, merged


def _run(generator, prompt, **kwargs):
    req = ProcessRequest(prompt=prompt, temperature=0.0, max_new_tokens=12, echo_prompt=True, top_k_per_token=3, **kwargs)
    return generator.run(req)[0][0]


def test_unmerged_lora_serves_like_its_merged_version(lora_run):
    base, unmerged, merged = lora_run
    assert not (unmerged / WEIGHTS).exists()  # really the adapter alone
    lora_gen, merged_gen, base_gen = (load_generator(d, device="cpu") for d in (unmerged, merged, base))
    assert type(lora_gen.model._forward_module).__module__ == "litgpt.lora"
    differs_from_base = False
    for prompt in PROMPTS:
        a, b, c = _run(lora_gen, prompt), _run(merged_gen, prompt), _run(base_gen, prompt)
        assert a.text == b.text
        assert [t.text for t in a.tokens] == [t.text for t in b.tokens]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.tokens, b.tokens)) < 1e-4
        for x, y in zip(a.tokens, b.tokens):
            assert x.top_logprob.keys() == y.top_logprob.keys()
        differs_from_base |= max(abs(x.logprob - y.logprob) for x, y in zip(a.tokens, c.tokens)) > 1e-3
    assert differs_from_base  # the adapter really changed the model, so the equality above means something


def test_unmerged_lora_finds_a_moved_base(lora_run, tmp_path):
    base, unmerged, _ = lora_run
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    adapter = tmp_path / "adapter"
    shutil.copytree(unmerged, adapter)
    (adapter / "hyperparameters.yaml").write_text((adapter / "hyperparameters.yaml").read_text().replace(str(base), str(tmp_path / "gone")))
    with pytest.raises(CheckpointError, match="base_checkpoint_dir"):
        load_generator(adapter, device="cpu")
    out = _run(load_generator(adapter, device="cpu", base_checkpoint_dir=moved), PROMPTS[0])
    assert out.text == _run(load_generator(unmerged, device="cpu"), PROMPTS[0]).text


def test_a_base_for_a_standalone_checkpoint_is_refused_by_the_server_and_merge(lora_run, tmp_path):
    """A merged (or base, or full) checkpoint is served and merged alone: --base_checkpoint_dir would go unread."""
    from server.__main__ import serve

    base, _, merged = lora_run
    with pytest.raises(SystemExit, match=r"^error: base_checkpoint_dir: .*merged holds no unmerged finetune weights.*drop --base_checkpoint_dir"):
        serve(checkpoint_dir=merged, device="cpu", base_checkpoint_dir=base, warmup=False)
    with pytest.raises(ValueError, match=r"^base_checkpoint_dir: .*merged is already standalone"):
        merge(merged, out_dir=tmp_path / "out", base_checkpoint_dir=base)
    assert not (tmp_path / "out").exists()


def test_merge_in_place_with_a_base_given_merges_again_from_it(lora_run, tmp_path):
    """An earlier merge next to the adapter was kept as it was (litgpt skips it); given a base, it is redone from that base."""
    from core.integrity import load_torch, save_torch

    base, unmerged, _ = lora_run
    in_place = tmp_path / "in_place"
    shutil.copytree(unmerged, in_place)
    merge(in_place)
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    weights = dict(load_torch(other / WEIGHTS, mmap=False))
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"] * 2  # no adapter on it: the merge copies it from the base
    save_torch(weights, other / WEIGHTS)
    before = load_torch(in_place / WEIGHTS, mmap=False)["transformer.wte.weight"]
    merge(in_place, base_checkpoint_dir=other)
    after = load_torch(in_place / WEIGHTS, mmap=False)["transformer.wte.weight"]
    assert torch.equal(after, weights["transformer.wte.weight"]) and not torch.equal(after, before)


def test_fp16_and_bf16_load_on_cpu(make_tiny_checkpoint):
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        gen = load_generator(make_tiny_checkpoint(), device="cpu", dtype=dtype)
        assert gen.dtype == torch_dtype
        assert _run(gen, PROMPTS[0]).tokens  # runs end to end


@pytest.mark.parametrize("mode", SERVE_QUANTIZE)
def test_quantized_modes_refused_on_cpu_with_a_clear_message(make_tiny_checkpoint, mode):
    with pytest.raises(ValueError, match=r"quantize: .*needs an NVIDIA GPU"):
        load_generator(make_tiny_checkpoint(), device="cpu", quantize=mode)


def test_unknown_quantize_and_dtype_are_named(make_tiny_checkpoint):
    with pytest.raises(ValueError, match="quantize: choose one of"):
        load_generator(make_tiny_checkpoint(), device="cpu", quantize="gptq")
    with pytest.raises(ValueError, match="dtype: choose one of"):
        load_generator(make_tiny_checkpoint(), device="cpu", dtype="int4")


def test_serve_cli_refuses_quantize_on_cpu_without_traceback(make_tiny_checkpoint):
    cmd = [sys.executable, "-m", "server", "--checkpoint_dir", str(make_tiny_checkpoint()), "--device", "cpu", "--quantize", "bnb.nf4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error: quantize: bnb.nf4" in proc.stderr and "Traceback" not in proc.stderr


def test_use_template_applies_the_style_saved_at_training(lora_run):
    base, _, merged = lora_run
    from core.prompts import load_style

    style = load_style(merged)
    assert style is not None  # finetuning saved it next to the weights
    templated = load_generator(merged, device="cpu", use_template=True)
    raw = load_generator(merged, device="cpu")
    question = "Is 4821 even or odd?"
    a = _run(templated, question)
    b = _run(raw, style.apply(question))
    assert a.text == b.text == style.apply(question) + b.text[len(style.apply(question)) :]
    assert [t.logprob for t in a.tokens] == pytest.approx([t.logprob for t in b.tokens], abs=1e-5)
    assert _run(raw, question).text.startswith(question)  # off by default: HELM's prompt is sent as is
    with pytest.raises(ValueError, match="use_template"):
        load_generator(base, device="cpu", use_template=True)  # a base model has no template
