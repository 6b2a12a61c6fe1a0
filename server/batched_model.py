"""litgpt's GPT run over a row-based KV cache: packed prefill, batched decode, CUDA graphs.

litgpt's own KV cache holds one batch that moves together (one position for every row).
Continuous batching needs each row at its own position, prompts of different lengths packed into
one forward, and rows copied (a shared few-shot prefix, n samples of one prompt). This module runs
litgpt's own submodules — norms, the qkv/proj and MLP linears (LoRA and bitsandbytes layers
included), the head — and does only the attention and the cache itself:

- the cache is one tensor per K and V: (layer, row, kv_head, position, head_size);
- prefill: the new tokens of several rows go through the linears as one sequence; attention runs
  per row over that row's cache (flash attention when a row starts empty);
- decode: one token per row for rows 0..B-1 (the engine keeps decoding rows dense). Grouped
  queries attend as a (kv_head, queries-per-kv-head) block, so each row's K/V is read once and no
  repeat_interleave copy is made. The length read is bucketed (multiples of 256) and, on CUDA,
  each (batch bucket, length bucket) step is captured once as a CUDA graph and replayed: a 7B
  decode step is ~1,000 small kernels, and launching them one by one costs more than running them.

Mistral's sliding window is applied only where a row is longer than the window (litgpt applies a
mask that disables flash attention even when the window can't matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from litgpt import GPT
from litgpt.model import CausalSelfAttention, RMSNorm, apply_rope, apply_rope_interleave, do_softcapping

LENGTH_BUCKET = 256  # decode reads K/V up to a multiple of this
SHORT_SEGMENT = 256  # prefill segments up to this long share one attention call (HELM's question after a cached prefix)


def unsupported_reason(model: GPT) -> str | None:
    """Why the batched forward cannot run ``model`` exactly as litgpt does, or None."""
    config = model.config
    if config.latent_attention:
        return "multi-head latent attention"
    if config.attention_logit_softcapping is not None:
        return "attention logit softcapping"
    if config.rope_indices is not None:
        return "per-layer rope indices"
    for block in model.transformer.h:
        attn = type(block.attn)
        if attn.forward is not CausalSelfAttention.forward or (
            attn.scaled_dot_product_attention is not CausalSelfAttention.scaled_dot_product_attention
        ):
            return f"{attn.__module__}.{attn.__name__} changes attention (adapter prefixes)"
    return None


def batch_bucket(n: int) -> int:
    """Decode batch sizes that get their own CUDA graph: 1, 2, 4, then multiples of 8."""
    return n if n <= 2 else 4 if n <= 4 else 8 * math.ceil(n / 8)


@dataclass
class Segment:
    """New tokens of one row for a prefill pass: ``ids`` go to positions ``start..start+len-1``."""

    row: int
    start: int
    ids: list[int]
    all_logits: bool = False  # logits for every position (echo), else only the last


class BatchedModel:
    def __init__(self, model: GPT, rows: int, decode_rows: int, max_len: int | None = None, cuda_graphs: bool = True) -> None:
        """``rows`` cache rows in all; decode steps use rows 0..decode_rows-1 (padding included)."""
        if (reason := unsupported_reason(model)) is not None:
            raise ValueError(f"the batched engine does not support {reason}")
        self.model = model
        self.config = c = model.config
        self.device = model.transformer.wte.weight.device
        self.dtype = model.transformer.wte.weight.dtype
        self.max_len = min(max_len or c.block_size, c.block_size, model.cos.size(0))
        if not 0 < decode_rows <= rows:
            raise ValueError(f"decode_rows must be in 1..rows ({rows}), got {decode_rows}")
        self.rows, self.decode_rows = rows, decode_rows
        shape = (c.n_layer, rows, c.n_query_groups, self.max_len, c.head_size)
        # zeros, not empty: decode reads whole length buckets, and masked-out garbage that happens to
        # be NaN would still poison the softmax (NaN * 0 = NaN)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.scale = 1.0 / math.sqrt(c.attention_scores_scalar or c.head_size)
        # a window at least as long as the cache can't exclude anything (Mistral-7B-v0.1: 4096 and 4096)
        self.windows = [
            c.sliding_window_size if block.attn.apply_sliding_window_attention and c.sliding_window_size < self.max_len else None
            for block in model.transformer.h
        ]
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._tokens = torch.zeros(decode_rows, dtype=torch.long, device=self.device)  # decode inputs (static for graphs)
        self._positions = torch.zeros(decode_rows, dtype=torch.long, device=self.device)

    @staticmethod
    def row_bytes(model: GPT, max_len: int | None = None) -> int:
        c = model.config
        itemsize = model.transformer.wte.weight.element_size()
        return 2 * c.n_layer * c.n_query_groups * min(max_len or c.block_size, c.block_size) * c.head_size * itemsize

    # --- cache rows ---------------------------------------------------------------------------

    def copy_rows(self, src: int, dst: int, length: int) -> None:
        """Make row ``dst`` hold row ``src``'s first ``length`` positions."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    # --- shared pieces ------------------------------------------------------------------------

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.model.transformer.wte(idx)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self._norm(self.model.transformer.ln_f, x))
        if self.config.final_logit_softcapping is not None:
            logits = do_softcapping(logits, self.config.final_logit_softcapping)
        return logits

    def _qkv(self, attn: CausalSelfAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Roped q (B, nh, T, hs), k and v (B, n_kv, T, hs), as litgpt computes them.

        Without q/k norms, q and k heads are roped together (one set of kernels instead of two)."""
        c = self.config
        B, T, _ = x.shape
        n_q, n_kv, hs = c.n_head, c.n_query_groups, c.head_size
        qkv = attn.qkv(x)
        if c.norm_qk:
            q, k, v = qkv.split((n_q * hs, n_kv * hs, n_kv * hs), -1)
            if c.norm_qk_type == "olmo2":
                q, k = attn.norm_q(q), attn.norm_k(k)
            q = q.view(B, T, n_q, hs).transpose(1, 2)
            k = k.view(B, T, n_kv, hs).transpose(1, 2)
            if c.norm_qk_type == "default":
                q, k = attn.norm_q(q), attn.norm_k(k)
            qk = torch.cat((q, k), dim=1)
        else:
            qk = qkv[..., : (n_q + n_kv) * hs].view(B, T, n_q + n_kv, hs).transpose(1, 2)
        v = qkv[..., (n_q + n_kv) * hs :].view(B, T, n_kv, hs).transpose(1, 2)
        rope = apply_rope_interleave if c.rope_interleave else apply_rope
        n = c.rope_n_elem
        qk = rope(qk, cos, sin) if n == hs else torch.cat((rope(qk[..., :n], cos, sin), qk[..., n:]), dim=-1)
        q, k = qk.split((n_q, n_kv), dim=1)
        return q, k, v

    @staticmethod
    def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """litgpt's RMSNorm in one fused kernel (same fp32 math); any other norm as is."""
        if type(norm) is RMSNorm and not norm.add_unit_offset and norm.dim == -1:
            return F.rms_norm(x.float(), (x.size(-1),), norm.weight.float(), norm.eps).to(x.dtype)
        return norm(x)

    def _block(self, block, x: torch.Tensor, attend) -> torch.Tensor:
        """litgpt's Block.forward with ``attend(attn, x_normed)`` as the attention."""
        c = self.config
        x_normed = self._norm(block.norm_1, x)
        h = block.post_attention_norm(attend(block.attn, x_normed))
        if c.parallel_residual:
            if not c.shared_attention_norm:
                x_normed = self._norm(block.norm_2, x)
            x = h + x
        else:
            x = h + x
            x_normed = self._norm(block.norm_2, x)
        return block.post_mlp_norm(block.mlp(x_normed)) + x

    # --- prefill ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Run the segments' tokens, fill their rows' cache; logits per segment: (T or 1, vocab)."""
        for s in segments:
            if not s.ids or s.start + len(s.ids) > self.max_len:
                raise ValueError(f"segment for row {s.row} must have 1..{self.max_len - s.start} tokens")
        idx = torch.tensor([t for s in segments for t in s.ids], device=self.device)[None]
        positions = torch.cat([torch.arange(s.start, s.start + len(s.ids)) for s in segments]).to(self.device)
        rows = torch.cat([torch.full((len(s.ids),), s.row) for s in segments]).to(self.device)
        cos, sin = self.model.cos[positions][None], self.model.sin[positions][None]
        bounds, offset = [], 0
        for s in segments:
            bounds.append((offset, offset + len(s.ids)))
            offset += len(s.ids)
        short = [i for i, s in enumerate(segments) if len(s.ids) <= SHORT_SEGMENT]
        batch = _ShortBatch(self, [segments[i] for i in short], [bounds[i] for i in short]) if len(short) > 1 else None
        alone = [i for i in range(len(segments)) if batch is None or i not in short]

        x = self._embed(idx)
        for layer, block in enumerate(self.model.transformer.h):

            def attend(attn, x_normed, layer=layer):
                q, k, v = self._qkv(attn, x_normed, cos, sin)
                self.k[layer, rows, :, positions] = k[0].transpose(0, 1)  # every segment's K/V in one write
                self.v[layer, rows, :, positions] = v[0].transpose(0, 1)
                y = torch.empty_like(q)
                for i in alone:
                    a, b = bounds[i]
                    y[:, :, a:b] = self._segment_attention(layer, q[:, :, a:b], segments[i])
                if batch is not None:
                    batch.attend(layer, q, y)
                return attn.proj(y.transpose(1, 2).reshape(1, x_normed.size(1), -1))

            x = self._block(block, x, attend)
        keep = torch.cat(
            [torch.arange(a, b) if s.all_logits else torch.tensor([b - 1]) for s, (a, b) in zip(segments, bounds)]
        ).to(self.device)
        logits = self._head(x[0, keep])
        return list(logits.split([len(s.ids) if s.all_logits else 1 for s in segments]))

    def _segment_attention(self, layer: int, q: torch.Tensor, s: Segment) -> torch.Tensor:
        """One row's new queries (1, nh, T, hs) against its cache, flash attention when it starts empty."""
        c = self.config
        end = s.start + q.size(2)
        keys, values = self.k[layer, s.row, :, :end][None], self.v[layer, s.row, :, :end][None]
        if c.n_query_groups != c.n_head:
            keys = keys.repeat_interleave(c.n_head // c.n_query_groups, dim=1)
            values = values.repeat_interleave(c.n_head // c.n_query_groups, dim=1)
        window = self.windows[layer]
        if s.start == 0 and (window is None or end <= window):  # plain causal: flash attention
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale)
        query_pos = torch.arange(s.start, end, device=self.device)[:, None]
        key_pos = torch.arange(end, device=self.device)[None]
        mask = key_pos <= query_pos
        if window is not None:
            mask &= key_pos > query_pos - window
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)

    # --- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of rows 0..B-1 at its position; logits (B, vocab)."""
        B = len(tokens)
        if not 0 < B <= self.decode_rows or max(positions) >= self.max_len:
            raise ValueError(f"decode needs 1..{self.decode_rows} rows at positions < {self.max_len}")
        padded = min(batch_bucket(B), self.decode_rows) if self.cuda_graphs else B
        length = min(self.max_len, LENGTH_BUCKET * math.ceil((max(positions) + 1) / LENGTH_BUCKET))
        fill = padded - B  # padding rows are free rows: they write position 0 of themselves only
        self._tokens[:padded].copy_(torch.tensor(tokens + [0] * fill), non_blocking=True)
        self._positions[:padded].copy_(torch.tensor(positions + [0] * fill), non_blocking=True)
        if not self.cuda_graphs:
            return self._decode_step(padded, length)
        key = (padded, length)
        if key not in self._graphs:
            self._graphs[key] = self._capture(padded, length)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:B]

    def _decode_step(self, B: int, length: int) -> torch.Tensor:
        c = self.config
        positions = self._positions[:B]
        rows = torch.arange(B, device=self.device)
        cos, sin = self.model.cos[positions][:, None], self.model.sin[positions][:, None]  # (B, 1, rope_n_elem)
        key_pos = torch.arange(length, device=self.device)
        masks: dict[int | None, torch.Tensor] = {}  # additive, built once per step, not once per layer
        for window in set(self.windows):
            allowed = key_pos[None] <= positions[:, None]  # (B, length)
            if window is not None:
                allowed &= key_pos[None] > positions[:, None] - window
            masks[window] = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))[:, None, None]
        x = self._embed(self._tokens[:B, None])
        for layer, block in enumerate(self.model.transformer.h):
            mask = masks[self.windows[layer]]

            def attend(attn, x_normed, layer=layer, mask=mask):
                q, k, v = self._qkv(attn, x_normed, cos, sin)
                self.k[layer, rows, :, positions] = k[:, :, 0]
                self.v[layer, rows, :, positions] = v[:, :, 0]
                # (B, n_kv, queries per kv head, hs) against (B, n_kv, length, hs)
                q = q.view(B, c.n_query_groups, c.n_head // c.n_query_groups, c.head_size)
                y = F.scaled_dot_product_attention(
                    q, self.k[layer, :B, :, :length], self.v[layer, :B, :, :length],
                    attn_mask=mask, scale=self.scale,
                )  # fmt: skip
                return attn.proj(y.reshape(B, 1, c.n_head * c.head_size))

            x = self._block(block, x, attend)
        return self._head(x[:, 0])

    def _capture(self, B: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the decode step for (B, length) once; later steps replay it with new inputs."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS workspaces, lazy init)
            self._decode_step(B, length)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._decode_step(B, length)
        return graph, out

    def warmup(self, max_batch: int, max_length: int | None = None) -> int:
        """Capture the decode graphs up front (so the first requests don't pay for it); returns how many."""
        if not self.cuda_graphs:
            return 0
        max_length = min(max_length or self.max_len, self.max_len)
        batches = sorted({min(batch_bucket(b), self.decode_rows) for b in range(1, min(max_batch, self.decode_rows) + 1)})
        with torch.inference_mode():
            for length in range(LENGTH_BUCKET, max_length + 1, LENGTH_BUCKET):
                for b in batches:
                    if (b, length) not in self._graphs:
                        self._positions[:b].zero_()
                        self._tokens[:b].zero_()
                        self._graphs[(b, length)] = self._capture(b, length)
        return len(self._graphs)


class _ShortBatch:
    """Short prefill segments attended in one call per layer instead of one call each.

    After a cached few-shot prefix, each of 30 HELM requests adds ~100 tokens; looping over them
    costs ~10 kernel launches per segment per layer, more than the arithmetic. Here queries are
    padded to (segment, T); grouped queries fold into the query axis as in decode; the mask (built
    once per prefill, shared by all layers) encodes each segment's positions. Padding queries see
    key 0 only, so no row is fully masked.
    """

    def __init__(self, model: BatchedModel, segments: list[Segment], bounds: list[tuple[int, int]]) -> None:
        c, device = model.config, model.device
        self.model, self.n_kv, self.per_kv = model, c.n_query_groups, c.n_head // c.n_query_groups
        self.T = max(len(s.ids) for s in segments)
        self.L = max(s.start + len(s.ids) for s in segments)
        self.rows = torch.tensor([s.row for s in segments], device=device)
        S = len(segments)
        gather = torch.zeros(S, self.T, dtype=torch.long)  # packed index of each padded query
        valid = torch.zeros(S, self.T, dtype=torch.bool)
        query_pos = torch.zeros(S, self.T, dtype=torch.long)
        for j, (s, (a, b)) in enumerate(zip(segments, bounds)):
            gather[j, : b - a] = torch.arange(a, b)
            valid[j, : b - a] = True
            query_pos[j, : b - a] = torch.arange(s.start, s.start + b - a)
        self.gather, self.valid = gather.to(device), valid.to(device)
        self.dst = self.gather[self.valid]
        self.query_pos = query_pos.to(device)
        self._masks: dict[int | None, torch.Tensor] = {}

    def _mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            key_pos = torch.arange(self.L, device=self.model.device)
            allowed = key_pos[None, None] <= self.query_pos[..., None]  # (S, T, L)
            if window is not None:
                allowed &= key_pos[None, None] > self.query_pos[..., None] - window
            allowed &= self.valid[..., None]
            allowed[..., 0] |= ~self.valid  # padding queries: key 0 only
            additive = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.model.device)
            additive.masked_fill_(~allowed, float("-inf"))
            S = allowed.size(0)
            self._masks[window] = additive[:, None].expand(S, self.per_kv, self.T, self.L).reshape(S, 1, self.per_kv * self.T, self.L)
        return self._masks[window]

    def attend(self, layer: int, q: torch.Tensor, y: torch.Tensor) -> None:
        """Write these segments' attention outputs into ``y`` (1, nh, N, hs) from packed ``q``."""
        S, hs = self.gather.size(0), q.size(-1)
        queries = q[0][:, self.gather]  # (nh, S, T, hs)
        queries = queries.permute(1, 0, 2, 3).reshape(S, self.n_kv, self.per_kv * self.T, hs)
        keys = self.model.k[layer, self.rows, :, : self.L]  # (S, n_kv, L, hs)
        values = self.model.v[layer, self.rows, :, : self.L]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self._mask(self.model.windows[layer]), scale=self.model.scale)
        out = out.reshape(S, self.n_kv * self.per_kv, self.T, hs).permute(1, 0, 2, 3)  # (nh, S, T, hs)
        y[0][:, self.dst] = out[:, self.valid]
