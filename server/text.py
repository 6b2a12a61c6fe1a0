"""Token ids <-> text, including per-token texts that concatenate exactly to the whole text.

Decoding one token at a time is wrong for Llama-style tokenizers: sentencepiece drops a word's
leading space when the piece stands alone, and a character split over byte-fallback tokens
decodes to U+FFFD piece by piece. So each token's text is the *difference* between decoding a few
tokens of context with and without it (the method vLLM uses), and a token that ends inside a
multi-byte character gets "" while the token that completes it carries the whole character.
A decode window never starts inside a character: ``tokenizers``' ByteFallback decoder turns a whole
run of consecutive byte tokens into U+FFFD when any part of it is not valid UTF-8, so a window that
began on a continuation byte would lose every character after it in the same run (e.g. the emoji of
a zero-width-joiner sequence such as "👨\u200d👩\u200d👧", which is one run of 18 byte tokens).
The difference is taken by length, never by returning the whole window: a run that is not valid UTF-8
(random or odd generations, e.g. byte "d" then a lone lead byte) also changes how the context part
of the window decodes, and the window's text would repeat earlier text.
"""

from __future__ import annotations

import re
from pathlib import Path

from litgpt import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # tokens of left context kept when decoding a difference
MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 byte tokens; past that U+FFFD is real
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # Llama-style byte-fallback token


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
        # Byte-fallback tokens for UTF-8 continuation bytes (0x80-0xBF): no decode window starts on one.
        if self.tokenizer.backend == "huggingface":
            pieces = processor.get_vocab(with_added_tokens=False).items()
        else:
            pieces = ((processor.id_to_piece(i), i) for i in range(processor.get_piece_size()) if processor.is_byte(i))
        self.continuation_ids = frozenset(i for piece, i in pieces if (m := BYTE_PIECE.fullmatch(piece)) and 0x80 <= int(m.group(1), 16) <= 0xBF)

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
        self.read_offset = len(self.ids)
        self.prefix_offset = self._window_start()

    def _window_start(self) -> int:
        """Where the decode window starts: CONTEXT_TOKENS back, moved forward to a character start."""
        start = max(0, len(self.ids) - CONTEXT_TOKENS)
        while start < self.read_offset and self.ids[start] in self.codec.continuation_ids:
            start += 1
        return start

    def _delta(self, ids: list[int]) -> tuple[str, str]:
        prefix = self.codec.decode(ids[self.prefix_offset : self.read_offset])
        full = self.codec.decode(ids[self.prefix_offset :])
        return prefix, full

    def peek(self, token_id: int) -> str:
        """The text ``token_id`` would add next, without consuming it (for top_logprob keys)."""
        if (name := self.codec.special_name(token_id)) is not None:
            return name
        prefix, full = self._delta(self.ids + [token_id])
        return full[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Consume ``token_id`` and return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        prefix, full = self._delta(self.ids)
        held = len(self.ids) - self.read_offset
        if full.endswith(REPLACEMENT) and held < MAX_CHAR_TOKENS:
            return ""  # maybe the next byte token completes the character
        return self._advance(full, prefix)

    def _advance(self, full: str, prefix: str) -> str:
        text = full[len(prefix) :]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.prefix_offset, self._window_start())
        return text

    def flush(self) -> str:
        """Text still held back (an unfinished character at the very end), as U+FFFD."""
        prefix, full = self._delta(self.ids)
        self.read_offset = len(self.ids)
        return full[len(prefix) :]
