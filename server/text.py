"""Token ids <-> text, including per-token texts that concatenate exactly to the whole text.

Decoding one token at a time is wrong for Llama-style tokenizers: sentencepiece drops a word's
leading space when the piece stands alone, and a character split over byte-fallback tokens
decodes to U+FFFD piece by piece. So each token's text is the *difference* between decoding a few
tokens of context with and without it (the method vLLM uses), and a token that ends inside a
multi-byte character gets "" while the token that completes it carries the whole character.
"""

from __future__ import annotations

from pathlib import Path

from litgpt import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # tokens of left context kept when decoding a difference
MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 byte tokens; past that U+FFFD is real


class Codec:
    """The model's tokenizer with the operations the server needs, for both litgpt backends."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.tokenizer = Tokenizer(checkpoint_dir)
        self.bos_id = self.tokenizer.bos_id
        self.eos_id = self.tokenizer.eos_id
        self.use_bos = self.tokenizer.use_bos
        self.vocab_size = self.tokenizer.vocab_size
        processor = self.tokenizer.processor
        if self.tokenizer.backend == "huggingface":
            self.vocab_size = processor.get_vocab_size(with_added_tokens=True)
            self._decode = lambda ids: processor.decode(ids, skip_special_tokens=True)
            self._piece = processor.id_to_token
        else:  # sentencepiece skips control tokens (BOS/EOS) when decoding
            self._decode = processor.decode
            self._piece = processor.id_to_piece
        # Special tokens decode to "" in text; as top_logprob keys they are shown by name ("</s>").
        self.special_ids = {i for i in (self.bos_id, self.eos_id) if i is not None}

    def encode(self, text: str) -> list[int]:
        """Ids as the model expects them (BOS first when the model uses one)."""
        return self.tokenizer.encode(text).tolist()

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens (so no BOS text)."""
        return self._decode(list(ids))

    def special_name(self, token_id: int) -> str | None:
        return self._piece(token_id) if token_id in self.special_ids else None

    def stream(self, context: list[int]) -> TextStream:
        return TextStream(self, context)


class TextStream:
    """Turns a growing list of ids into per-token texts (see module docstring)."""

    def __init__(self, codec: Codec, context: list[int]) -> None:
        self.codec = codec
        self.ids = list(context)
        self.prefix_offset = max(0, len(self.ids) - CONTEXT_TOKENS)
        self.read_offset = len(self.ids)

    def _delta(self, ids: list[int]) -> tuple[str, str]:
        prefix = self.codec.decode(ids[self.prefix_offset : self.read_offset])
        full = self.codec.decode(ids[self.prefix_offset :])
        return prefix, full

    def peek(self, token_id: int) -> str:
        """The text ``token_id`` would add next, without consuming it (for top_logprob keys)."""
        if (name := self.codec.special_name(token_id)) is not None:
            return name
        prefix, full = self._delta(self.ids + [token_id])
        return full[len(prefix) :] if full.startswith(prefix) else full

    def push(self, token_id: int) -> str:
        """Consume ``token_id`` and return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        prefix, full = self._delta(self.ids)
        held = len(self.ids) - self.read_offset
        if full.endswith(REPLACEMENT) and held < MAX_CHAR_TOKENS:
            return ""  # maybe the next byte token completes the character
        return self._advance(full, prefix)

    def _advance(self, full: str, prefix: str) -> str:
        text = full[len(prefix) :] if full.startswith(prefix) else full
        self.prefix_offset = max(self.prefix_offset, len(self.ids) - CONTEXT_TOKENS)
        self.read_offset = len(self.ids)
        return text

    def flush(self) -> str:
        """Text still held back (an unfinished character at the very end), as U+FFFD."""
        prefix, full = self._delta(self.ids)
        self.read_offset = len(self.ids)
        return full[len(prefix) :] if full.startswith(prefix) else ""
