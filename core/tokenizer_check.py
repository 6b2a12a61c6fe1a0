"""Fail loudly when a checkpoint's tokenizer files would tokenize differently from transformers.

Two ways this has gone wrong: transformers' ``save_pretrained`` of a tokenizer loaded from a GGUF
file writes a ``tokenizer.model`` that is a copy of the GGUF file (litgpt falls back to it when
``tokenizer.json`` is missing, and ``export_hf`` copies it along), and litgpt decides whether to add
BOS from the directory name and ``tokenizer_config.json`` by rules of its own, which can disagree
with what transformers' tokenizer does with the same files.
"""

from __future__ import annotations

from pathlib import Path

from core.checkpoints import CheckpointError

# Texts whose ids are compared: ASCII, leading/trailing spaces, newlines, tabs, emoji, CJK, combining marks.
CHECK_TEXTS = ("Hello world", "  two  spaces\n\nand\ttabs ", "naïve café — 東京 🙂", "e\u0301 ZWJ 👨\u200d👩\u200d👧", "")


def check_sentencepiece_file(checkpoint_dir: Path) -> None:
    """A ``tokenizer.model`` that is present must be a sentencepiece model (not, e.g., a GGUF copy)."""
    path = Path(checkpoint_dir) / "tokenizer.model"
    if not path.is_file():
        return
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        head = path.read_bytes()[:4]
        what = " (it is a GGUF file, as transformers' save_pretrained writes for a GGUF tokenizer)" if head == b"GGUF" else ""
        raise CheckpointError(f"{path}: not a sentencepiece model{what}; delete it ({' '.join(str(e).split())[:120]})") from None


def check_tokenizer(checkpoint_dir: Path, texts: tuple[str, ...] = CHECK_TEXTS) -> None:
    """Raise CheckpointError unless litgpt's Tokenizer gives transformers' AutoTokenizer ids (BOS included).

    Needs transformers (a test extra); the sentencepiece file check needs nothing more.
    """
    from litgpt import Tokenizer
    from transformers import AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    check_sentencepiece_file(checkpoint_dir)
    ours = Tokenizer(checkpoint_dir)
    theirs = AutoTokenizer.from_pretrained(checkpoint_dir)
    for text in texts:
        got, want = ours.encode(text).tolist(), theirs(text)["input_ids"]
        if got == want:
            continue
        if got[1:] == want[1:] or got[1:] == want or got == want[1:]:
            raise CheckpointError(
                f"{checkpoint_dir}: BOS handled differently from transformers: litgpt gives {got[:3]}..., transformers "
                f"{want[:3]}... for {text!r} (litgpt reads add_bos_token from tokenizer_config.json, and forces BOS for "
                "some directory names such as *-Instruct)"
            )
        raise CheckpointError(f"{checkpoint_dir}: litgpt's tokenizer gives {got} but transformers' {want} for {text!r}")
