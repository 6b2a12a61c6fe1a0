"""The README's pipeline on the tiny model, end to end and fast: finetune -> merge -> serve -> query.

`make demo` runs the long version; this keeps each step from rotting between demos.
"""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from core.checkpoints import WEIGHTS, verify_checkpoint
from core.prompts import load_style
from core.tiny import build_tiny
from finetune.config import DataArgs, EvalArgs, TrainArgs
from finetune.data import DataError, load_rows
from finetune.lora import LoRAArgs, setup
from finetune.merge import merge
from server.app import create_app
from server.engine import make_engine
from server.loading import load_generator


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    build_tiny(root / "tiny", root / "data", seed=5)
    return root


@pytest.fixture(scope="module")
def finetuned(tiny):
    adapter = setup(
        checkpoint_dir=tiny / "tiny",
        out_dir=tiny / "run",
        lora=LoRAArgs(r=4, alpha=8),
        data=DataArgs(train_file=tiny / "data" / "train.jsonl", prompt_style="qa", max_seq_length=64),
        train=TrainArgs(save_interval=2, log_interval=1, global_batch_size=4, micro_batch_size=2, lr_warmup_steps=1, max_steps=3),
        eval=EvalArgs(interval=2, max_iters=1),
    )
    return adapter


def test_finetune_writes_a_complete_adapter(finetuned, tiny):
    for name in (f"{WEIGHTS}.lora", "hyperparameters.yaml", "model_config.yaml", "tokenizer.json", "prompt_style.yaml"):
        assert (finetuned / name).is_file(), name
    adapter = torch.load(finetuned / f"{WEIGHTS}.lora", weights_only=True)["model"]
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # training moved B off zero
    assert (tiny / "run" / "step-000002" / f"{WEIGHTS}.lora").is_file()  # periodic save
    assert type(load_style(finetuned)).__name__ == "QA"
    metrics = (tiny / "run" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("step,loss") and len(metrics) == 1 + 3  # header + one row per step
    assert (tiny / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_then_serve(finetuned, tiny):
    merged = merge(finetuned, out_dir=tiny / "merged")
    verify_checkpoint(merged)
    assert (merged / "prompt_style.yaml").is_file()  # the template travels with the weights
    base = torch.load(tiny / "tiny" / WEIGHTS, weights_only=True)
    new = torch.load(merged / WEIGHTS, weights_only=True)
    assert set(base) == set(new) and any(not torch.equal(base[k], new[k]) for k in base)

    generator = load_generator(merged, device="cpu")
    with TestClient(create_app(make_engine(generator), generator.codec)) as client:
        ids = client.post("/tokenize", json={"text": "Is 12 even or odd?", "truncation": False, "max_length": 2048}).json()["tokens"]
        assert ids[0] == generator.codec.bos_id
        assert client.post("/decode", json={"tokens": ids}).json()["text"] == "Is 12 even or odd?"
        greedy = client.post(
            "/process", json={"prompt": "Is 12 even or odd?\nAnswer:", "temperature": 1e-7, "max_new_tokens": 5, "stop_sequences": ["\n"]}
        ).json()
        assert "\n" not in greedy["text"] and len(greedy["tokens"]) <= 5
        assert "".join(t["text"] for t in greedy["tokens"]) == greedy["text"]
        echo = client.post("/process", json={"prompt": "Is 12 even or odd?", "echo_prompt": True, "max_new_tokens": 0, "top_k_per_token": 2}).json()
        assert echo["text"] == "Is 12 even or odd?" and len(echo["tokens"]) == len(ids) - 1
        assert echo["logprob"] == pytest.approx(sum(t["logprob"] for t in echo["tokens"]))
        assert client.get("/health").json()["status"] == "ready"


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', ".jsonl", ":2: invalid JSON"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n', ".jsonl", ":2: field 'instruction'"),
        ('{"prompt": "p", "response": ""}\n', ".jsonl", ":1: empty output"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', ".jsonl", ":1: 'messages' has no assistant turn"),
        ('{"rows": []}', ".json", "must hold a list"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, content, suffix, fragment):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_all_row_shapes_normalize(tmp_path):
    rows = [
        {"instruction": "i", "input": "x", "output": "o"},
        {"prompt": "p", "response": "r"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert load_rows(path) == [
        {"instruction": "i", "input": "x", "output": "o"},
        {"instruction": "p", "input": "", "output": "r"},
        rows[2],  # a conversation keeps every turn, the system turn included
    ]
