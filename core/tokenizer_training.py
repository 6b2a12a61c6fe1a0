"""Train Llama-style tokenizers locally, so the tiny default and the tests need no model hub.

Both kinds mirror Llama 2's real tokenizer, because that is what the serving code must get right:
ids 0-2 are ``<unk> <s> </s>``, ids 3-258 are the 256 byte-fallback tokens ``<0x00>..<0xFF>``,
words carry a leading ``▁`` for the space, digits are split one by one, and characters outside
the learned alphabet (most emoji, rare scripts) fall back to UTF-8 bytes.

- ``tokenizer.json`` (HF ``tokenizers``): what the tiny checkpoint ships and serves with.
- ``tokenizer.model`` (``sentencepiece``): the other backend litgpt supports; used by tests.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _tokenizer_config(max_length: int) -> dict:
    # litgpt reads `add_bos_token` and `tokenizer_class` (its Llama decoding fix keys off the class);
    # transformers' AutoTokenizer loads the same directory as LlamaTokenizerFast.
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": max_length,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }


def choose_alphabet(texts: list[str], size: int) -> set[str]:
    """The ``size`` most frequent characters (ties broken by code point); the rest use byte fallback."""
    counts = Counter(ch for t in texts for ch in t.replace(" ", "▁") if ch != "\n")
    ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
    return set(ranked[:size]) | {"\n"}


def _keep_only(text: str, alphabet: set[str]) -> str:
    return "".join(ch if ch in alphabet or ch == " " else " " for ch in text)


def train_hf_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 1024, max_length: int = 2048) -> Path:
    """Train a byte-fallback BPE ``tokenizer.json`` in Llama 2's layout; returns its path."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    def skeleton(model, split_words: bool) -> Tokenizer:
        # Llama 2's layout: always prepend "▁" and turn spaces into "▁" (sentencepiece's dummy
        # prefix), so " x" keeps its leading space through a round trip.
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        digits = pre_tokenizers.Digits(individual_digits=True)
        # While learning merges, split at word starts so no merge spans two words (as sentencepiece).
        words = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        lines = pre_tokenizers.Split("\n", behavior="isolated")  # no merge spans a newline either
        tok.pre_tokenizer = pre_tokenizers.Sequence([words, lines, digits]) if split_words else digits
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return tok

    texts = list(texts)
    alphabet = choose_alphabet(texts, size=100)
    # Train on the chosen alphabet only (others -> space): the trainer's own alphabet limit breaks
    # frequency ties in hash order, which made builds differ from run to run.
    kept = [_keep_only(t, alphabet) for t in texts]
    learner = skeleton(models.BPE(unk_token="<unk>"), split_words=True)
    n_learned = vocab_size - len(SPECIALS) - len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, special_tokens=[], initial_alphabet=sorted(alphabet), show_progress=False)
    learner.train_from_iterator(kept, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]

    # Llama 2's numbering: specials, bytes, then the alphabet by code point, then merges in order.
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece in [*sorted(alphabet | {"▁"}), *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = skeleton(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True), split_words=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(max_length), indent=2))
    return path


def train_sentencepiece(texts: Iterable[str], out_dir: Path, vocab_size: int = 1024, max_length: int = 2048) -> Path:
    """Train a byte-fallback BPE sentencepiece ``tokenizer.model`` with Llama 2's options; returns its path."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(max_length), indent=2))
    return path
