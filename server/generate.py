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

from core.chat import ChatTemplate, encode_prompt
from server.schemas import Completion, ProcessRequest, Token
from server.text import Codec, TextStream


class RequestTooLong(ValueError):
    """The request cannot fit the model's context even with an empty prompt."""


@dataclass
class Sequence:
    """One returned sequence while it is being generated."""

    stream: TextStream
    tokens: list[Token] = field(default_factory=list)
    text: str = ""  # continuation text (generated part only)
    done: bool = False


@dataclass
class Prompt:
    """A request's prompt ids after templating and fitting, and what the response reports about them."""

    ids: list[int]
    dropped: int  # tokens cut from the left to fit the context
    skip: int  # 1 when ids[0] is BOS (not returned by echo)


class Picked:
    """What the sampler chose for a batch of rows.

    ``device_ids`` (B,) stay where they were sampled: the next decode step can take them as its input
    with no host round trip (``--overlap_decode``). The ids, logprobs and top logprobs come back in one
    transfer: at once (one ``.tolist()``, the step's sync point), or with ``defer`` on CUDA to pinned host
    memory without blocking, waited for (their CUDA event only, not the whole device) when first read, so
    a decode step enqueued after this pick keeps running meanwhile."""

    def __init__(self, device_ids: torch.Tensor, table: torch.Tensor, k: int, defer: bool = False) -> None:
        self.device_ids, self._k, self._event = device_ids, k, None
        if defer and table.device.type == "cuda":
            self._host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            self._host.copy_(table, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(table.device))
        else:
            self._host = table
        self._rows: tuple | None = None
        if not defer:  # read back now, in one .tolist(): the sync point of every step without --overlap_decode
            self._read()

    def _read(self) -> tuple:
        if self._rows is None:
            if self._event is not None:
                self._event.synchronize()
            k, table = self._k, self._host.tolist()  # ids < 2**24 are exact in float32
            top = [list(zip((int(i) for i in row[2 : 2 + k]), row[2 + k :])) for row in table]
            self._rows = ([int(row[0]) for row in table], [row[1] for row in table], top)
        return self._rows

    @property
    def ids(self) -> list[int]:
        return self._read()[0]

    @property
    def logprobs(self) -> list[float]:
        return self._read()[1]

    @property
    def top(self) -> list[list[tuple[int, float]]]:
        """Per row: (id, logprob) of the most likely, best first."""
        return self._read()[2]


def fit_prompt(ids: list[int], window: int, bos_id: int | None, max_new_tokens: int) -> tuple[list[int], int]:
    """Left-truncate ``ids`` (keeping BOS) so that ``max_new_tokens`` fit ``window``; returns (ids, dropped)."""
    room = window - max_new_tokens
    keep_bos = bool(ids) and bos_id is not None and ids[0] == bos_id
    if room < 1 + int(keep_bos):
        raise RequestTooLong(
            f"max_new_tokens: {max_new_tokens} leaves no room for the prompt in the served "
            f"{window}-token window; ask for at most {window - 1 - int(keep_bos)}"
        )
    if len(ids) <= room:
        return ids, 0
    kept = ([ids[0]] if keep_bos else []) + ids[len(ids) - room + int(keep_bos) :]
    return kept, len(ids) - len(kept)


def sample(logits: torch.Tensor, req: ProcessRequest, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from float logits (B, V) under the request's sampling settings."""
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
        # (a top_p below float32's range rounds to 0: the top token must still stay)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= req.top_p
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def new_generator(req: ProcessRequest, device: torch.device) -> torch.Generator | None:
    """The request's own random stream (seeded when it asks), so batching never changes its samples."""
    if req.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(2**62, (1,)).item()))
    return generator


def pick(logits: torch.Tensor, groups: list[tuple[slice, ProcessRequest, torch.Generator | None]], defer: bool = False) -> Picked:
    """Sample every row of ``logits`` (B, V); ``groups`` says which rows belong to which request.

    Greedy rows share one argmax; a sampled request draws its rows together from its own generator
    (as when it runs alone). Logprobs are of the raw logits. Everything comes back in one transfer:
    now, or with ``defer`` (``--overlap_decode`` on CUDA) when first read (see ``Picked``).
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    next_ids = logits.argmax(dim=-1)
    for rows, req, generator in groups:
        if not req.greedy:
            next_ids[rows] = sample(logits[rows], req, generator)
    chosen = logprobs.gather(1, next_ids[:, None])
    k = min(max((req.top_k_per_token for _, req, _ in groups), default=0), logprobs.size(-1))
    parts = [next_ids[:, None].to(logprobs.dtype), chosen]
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)
        parts += [ids.to(logprobs.dtype), values]
    return Picked(next_ids, torch.cat(parts, dim=1), k, defer)


def top_dict(stream: TextStream, top: list[tuple[int, float]], k: int) -> dict[str, float]:
    result: dict[str, float] = {}
    for i, v in top[:k]:
        result.setdefault(stream.peek(i), v)  # two ids with the same text: keep the likelier
    return result


def cut_at_stop(seq: Sequence, stops: list[str], new_text_start: int) -> None:
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


def advance(seq: Sequence, tid: int, logprob: float, top: list[tuple[int, float]], req: ProcessRequest, step: int, eos_id: int | None) -> None:
    """Append generation step ``step``'s token to ``seq`` (EOS, stops and the last step handled)."""
    if seq.done:
        return
    if tid == eos_id:
        if (rest := seq.stream.flush()) and seq.tokens:  # an unfinished character before EOS
            seq.tokens[-1] = seq.tokens[-1].model_copy(update={"text": seq.tokens[-1].text + rest})
            seq.text += rest
        seq.done = True
        return
    top_logprob = top_dict(seq.stream, top, req.top_k_per_token)
    start = len(seq.text)
    text = seq.stream.push(tid)
    if step == req.max_new_tokens - 1:
        text += seq.stream.flush()
        seq.done = True
    seq.tokens.append(Token(text=text, logprob=logprob, top_logprob=top_logprob))
    seq.text += text
    if req.stop_sequences and text:
        cut_at_stop(seq, req.stop_sequences, start)


def echo_scores(logits: torch.Tensor, targets: list[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Logprob of ``targets[i]`` under ``logits`` row i, and row i's ``k`` likeliest (id, logprob).

    Small CPU lists, so a long echoed prompt never keeps its (T, vocab) logits around."""
    if not targets:
        return [], []
    logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None]).squeeze(1).tolist()
    k = min(k, logprobs.size(-1))
    if k <= 0:
        return chosen, [[] for _ in chosen]
    values, top_ids = torch.topk(logprobs, k, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]


def echo_tokens(codec: Codec, ids: list[int], skip: int, chosen: list[float], tops: list[list[tuple[int, float]]], k: int) -> tuple[list[Token], str]:
    """Prompt tokens with the logprob each got from the tokens before it (``echo_scores`` of ``ids[1:]``)."""
    if len(ids) <= skip:
        return [], ""
    stream = codec.stream(ids[:skip])
    tokens = []
    for pos in range(skip, len(ids)):
        if pos == 0:  # no BOS: nothing conditions the first token
            top, lp = {}, 0.0
        else:
            top, lp = top_dict(stream, tops[pos - 1], k), chosen[pos - 1]
        tokens.append(Token(text=stream.push(ids[pos]), logprob=lp, top_logprob=top))
    tokens[-1].text += stream.flush()
    return tokens, "".join(t.text for t in tokens)


def completions(seqs: list[Sequence], echo: tuple[list[Token], str]) -> list[Completion]:
    out = []
    for seq in seqs:
        tokens = echo[0] + seq.tokens
        out.append(Completion(text=echo[1] + seq.text, tokens=tokens, logprob=sum(t.logprob for t in tokens)))
    return out


class Generator:
    """A model with its tokenizer and contract settings; runs requests one at a time on litgpt's forward.

    The serial path is the reference the batched engine is tested against, and the fallback for
    models the batched forward does not cover (adapter methods, exotic attention).
    """

    def __init__(
        self,
        model: GPT,
        codec: Codec,
        prompt_style: PromptStyle | None = None,
        use_template: bool = False,
        max_seq_length: int | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        """``use_template`` wraps every prompt in the checkpoint's training template: its chat template (the
        prompt as one user turn, then the generation prompt) when it has one, else its prompt style. Off by
        default: HELM sends complete few-shot prompts, and a template around them usually hurts.
        ``max_seq_length``: the served window (prompt plus generation), at most the model's block_size."""
        if use_template and prompt_style is None and chat_template is None:
            raise ValueError("use_template: this checkpoint has no chat_template.jinja or prompt_style.yaml to apply")
        self.model = model
        self.codec = codec
        self.prompt_style = prompt_style
        self.chat_template = chat_template
        self.use_template = use_template
        self.device = next(model.parameters()).device
        # Compute dtype: the embeddings are never quantized, so they tell it even for bnb models.
        self.dtype = model.transformer.wte.weight.dtype
        self.max_seq_length = min(max_seq_length or model.config.block_size, model.config.block_size)

    def prompt(self, req: ProcessRequest) -> Prompt:
        """Template (if asked), encode and fit ``req``'s prompt; raises RequestTooLong."""
        if self.use_template and self.chat_template is not None:
            ids = encode_prompt(self.codec.tokenizer, self.chat_template, req.prompt)
        else:
            ids = self.codec.encode(self.prompt_style.apply(req.prompt) if self.use_template else req.prompt)
        ids, dropped = fit_prompt(ids, self.max_seq_length, self.codec.bos_id, req.max_new_tokens)
        skip = 1 if ids and self.codec.bos_id is not None and ids[0] == self.codec.bos_id else 0
        return Prompt(ids=ids, dropped=dropped, skip=skip)

    @torch.inference_mode()
    def run(self, req: ProcessRequest) -> tuple[list[Completion], int]:
        p = self.prompt(req)
        ids, n = p.ids, req.n
        if not ids:  # empty prompt on a model without BOS: nothing to condition on
            return [Completion(text="", tokens=[], logprob=0.0) for _ in range(n)], p.dropped

        total = len(ids) + req.max_new_tokens
        self.model.set_kv_cache(batch_size=n, max_seq_length=total, device=self.device, dtype=self.dtype)
        try:
            prompt = torch.tensor([ids] * n, device=self.device)
            logits = self.model(prompt, input_pos=torch.arange(len(ids), device=self.device), input_pos_maxp1=len(ids))
            echo = ([], "")
            if req.echo_prompt:
                k = req.top_k_per_token
                echo = echo_tokens(self.codec, ids, p.skip, *echo_scores(logits[0], ids[1:], k), k)
            seqs = [Sequence(stream=self.codec.stream(ids)) for _ in range(n)]
            self._decode(seqs, logits[:, -1], len(ids), req)
        finally:
            self.model.clear_kv_cache()
        return completions(seqs, echo), p.dropped

    def _decode(self, seqs: list[Sequence], logits: torch.Tensor, pos: int, req: ProcessRequest) -> None:
        generator = new_generator(req, self.device)
        rows = [(slice(0, len(seqs)), req, generator)]
        for step in range(req.max_new_tokens):
            picked = pick(logits, rows)
            for b, seq in enumerate(seqs):
                advance(seq, picked.ids[b], picked.logprobs[b], picked.top[b], req, step, self.codec.eos_id)
            if all(s.done for s in seqs):
                break
            next_ids = torch.tensor(picked.ids, device=self.device)
            logits = self.model(next_ids.view(-1, 1), input_pos=torch.tensor([pos], device=self.device), input_pos_maxp1=pos + 1)[:, -1]
            pos += 1
