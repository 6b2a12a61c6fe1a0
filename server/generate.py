"""One /process request on litgpt's GPT: prefill, decode, exact logprobs, stop sequences.

Contract details (see README "Serving"):
- logprob: log-softmax of the raw logits (before temperature/top-k/top-p) at the token taken.
- echo: the prompt's tokens come first. BOS is not returned; the first prompt token's logprob is
  conditioned on BOS. A model without BOS has no context for its first token: logprob 0.0 and an
  empty top_logprob.
- stop sequences: generation stops as soon as one appears in the continuation and the text is cut
  right before it. A token that straddles the cut is kept with its text trimmed to the cut (its
  logprob counts); tokens starting at or after the cut are dropped. So the tokens' texts always
  concatenate to the returned text and ``logprob`` is the sum over the returned tokens.
- EOS ends a sequence and is not returned.
- context overflow: the prompt is left-truncated (BOS kept) to fit ``max_new_tokens``; the response
  says how many tokens were dropped. A ``max_new_tokens`` that leaves no room at all is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from litgpt import GPT
from litgpt.prompts import PromptStyle

from server.schemas import Completion, ProcessRequest, Token
from server.text import Codec, TextStream


class RequestTooLong(ValueError):
    """The request cannot fit the model's context even with an empty prompt."""


@dataclass
class _Sequence:
    stream: TextStream
    tokens: list[Token] = field(default_factory=list)
    text: str = ""  # continuation text (generated part only)
    done: bool = False


def _top(stream: TextStream, logprobs: torch.Tensor, k: int) -> dict[str, float]:
    if k <= 0:
        return {}
    values, ids = torch.topk(logprobs, k)
    top: dict[str, float] = {}
    for v, i in zip(values.tolist(), ids.tolist()):
        top.setdefault(stream.peek(i), v)  # two ids with the same text: keep the likelier
    return top


def _sample(logits: torch.Tensor, req: ProcessRequest, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V) under the request's sampling settings."""
    if req.greedy:
        return logits.argmax(dim=-1)
    logits = logits / req.temperature
    if 0 < req.top_k < logits.size(-1):
        kth = torch.topk(logits, req.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if req.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        # drop tokens once the mass *before* them already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= req.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cut_at_stop(seq: _Sequence, stops: list[str], new_text_start: int) -> None:
    """If a stop sequence now appears in the continuation, cut text and tokens before it."""
    longest = max(len(s) for s in stops)
    search_from = max(0, new_text_start - longest + 1)
    hits = [i for s in stops if (i := seq.text.find(s, search_from)) != -1]
    if not hits:
        return
    cut = min(hits)
    kept, pos = [], 0
    for tok in seq.tokens:
        if pos >= cut:
            break
        kept.append(tok if pos + len(tok.text) <= cut else tok.model_copy(update={"text": tok.text[: cut - pos]}))
        pos += len(tok.text)
    seq.tokens, seq.text, seq.done = kept, seq.text[:cut], True


class Generator:
    """Runs requests one at a time on one model (the engine decides the order)."""

    def __init__(self, model: GPT, codec: Codec, prompt_style: PromptStyle | None = None, use_template: bool = False) -> None:
        """``use_template`` wraps every prompt in the checkpoint's training template. Off by default:
        HELM sends complete few-shot prompts, and a template around them usually hurts."""
        if use_template and prompt_style is None:
            raise ValueError("use_template: this checkpoint has no prompt_style.yaml to apply")
        self.model = model
        self.codec = codec
        self.prompt_style = prompt_style
        self.use_template = use_template
        self.device = next(model.parameters()).device
        # Compute dtype: the embeddings are never quantized, so they tell it even for bnb models.
        self.dtype = model.transformer.wte.weight.dtype
        self.block_size = model.config.block_size

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        """Left-truncate ``ids`` (keeping BOS) so that ``max_new_tokens`` fit; returns (ids, dropped)."""
        room = self.block_size - max_new_tokens
        keep_bos = bool(ids) and ids[0] == self.codec.bos_id and self.codec.bos_id is not None
        if room < 1 + int(keep_bos):
            raise RequestTooLong(
                f"max_new_tokens: {max_new_tokens} leaves no room for the prompt in this model's "
                f"{self.block_size}-token context; ask for at most {self.block_size - 1 - int(keep_bos)}"
            )
        if len(ids) <= room:
            return ids, 0
        kept = ([ids[0]] if keep_bos else []) + ids[len(ids) - room + int(keep_bos) :]
        return kept, len(ids) - len(kept)

    @torch.inference_mode()
    def run(self, req: ProcessRequest) -> tuple[list[Completion], int]:
        prompt = self.prompt_style.apply(req.prompt) if self.use_template else req.prompt
        ids, dropped = self.fit_prompt(self.codec.encode(prompt), req.max_new_tokens)
        n = req.n
        skip = 1 if ids and ids[0] == self.codec.bos_id and self.codec.bos_id is not None else 0
        if not ids:  # empty prompt on a model without BOS: nothing to condition on
            return [Completion(text="", tokens=[], logprob=0.0) for _ in range(n)], dropped

        total = len(ids) + req.max_new_tokens
        self.model.set_kv_cache(batch_size=n, max_seq_length=total, device=self.device, dtype=self.dtype)
        try:
            prompt = torch.tensor([ids] * n, device=self.device)
            logits = self.model(prompt, input_pos=torch.arange(len(ids), device=self.device), input_pos_maxp1=len(ids))
            echo = self._echo(ids, skip, logits[0], req) if req.echo_prompt else ([], "")
            seqs = [_Sequence(stream=self.codec.stream(ids)) for _ in range(n)]
            self._decode(seqs, logits[:, -1], len(ids), req)
        finally:
            self.model.clear_kv_cache()

        out = []
        for seq in seqs:
            tokens = echo[0] + seq.tokens
            out.append(Completion(text=echo[1] + seq.text, tokens=tokens, logprob=sum(t.logprob for t in tokens)))
        return out, dropped

    def _echo(self, ids: list[int], skip: int, logits: torch.Tensor, req: ProcessRequest) -> tuple[list[Token], str]:
        """Prompt tokens with the logprob each got from the tokens before it."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # row i predicts token i+1
        stream = self.codec.stream(ids[:skip])
        tokens = []
        for pos in range(skip, len(ids)):
            if pos == 0:
                top, lp = {}, 0.0
            else:
                top, lp = _top(stream, logprobs[pos - 1], req.top_k_per_token), logprobs[pos - 1, ids[pos]].item()
            tokens.append(Token(text=stream.push(ids[pos]), logprob=lp, top_logprob=top))
        if tokens:
            tokens[-1].text += stream.flush()
        return tokens, "".join(t.text for t in tokens)

    def _decode(self, seqs: list[_Sequence], logits: torch.Tensor, pos: int, req: ProcessRequest) -> None:
        generator = None
        if not req.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, (1,)).item()))
        for step in range(req.max_new_tokens):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            next_ids = _sample(logits.float(), req, generator)
            for b, seq in enumerate(seqs):
                if seq.done:
                    continue
                tid = int(next_ids[b])
                if tid == self.codec.eos_id:
                    if (rest := seq.stream.flush()) and seq.tokens:  # an unfinished character before EOS
                        seq.tokens[-1] = seq.tokens[-1].model_copy(update={"text": seq.tokens[-1].text + rest})
                        seq.text += rest
                    seq.done = True
                    continue
                top = _top(seq.stream, logprobs[b], req.top_k_per_token)
                start = len(seq.text)
                text = seq.stream.push(tid)
                if step == req.max_new_tokens - 1:
                    text += seq.stream.flush()
                seq.tokens.append(Token(text=text, logprob=logprobs[b, tid].item(), top_logprob=top))
                seq.text += text
                if req.stop_sequences and text:
                    _cut_at_stop(seq, req.stop_sequences, start)
            if all(s.done for s in seqs) or step == req.max_new_tokens - 1:
                break
            logits = self.model(
                next_ids.view(-1, 1), input_pos=torch.tensor([pos], device=self.device), input_pos_maxp1=pos + 1
            )[:, -1]
            pos += 1
