"""The server against real references: transformers on the same weights, and the tokenizer libraries.

1. Logprobs and greedy decoding: a tiny HF Llama checkpoint is converted with ``core.hub.convert``
   and served (float32, CPU); every logprob, top_logprob and greedy token the server returns is
   compared with ``LlamaForCausalLM`` (eager attention, float32) run on the original HF files.
   The conftest checkpoint is initialised with std 0.02, so its next-token distributions are nearly
   flat and a greedy argmax could flip on float noise. This module re-initialises the same
   architecture with std 0.2 (peaked distributions) and checks the top-2 logit gap at every greedy
   position before claiming identical tokens.
2. Tokenization: ``/tokenize``, ``/decode`` and echo token texts for both litgpt tokenizer backends,
   against ``tokenizers`` / ``sentencepiece`` used directly (and transformers' AutoTokenizer for the
   ``tokenizer.json`` one).
"""

from __future__ import annotations

import codecs
import re
import shutil
from pathlib import Path

import pytest
import torch

from core.hub import convert

ATOL = 1e-4  # float32 litgpt (KV cache) vs float32 transformers (full forward); observed <= 3e-5
MIN_GAP = 1e-3  # smallest top-1/top-2 logit gap at which "same greedy token" is a fair claim
INIT_STD = 0.2
GREEDY_TOKENS = 20
TOP_K = 5
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")

PARITY_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "café naïve 👍🏽 東京 北京 🚀 done",
    "  \n\n  leading spaces\nand newlines",
    "family: 👨\u200d👩\u200d👧",  # ends inside one run of 18 byte-fallback tokens
]
GREEDY_PROMPTS = [PARITY_PROMPTS[0], PARITY_PROMPTS[1], PARITY_PROMPTS[3]]

LONG_PARAGRAPH = (
    "A base model has read a great deal of text, but it has not learned to follow instructions. "
    "The team adapts it on one graphics card within one day — café, naïve, façade, 東京 and 北京 "
    "included — and then   measures it\twith HELM.\n\nScores 1234567890 go up 🚀; nobody 👍🏽 the "
    "deadline.  Trailing words, two spaces, and a final newline.\n"
)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve",
    "👍🏽",  # two code points (thumbs up + skin tone), 8 byte-fallback tokens
    "🚀",
    "go 👍🏽 and 🚀 now",
    "東京 北京",
    "  x",
    "x  ",
    "a   b    c",
    "\n\nA\n",
    "a\tb\t\tc",
    "\t",
    " ",
    "\n",
    "a\r\nb",
    "e\u0301 a\u00a0b ß\u200b",  # combining accent, no-break space, zero-width space
    "👨\u200d👩\u200d👧",  # zero-width-joiner sequence
    "  Mixed: café 🚀 東京\n\tend  ",
    LONG_PARAGRAPH,
    "",
]

BACKENDS = ["huggingface", "sentencepiece"]


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def peaked_dir(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny HF Llama checkpoint with std-0.2 weights, converted in place (HF + litgpt files)."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("parity") / "tiny"
    shutil.copytree(tiny_hf_dir, out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm gains around 1 (not all 1: exercise them too)
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    convert(out, "tiny")
    return out


@pytest.fixture(scope="module")
def hf_model(peaked_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(peaked_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tokenizer(peaked_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(peaked_dir)


@pytest.fixture
def client(serve, peaked_dir: Path):
    return serve(peaked_dir)


class Reference:
    """A checkpoint's tokenizer used directly through its own library (not through litgpt)."""

    def __init__(self, checkpoint_dir: Path, backend: str) -> None:
        self.backend = backend
        if backend == "huggingface":
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
            self.unk_id, self.bos_id, self.eos_id = (self.tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>"))
        else:
            import sentencepiece as spm

            self.tok = spm.SentencePieceProcessor(model_file=str(checkpoint_dir / "tokenizer.model"))
            self.unk_id, self.bos_id, self.eos_id = self.tok.unk_id(), self.tok.bos_id(), self.tok.eos_id()

    def encode(self, text: str) -> list[int]:
        if self.backend == "huggingface":
            return self.tok.encode(text).ids  # its post-processor adds <s>
        return [self.tok.bos_id()] + self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.backend == "huggingface":
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids)

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback token stands for, else None."""
        piece = self.tok.id_to_token(token_id) if self.backend == "huggingface" else self.tok.id_to_piece(token_id)
        m = BYTE_PIECE.fullmatch(piece or "")
        return int(m.group(1), 16) if m else None


# ---------------------------------------------------------------------------------------------------
# Helpers


def _process(client, **body) -> dict:
    r = client.post("/process", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _tokenize(client, text: str, **body) -> list[int]:
    r = client.post("/tokenize", json={"text": text, **body})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _decode(client, ids: list[int]) -> str:
    r = client.post("/decode", json={"tokens": ids})
    assert r.status_code == 200, r.text
    return r.json()["text"]


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-softmax of transformers' logits; row i predicts token i + 1."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _hf_greedy(hf_model, ids: list[int], n: int) -> tuple[list[int], bool]:
    """transformers' greedy continuation of ``ids`` (EOS removed) and whether it stopped on EOS."""
    eos = hf_model.config.eos_token_id
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            num_beams=1,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(ids) :].tolist()
    if eos in out:
        return out[: out.index(eos)], True
    return out, False


def _assert_top_matches(top: dict[str, float], ref_row: torch.Tensor, k: int, where: str) -> None:
    """Server top_logprob values are transformers' top-k at that position, in order; entries whose
    texts coincide are merged by the server (keeping the likelier), so they form a subsequence."""
    ref = ref_row.topk(k).values.tolist()
    got = sorted(top.values(), reverse=True)
    assert 1 <= len(got) <= k, f"{where}: {len(got)} top_logprob entries for k={k}"
    assert abs(got[0] - ref[0]) < ATOL, f"{where}: best {got[0]} vs transformers {ref[0]}"
    j = 0
    for v in got:
        while j < len(ref) and abs(ref[j] - v) >= ATOL:
            j += 1
        assert j < len(ref), f"{where}: top_logprob {got} is not a subsequence of transformers' top-{k} {ref}"
        j += 1


def _assert_streamable_bytes(reference: Reference, ids: list[int], gen: list[int]) -> None:
    """Precondition for comparing the server's text with transformers' decode of the whole sequence.

    tokenizers' ByteFallback decoder decodes each run of consecutive byte tokens as a whole: if any
    byte of the run is invalid UTF-8, *every* byte of the run becomes U+FFFD, even characters that
    were complete before the bad byte. A server that streams text per token has already returned
    those characters, so for such garbage runs (a random model can generate them) the two cannot
    agree. Check that every run touching the continuation is valid UTF-8 as a whole, or starts in
    the continuation, is at most 3 bytes and completes no character before it breaks (so the server
    holds it back and then emits U+FFFD per byte, as the decoder does)."""
    seq = ids + gen
    i = 0
    while i < len(seq):
        if reference.byte_value(seq[i]) is None:
            i += 1
            continue
        j = i
        while j < len(seq) and reference.byte_value(seq[j]) is not None:
            j += 1
        if j > len(ids):  # the run reaches into the continuation
            run = bytes(reference.byte_value(t) for t in seq[i:j])
            try:
                run.decode("utf-8")
            except UnicodeDecodeError:
                prefixes_invalid = all(_invalid_utf8(run[:k]) for k in range(1, len(run)))
                assert i >= len(ids) and len(run) <= 3 and prefixes_invalid, (
                    f"generated byte run {run!r} cannot be compared with a whole-sequence decode; pick another prompt or seed"
                )
        i = j


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _assert_gap(ref: torch.Tensor, rows: range, where: str) -> None:
    top2 = ref[rows.start : rows.stop].topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > MIN_GAP, f"{where}: top-2 logprob gap {gap:.2g} too small for a fair greedy comparison"


# ---------------------------------------------------------------------------------------------------
# 1. Logprob and greedy parity with transformers


def test_tokenizer_agrees_with_transformers_on_parity_prompts(client, hf_tokenizer) -> None:
    # Everything below feeds transformers the ids AutoTokenizer produces; they must be the server's.
    for prompt in PARITY_PROMPTS:
        assert _tokenize(client, prompt) == hf_tokenizer(prompt)["input_ids"], repr(prompt)


@pytest.mark.parametrize("prompt", PARITY_PROMPTS)
def test_echo_logprobs_match_transformers(client, hf_model, hf_tokenizer, prompt: str) -> None:
    ids = hf_tokenizer(prompt)["input_ids"]
    assert ids[0] == hf_tokenizer.bos_token_id
    ref = _hf_logprobs(hf_model, ids)
    r = _process(client, prompt=prompt, echo_prompt=True, max_new_tokens=0, top_k_per_token=TOP_K)
    tokens = r["tokens"]
    assert len(tokens) == len(ids) - 1  # BOS is not returned
    assert r["text"] == prompt
    assert "".join(t["text"] for t in tokens) == prompt
    for pos, tok in enumerate(tokens, start=1):  # returned token i is ids[i + 1], conditioned on ids[: i + 1]
        expected = ref[pos - 1, ids[pos]].item()
        assert abs(tok["logprob"] - expected) < ATOL, f"{prompt!r} token {pos}: {tok['logprob']} vs {expected}"
        _assert_top_matches(tok["top_logprob"], ref[pos - 1], TOP_K, f"{prompt!r} token {pos}")
    expected_sum = sum(ref[pos - 1, ids[pos]].item() for pos in range(1, len(ids)))
    assert abs(r["logprob"] - expected_sum) < ATOL * len(tokens)
    assert abs(r["logprob"] - sum(t["logprob"] for t in tokens)) < 1e-6 * len(tokens)


@pytest.mark.parametrize("temperature", [1e-7, 0.0])
@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_generation_matches_transformers(client, hf_model, hf_tokenizer, peaked_dir: Path, prompt: str, temperature: float) -> None:
    ids = hf_tokenizer(prompt)["input_ids"]
    gen, stopped = _hf_greedy(hf_model, ids, GREEDY_TOKENS)
    assert gen, "transformers produced EOS at once; nothing to compare"
    ref = _hf_logprobs(hf_model, ids + gen)
    # Positions where a greedy token was chosen (plus the one that chose EOS, if it stopped early).
    chosen = range(len(ids) - 1, len(ids) - 1 + len(gen) + int(stopped))
    _assert_gap(ref, chosen, repr(prompt))

    reference = Reference(peaked_dir, "huggingface")
    _assert_streamable_bytes(reference, ids, gen)

    r = _process(client, prompt=prompt, temperature=temperature, max_new_tokens=GREEDY_TOKENS)
    tokens = r["tokens"]
    assert len(tokens) == len(gen)
    # The continuation as HELM uses it: prompt text + completion text == decode(prompt ids + generated ids).
    # (decode(generated ids) alone is not the reference: the decoder drops a leading space there.)
    prompt_text = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert prompt_text == prompt
    assert prompt_text + r["text"] == hf_tokenizer.decode(ids + gen, skip_special_tokens=True)
    assert "".join(t["text"] for t in tokens) == r["text"]

    for i, tok in enumerate(tokens):
        expected = ref[len(ids) - 1 + i, gen[i]].item()
        assert abs(tok["logprob"] - expected) < ATOL, f"{prompt!r} generated token {i}: {tok['logprob']} vs {expected}"
        # Greedy took the argmax, so the single top_logprob entry is the token itself.
        ((key, value),) = tok["top_logprob"].items()
        assert abs(value - tok["logprob"]) < 1e-6
        in_char = reference.byte_value(gen[i]) is not None or (i > 0 and reference.byte_value(gen[i - 1]) is not None)
        if not in_char:  # byte tokens: the key is the byte's own text, the token's text may be held back
            assert key == tok["text"], f"generated token {i}: top_logprob key {key!r} vs text {tok['text']!r}"
    assert abs(r["logprob"] - sum(t["logprob"] for t in tokens)) < 1e-6 * len(tokens)
    expected_sum = sum(ref[len(ids) - 1 + i, gen[i]].item() for i in range(len(gen)))
    assert abs(r["logprob"] - expected_sum) < ATOL * len(gen)


def test_echo_and_generation_together(client, hf_model, hf_tokenizer, peaked_dir: Path) -> None:
    prompt = PARITY_PROMPTS[1]
    ids = hf_tokenizer(prompt)["input_ids"]
    gen, stopped = _hf_greedy(hf_model, ids, GREEDY_TOKENS)
    _assert_streamable_bytes(Reference(peaked_dir, "huggingface"), ids, gen)
    ref = _hf_logprobs(hf_model, ids + gen)
    _assert_gap(ref, range(len(ids) - 1, len(ids) - 1 + len(gen) + int(stopped)), repr(prompt))

    alone = _process(client, prompt=prompt, temperature=1e-7, max_new_tokens=GREEDY_TOKENS)
    r = _process(client, prompt=prompt, temperature=1e-7, max_new_tokens=GREEDY_TOKENS, echo_prompt=True, top_k_per_token=TOP_K)
    tokens = r["tokens"]
    assert len(tokens) == len(ids) - 1 + len(gen)
    assert r["text"] == prompt + alone["text"]
    assert r["text"] == hf_tokenizer.decode(ids + gen, skip_special_tokens=True)
    assert "".join(t["text"] for t in tokens) == r["text"]
    full = ids + gen
    for pos, tok in enumerate(tokens, start=1):
        expected = ref[pos - 1, full[pos]].item()
        assert abs(tok["logprob"] - expected) < ATOL, f"token {pos}: {tok['logprob']} vs {expected}"
        _assert_top_matches(tok["top_logprob"], ref[pos - 1], TOP_K, f"token {pos}")
    assert abs(r["logprob"] - sum(t["logprob"] for t in tokens)) < 1e-6 * len(tokens)
    assert abs(r["logprob"] - sum(ref[p - 1, full[p]].item() for p in range(1, len(full)))) < ATOL * len(tokens)
    # The generated part is the same as without echo, and the echoed part is the scored prompt.
    assert abs(r["logprob"] - alone["logprob"] - sum(t["logprob"] for t in tokens[: len(ids) - 1])) < 1e-5 * len(tokens)


def test_greedy_batch_gives_identical_completions(client, hf_model, hf_tokenizer) -> None:
    prompt = PARITY_PROMPTS[0]
    ids = hf_tokenizer(prompt)["input_ids"]
    gen, stopped = _hf_greedy(hf_model, ids, GREEDY_TOKENS)
    _assert_gap(_hf_logprobs(hf_model, ids + gen), range(len(ids) - 1, len(ids) - 1 + len(gen) + int(stopped)), repr(prompt))

    single = _process(client, prompt=prompt, temperature=1e-7, max_new_tokens=GREEDY_TOKENS)
    batch = _process(client, prompt=prompt, temperature=1e-7, max_new_tokens=GREEDY_TOKENS, num_return_sequences=3)
    assert len(batch["completions"]) == 3
    assert (batch["text"], batch["tokens"], batch["logprob"]) == tuple(batch["completions"][0][k] for k in ("text", "tokens", "logprob"))
    first = batch["completions"][0]
    for c in batch["completions"]:
        assert c["text"] == single["text"]
        assert [t["text"] for t in c["tokens"]] == [t["text"] for t in single["tokens"]]
        assert [list(t["top_logprob"]) for t in c["tokens"]] == [list(t["top_logprob"]) for t in single["tokens"]]
        # Batched float32 CPU kernels block rows differently (observed up to ~1e-5 apart, also between
        # rows of the same batch): same tolerance as against transformers.
        for a, b, f in zip(c["tokens"], single["tokens"], first["tokens"]):
            assert abs(a["logprob"] - b["logprob"]) < ATOL
            assert abs(a["logprob"] - f["logprob"]) < ATOL
        assert abs(c["logprob"] - single["logprob"]) < ATOL * len(gen)


# ---------------------------------------------------------------------------------------------------
# 2. Tokenization parity, both backends


@pytest.fixture(params=BACKENDS)
def backend_server(request, make_tiny_checkpoint, serve):
    checkpoint_dir = make_tiny_checkpoint(request.param)
    return serve(checkpoint_dir), Reference(checkpoint_dir, request.param)


def test_tokenize_matches_backend(backend_server) -> None:
    client, ref = backend_server
    wrong = [(t, got, want) for t in TEXTS if (got := _tokenize(client, t)) != (want := ref.encode(t))]
    assert not wrong, f"/tokenize differs from the {ref.backend} library: {wrong}"
    assert all(_tokenize(client, t)[0] == ref.bos_id for t in TEXTS)  # BOS first, also for ""


def test_decode_round_trips(backend_server) -> None:
    client, ref = backend_server
    for text in TEXTS:
        ids = ref.encode(text)
        decoded = _decode(client, ids)
        assert decoded == text, f"{ref.backend}: decode(tokenize({text!r})) = {decoded!r}"
        assert "<s>" not in decoded and "</s>" not in decoded
        assert _decode(client, ids + [ref.eos_id]) == text  # EOS is skipped too
        assert _decode(client, ids[1:]) == text  # and without BOS the text is the same
        assert decoded == ref.decode(ids)


def test_echo_token_texts_concatenate_to_prompt(backend_server) -> None:
    client, ref = backend_server
    for text in TEXTS:
        r = _process(client, prompt=text, echo_prompt=True, max_new_tokens=0)
        assert r["text"] == text, f"{ref.backend}: echo text {r['text']!r} for {text!r}"
        assert "".join(t["text"] for t in r["tokens"]) == text, f"{ref.backend}: {[t['text'] for t in r['tokens']]}"
        assert len(r["tokens"]) == len(ref.encode(text)) - 1
        assert abs(r["logprob"] - sum(t["logprob"] for t in r["tokens"])) < 1e-6 * max(1, len(r["tokens"]))


def test_tokenize_matches_transformers(make_tiny_checkpoint, serve) -> None:
    from transformers import AutoTokenizer

    checkpoint_dir = make_tiny_checkpoint("huggingface")
    client = serve(checkpoint_dir)
    auto = AutoTokenizer.from_pretrained(checkpoint_dir)
    for text in TEXTS:
        ids = _tokenize(client, text)
        assert ids == auto(text)["input_ids"], repr(text)
        assert _decode(client, ids) == auto.decode(ids, skip_special_tokens=True) == text, repr(text)


@pytest.mark.parametrize("text", ["🚀", "go 👍🏽 and 🚀 now", "東京 北京", "👨\u200d👩\u200d👧"])
def test_character_split_over_byte_tokens(backend_server, text: str) -> None:
    """Byte-fallback tokens: each one before the completing byte gets "", the completing one the character."""
    client, ref = backend_server
    ids = _tokenize(client, text)
    r = _process(client, prompt=text, echo_prompt=True, max_new_tokens=0)
    tokens = r["tokens"]
    assert len(tokens) == len(ids) - 1
    utf8 = codecs.getincrementaldecoder("utf-8")()
    split_chars = []
    run = 0
    for tok_id, tok in zip(ids[1:], tokens):
        byte = ref.byte_value(tok_id)
        if byte is None:
            assert run == 0, f"{text!r}: a character's bytes were interrupted"
            continue
        expected = utf8.decode(bytes([byte]))  # "" until the character is complete
        assert tok["text"] == expected, f"{ref.backend} {text!r}: byte token {tok_id} has text {tok['text']!r}, expected {expected!r}"
        run += 1
        if expected:
            if run > 1:
                split_chars.append(expected)
            run = 0
    assert run == 0
    assert split_chars, f"{ref.backend}: no character of {text!r} is split over byte tokens; the test proves nothing"
    assert "".join(t["text"] for t in tokens) == text
    assert r["text"] == text


def test_tokenize_truncation(backend_server) -> None:
    client, ref = backend_server
    everything = ref.encode(LONG_PARAGRAPH)
    assert len(everything) > 5
    assert _tokenize(client, LONG_PARAGRAPH, truncation=False, max_length=5) == everything
    assert _tokenize(client, LONG_PARAGRAPH, truncation=True, max_length=5) == everything[:5]
    assert _tokenize(client, LONG_PARAGRAPH) == everything  # default max_length is larger than this text


def test_texts_that_cannot_round_trip(backend_server) -> None:
    """Not ordinary text, so outside ``decode(tokenize(x)) == x``; the server must still agree with the
    tokenizer library, which loses them the same way (as Llama 2's own tokenizers do):
    - "▁" (U+2581) is the tokenizers' own space marker, so it decodes as a space (both backends);
    - a tokenizer.json parses special-token text ("<s>", "</s>", "<unk>") as the special tokens, which
      decoding skips; sentencepiece's encode treats such text as plain characters."""
    client, ref = backend_server
    for text, decoded in [("x▁y", "x y"), ("▁", " ")]:
        ids = _tokenize(client, text)
        assert ids == ref.encode(text)
        assert _decode(client, ids) == ref.decode(ids) == decoded
    for text in ["<s>", "a </s> b", "<unk>"]:
        ids = _tokenize(client, text)
        assert ids == ref.encode(text)
        assert _decode(client, ids) == ref.decode(ids)
        r = _process(client, prompt=text, echo_prompt=True, max_new_tokens=0)
        assert r["text"] == "".join(t["text"] for t in r["tokens"]) == ref.decode(ids)
        if ref.backend == "huggingface":
            assert set(ids[1:]) & {ref.unk_id, ref.bos_id, ref.eos_id}, f"{text!r} should hold a special token: {ids}"
            assert _decode(client, ids) != text
        else:
            assert _decode(client, ids) == text
