"""NEFTune: the noise transformers' Trainer adds (the reference), its scale, and none at eval or serve time."""

import json
import math

import pytest
import torch
import yaml
from transformers.trainer_utils import neftune_post_forward_hook

from finetune import lora, neftune
from finetune.config import DataArgs, EvalArgs, TrainArgs
from server.loading import load_generator
from server.schemas import ProcessRequest


def test_the_noise_equals_transformers_neftune_hook_draw_for_draw():
    ours, theirs = torch.nn.Embedding(100, 48), torch.nn.Embedding(100, 48)
    theirs.load_state_dict(ours.state_dict())
    theirs.neftune_noise_alpha = 5.0
    theirs.register_forward_hook(neftune_post_forward_hook)
    ours.register_forward_hook(neftune.forward_hook(5.0))
    ids = torch.randint(0, 100, (3, 17))
    torch.manual_seed(7)
    a = ours(ids)
    torch.manual_seed(7)
    b = theirs(ids)
    assert torch.equal(a, b) and not torch.equal(a, ours.eval()(ids))


def test_noise_is_uniform_with_half_width_alpha_over_sqrt_l_d():
    B, L, d, alpha = 8, 128, 64, 5.0
    x = torch.zeros(B, L, d)
    torch.manual_seed(0)
    noise = neftune.add_noise(x, alpha)
    bound = alpha / math.sqrt(L * d)
    assert neftune.noise_bound(alpha, L, d) == pytest.approx(bound)
    n = noise.numel()
    assert noise.abs().max() <= bound and noise.abs().max() > bound * (1 - 20 / n)  # fills [-b, b]
    sd_mean = bound / math.sqrt(3 * n)  # U(-b, b): mean 0, variance b^2/3
    assert abs(noise.mean().item()) < 5 * sd_mean
    assert noise.var().item() == pytest.approx(bound**2 / 3, rel=0.03)
    # Each quarter of [-b, b] holds a quarter of the draws.
    counts = torch.histc(noise, bins=4, min=-bound, max=bound) / n
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)


def test_bad_alpha_is_refused_by_name():
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="neftune_alpha"):
            neftune.check_alpha(bad)
    assert neftune.attach(torch.nn.Module(), 0) is None  # off: nothing attached


def test_noise_in_training_only_on_a_litgpt_model(make_tiny_checkpoint):
    from litgpt.model import GPT

    from core.checkpoints import load_config

    gpt = GPT(load_config(make_tiny_checkpoint()))
    ids = torch.randint(0, gpt.config.vocab_size, (2, 16))
    with torch.no_grad():
        clean = gpt.eval()(ids)
        handle = neftune.attach(gpt, 5.0)
        assert torch.equal(gpt.eval()(ids), clean)  # eval mode: bit-identical
        noisy = gpt.train()(ids)
        assert not torch.allclose(noisy, clean)
        handle.remove()
        assert torch.equal(gpt.train()(ids), clean)  # no dropout in tiny: the difference was the noise


def test_a_neftune_run_trains_differently_records_alpha_and_serves_without_noise(make_tiny_checkpoint, tmp_path):
    base_dir = make_tiny_checkpoint()
    train_file = base_dir.parent / "data" / "train.jsonl"
    args = dict(
        checkpoint_dir=base_dir,
        data=DataArgs(train_file=train_file, max_seq_length=64),
        eval=EvalArgs(interval=2, max_iters=2),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=8, micro_batch_size=8, lr_warmup_steps=1, max_steps=3, max_norm=1.0),
    )
    plain = lora.setup(out_dir=tmp_path / "plain", **args)
    noisy = lora.setup(out_dir=tmp_path / "noisy", neftune_alpha=15.0, **args)
    assert yaml.safe_load((noisy / "hyperparameters.yaml").read_text())["neftune_alpha"] == 15.0
    assert json.loads((noisy / "submission.json").read_text())["finetune"]["neftune_alpha"] == 15.0
    rows = lambda run: [line.split(",") for line in (run.parent / "metrics.csv").read_text().splitlines()[1:]]  # noqa: E731
    # Step 1's loss is computed before any update: with noise it differs; the weights then differ too.
    assert rows(plain)[0][1] != rows(noisy)[0][1]
    generator = load_generator(noisy, device="cpu")
    wte = generator.model._forward_module.transformer.wte if hasattr(generator.model, "_forward_module") else generator.model.transformer.wte
    assert not wte._forward_hooks  # the served model carries no NEFTune hook
    request = ProcessRequest(prompt="Is 3 even or odd?\nAnswer:", temperature=0, max_new_tokens=0, echo_prompt=True)
    first = generator.run(request)[0][0]
    generator.model.train()  # even a model left in train mode would add nothing: no hook is there
    assert generator.run(request)[0][0].logprob == first.logprob
