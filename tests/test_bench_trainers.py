"""The finetuning benchmark's baseline trainers (bench/baseline_trainers.py), end to end on the CPU.

Both baselines (upstream ``litgpt finetune_lora`` through its CLI, and HF + PEFT) train the tiny
model for a few steps in their own subprocess, in fp32. Checked against numbers computed here, not
taken from the trainers: every trained micro-batch is made of real rows of the data file, tokenized
as ``finetune.data.encode_row`` does (each row is found again by its ids, then right padding with 0),
and the reported useful (non-padding) token count is the sum of those rows' lengths. Upstream's own
dataset, as its CLI builds it from our argv, tokenizes exactly like ``encode_row``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from litgpt import Tokenizer
from litgpt.prompts import PromptStyle

from bench.baseline_trainers import (
    LITGPT_TARGETS,
    PAD_ID,
    Work,
    hf_lora,
    hf_model_config,
    right_pad,
    run_hf_peft,
    run_upstream_litgpt,
    upstream_argv,
)
from finetune.data import IGNORE_INDEX, encode_row, load_rows

MAX_SEQ_LENGTH = 128  # the alpaca template alone is ~60 tiny tokens; the longest rows get truncated
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "to", "big", "red", "house", "near", "river", "birds", "sang"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of varied length, half with an input; distinct outputs, so each row's ids are unique."""
    rng = random.Random(seed)
    return [
        {
            "instruction": " ".join(rng.choices(WORDS, k=rng.randint(2, 10))),
            "input": " ".join(rng.choices(WORDS, k=rng.randint(2, 8))) if i % 2 else "",
            "output": f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 45))),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint, tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny litgpt checkpoint plus the HF config.json of the same Llama architecture (conftest's tiny_hf_dir)."""
    ckpt = tmp_path_factory.mktemp("trainers") / "tiny"
    shutil.copytree(make_tiny_checkpoint(), ckpt)
    shutil.copy(tiny_hf_dir / "config.json", ckpt / "config.json")
    return ckpt


@pytest.fixture(scope="module")
def work(checkpoint) -> Work:
    data = checkpoint.parent / "rows.json"
    data.write_text(json.dumps(make_rows(24)))
    return Work(checkpoint, data, max_seq_length=MAX_SEQ_LENGTH, micro_batch_size=2, global_batch_size=4, steps=3)


@pytest.fixture(scope="module")
def encoded(work) -> list[list[int]]:
    tokenizer, style = Tokenizer(work.checkpoint_dir), PromptStyle.from_name("alpaca")
    return [encode_row(r, tokenizer, style, work.max_seq_length)["input_ids"].tolist() for r in load_rows(work.data_file)]


@pytest.fixture(scope="module")
def results(work) -> dict[str, dict]:
    """Both baselines, one after the other (together they would fight over the few CPU cores tests get)."""
    out = work.checkpoint_dir.parent
    return {"upstream": run_upstream_litgpt(work, out / "upstream", record=True), "hf": run_hf_peft(work, out / "hf", record=True)}


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def find_row(ids: list[int], encoded: list[list[int]]) -> int:
    """The data row whose encoding ``ids`` holds, followed only by padding."""
    hits = [j for j, e in enumerate(encoded) if ids[: len(e)] == e and all(t == PAD_ID for t in ids[len(e) :])]
    assert len(hits) == 1, f"micro-batch row matches {len(hits)} data rows: {ids}"
    return hits[0]


@pytest.mark.parametrize("max_seq_length", [MAX_SEQ_LENGTH, 70])
def test_upstream_tokenization_equals_encode_row(work, max_seq_length, tmp_path):
    """Upstream's train dataset, built by litgpt's own CLI parser from our argv, equals encode_row."""
    from jsonargparse import capture_parser
    from litgpt.__main__ import CLI, PARSER_DATA

    job = Work(work.checkpoint_dir, work.data_file, max_seq_length=max_seq_length)
    parser = capture_parser(lambda: CLI(PARSER_DATA))
    cfg = parser.instantiate_classes(parser.parse_args(upstream_argv(job, tmp_path, "32-true")))
    data = cfg["finetune_lora"]["data"]
    tokenizer = Tokenizer(job.checkpoint_dir)
    data.connect(tokenizer=tokenizer, batch_size=1, max_seq_length=max_seq_length)
    data.setup()
    rows, style = load_rows(job.data_file), PromptStyle.from_name("alpaca")
    assert len(data.train_dataset) == len(rows)  # no validation split: every row trains
    truncated = 0
    for k, i in enumerate(data.train_dataset.data.indices):
        theirs, ours = data.train_dataset[k], encode_row(rows[i], tokenizer, style, max_seq_length, mask_prompt=True)
        assert torch.equal(theirs["input_ids"], ours["input_ids"])
        assert torch.equal(theirs["labels"], ours["labels"])
        truncated += len(ours["input_ids"]) == max_seq_length
    assert truncated > 0, "no row reaches max_seq_length: truncation is not compared"


@pytest.mark.parametrize("kind", ["upstream", "hf"])
def test_trains_real_rows_and_counts_their_tokens(results, work, encoded, kind):
    result = results[kind]
    batches = result["batches"]
    assert result["steps"] == work.steps
    assert len(batches) == work.steps * work.accumulation
    lengths = [len(encoded[find_row(ids, encoded)]) for batch in batches for ids in batch]
    assert all(len(batch) == work.micro_batch_size for batch in batches)
    assert result["useful_tokens"] == sum(lengths)
    assert result["useful_tokens_per_step"] == pytest.approx(sum(lengths) / work.steps)
    assert result["padded_tokens"] == sum(len(b) * len(b[0]) for b in batches)
    assert result["useful_tokens"] < result["padded_tokens"], "no padding: useful and padded counts are not told apart"
    assert max(lengths) == work.max_seq_length and len(set(lengths)) > 2
    assert result["steady_steps"] == work.steps - work.steps // 2
    assert 0 < result["useful_tokens_per_s"] < result["padded_tokens_per_s"]
    assert result["peak_allocated_gib"] is None and result["peak_reserved_gib"] is None  # CPU
    assert result["wall_s"] > 0


def test_same_lora_parameters(results):
    assert results["upstream"]["trainable_params"] == results["hf"]["trainable_params"] > 0


def test_upstream_skips_merge_and_checkpoint_saves(results, work):
    run = work.checkpoint_dir.parent / "upstream" / "litgpt-run"
    assert run.is_dir()
    assert not list(run.rglob("lit_model.pth*")), "a LoRA checkpoint or merged model was written"


@pytest.mark.parametrize("targets", sorted(LITGPT_TARGETS))
def test_lora_targets_agree(make_tiny_checkpoint, targets):
    """litgpt's LoRA flags and PEFT's target modules make the same trainable parameters (count).

    The checkpoint has no config.json here: the HF config is built from the litgpt one.
    """
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
    from transformers import AutoModelForCausalLM

    checkpoint = make_tiny_checkpoint()
    assert not (checkpoint / "config.json").exists()
    job = Work(checkpoint, checkpoint / "unused.json", lora_targets=targets)
    flags = {f"lora_{k}": v for k, v in LITGPT_TARGETS[targets].items()}
    lit = GPT(Config.from_file(checkpoint / "model_config.yaml", lora_r=job.lora_r, lora_alpha=job.lora_alpha, **flags))
    mark_only_lora_as_trainable(lit)
    peft = hf_lora(AutoModelForCausalLM.from_config(hf_model_config(checkpoint)), job)
    assert trainable(lit) == trainable(peft) > 0


def test_right_pad_masks_padding():
    rows = [
        {"input_ids": torch.tensor([1, 5, 6, 2]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 6, 2])},
        {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([IGNORE_INDEX, 7])},
    ]
    batch = right_pad(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, PAD_ID, PAD_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 6, 2], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_work_round_trips_and_refuses_bad_settings(work):
    assert Work.from_json(work.to_json()) == work
    with pytest.raises(ValueError, match="lora_targets"):
        Work(work.checkpoint_dir, work.data_file, lora_targets="mlp")
    with pytest.raises(ValueError, match="multiple"):
        Work(work.checkpoint_dir, work.data_file, micro_batch_size=3, global_batch_size=4)
    with pytest.raises(ValueError, match="quantize"):
        Work(work.checkpoint_dir, work.data_file, quantize="bnb.int8")
