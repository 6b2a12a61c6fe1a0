"""The embedded tiny default is deterministic, complete, and its data splits are honest."""

import json

import torch
from litgpt import GPT, Tokenizer

from core.checkpoints import WEIGHTS, state_dict_sha256, verify_checkpoint
from core.configs import config_from_name
from core.synthetic_tasks import generate
from core.tiny import build_tiny, init_weights


def test_same_seed_same_weights_and_tokenizer(tmp_path):
    digests, tokenizers = [], []
    for name in ("a", "b"):
        digests.append(build_tiny(tmp_path / name, tmp_path / f"{name}-data", seed=7))
        tokenizers.append((tmp_path / name / "tokenizer.json").read_bytes())
        saved = torch.load(tmp_path / name / WEIGHTS, weights_only=True)
        assert state_dict_sha256(saved) == digests[-1]  # the file holds exactly the hashed weights
    assert digests[0] == digests[1]
    assert tokenizers[0] == tokenizers[1]
    assert (tmp_path / "a-data" / "train.jsonl").read_bytes() == (tmp_path / "b-data" / "train.jsonl").read_bytes()


def test_other_seed_other_weights():
    assert state_dict_sha256(init_weights(1)) != state_dict_sha256(init_weights(2))


def test_init_does_not_disturb_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    init_weights(5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_is_a_small_llama_and_verifies(tmp_path):
    build_tiny(tmp_path / "tiny", tmp_path / "data", seed=3)
    config = verify_checkpoint(tmp_path / "tiny")
    assert config.name == "tiny" and config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm"
    assert config.n_query_groups < config.n_head  # grouped-query attention, like Mistral
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(config_from_name("tiny")).parameters())
    assert 1_000_000 < n_params < 10_000_000
    tokenizer = Tokenizer(tmp_path / "tiny")
    assert tokenizer.backend == "huggingface" and tokenizer.use_bos
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.vocab_size == config.vocab_size


def test_heldout_split_never_repeats_a_training_input(tmp_path):
    train, test = generate(n_train=2000, n_test=300, seed=11)
    train_keys = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in train_keys for r in test)
    assert {r["task"] for r in test} == {r["task"] for r in train} == {"parity", "larger", "repeat"}
    for row in train + test:  # answers are exact
        if row["task"] == "parity":
            n = int(row["instruction"].split()[1])
            assert row["output"] == ("even" if n % 2 == 0 else "odd")
        elif row["task"] == "larger":
            a, b = (int(x.strip("?,")) for x in row["instruction"].split()[-3::2])
            assert row["output"] == str(max(a, b))
        else:
            assert row["output"] == row["input"]
    assert json.dumps(generate(n_train=50, n_test=10, seed=11)) == json.dumps(generate(n_train=50, n_test=10, seed=11))
