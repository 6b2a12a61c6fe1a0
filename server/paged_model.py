"""litgpt's GPT run over the paged KV cache: packed prefill, batched decode, CUDA graphs (the model runner).

Continuous batching needs each sequence at its own position, prompts of different lengths packed
into one forward, and prefixes shared between sequences. This module runs litgpt's own submodules
(norms, the qkv/proj and MLP linears, LoRA and bitsandbytes layers included, the head) and does only
the attention and the K/V storage:

- K and V are one tensor: (layer, block, position in block, K or V, kv_head, head_size), so one layer's
  block is one contiguous chunk (64 KiB for Mistral-7B). Which blocks a sequence reads is its block
  table (``server.kv_pool`` hands them out); block 0 is padding. Reading a batch's blocks is one
  ``index_select`` of whole chunks, viewed as 8-byte words. The first layout (layer, K/V, head, block,
  ...) needed an element-wise ``index`` gather of 2-byte values (3.5 GiB per step for 16 sequences x
  1,792 positions on Mistral-7B), the likely cause of c=30 decode steps ~14 ms slower than the dense
  rows before (``bench.decode_gather`` times both). Attention reads the gathered chunks in place, as
  (sequence, position, head, head_size) strides.
- prefill: the new tokens of several sequences go through the linears as one sequence; each token's
  K/V is written to its slot; attention runs per sequence over its blocks gathered in order (flash
  attention when it starts empty), short segments together in one call.
- decode: one token per sequence. Each layer gathers the batch's blocks into one (B, kv_head,
  length, head_size) buffer sized by the length bucket (multiples of 256) and grouped queries attend
  as a (kv_head, queries-per-kv-head) block, so no repeat_interleave copy is made. On CUDA each
  (batch bucket, length bucket) step is captured once as a CUDA graph over static token, position,
  slot and block-table buffers, and replayed: a 7B decode step is ~1,000 small kernels
  (``--compile_decode`` fuses each layer's around its attention: ``server.compiled_decode``).

Mistral's sliding window is applied only where a sequence is longer than the window.

Attention calls are bounded by ``attention_tokens`` gathered K/V positions (sequences x positions
read): short prefill segments are attended in groups, decode batches in chunks of sequences, so the
worst step's transient memory (measured by ``server.step_memory`` to size the pool) stays small.
Unbounded, 32 sequences x 2,048 positions of Llama-2-7B gather 512 MiB of K and 512 MiB of V per
call, and masked SDPA may hold fp32 scores as large again; ``ATTENTION_TOKENS`` (16,384) is 256 MiB
of K+V for it, 8 full windows per call (64 MiB on 8-kv-head models). Below the budget nothing
changes (one call, as before): batch 1 and small steps run as they did.
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
ATTENTION_TOKENS = 16384  # gathered K/V positions per attention call (8 windows of 2,048): see the module docstring


def unsupported_reason(model: GPT) -> str | None:
    """Why the paged forward cannot run ``model`` exactly as litgpt does, or None."""
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


def balanced_chunks(n: int, size: int, budget: int | None) -> list[slice]:
    """``n`` items of ``size`` positions in the fewest slices of at most ``budget`` positions each (one item
    at least), their lengths within one of each other; one slice when ``budget`` is None or 0 (unbounded) or all fit."""
    parts = 1 if not budget else -(-n // max(1, budget // size))
    base, extra = divmod(n, parts)
    ends = [(i + 1) * base + min(i + 1, extra) for i in range(parts)]
    return [slice(a, b) for a, b in zip([0, *ends], ends)]


def kv_bytes_per_token(model: GPT) -> int:
    c = model.config
    return 2 * c.n_layer * c.n_query_groups * c.head_size * model.transformer.wte.weight.element_size()


@dataclass
class Segment:
    """New tokens of one sequence for a prefill pass: ``ids`` go to positions ``start..start+len-1``
    of the sequence whose blocks are ``table``."""

    table: list[int]
    start: int
    ids: list[int]
    all_logits: bool = False  # logits for every position (echo), else only the last


class PagedModel:
    def __init__(
        self, model: GPT, num_blocks: int, block_size: int, max_batch: int, max_len: int | None = None, cuda_graphs: bool = True,
        compile_decode: bool = False,
        attention_tokens: int | None = ATTENTION_TOKENS,
    ) -> None:  # fmt: skip
        """K/V storage for ``num_blocks`` blocks of ``block_size``; decode steps run up to ``max_batch``
        sequences of at most ``max_len`` positions; ``compile_decode``: see ``server.compiled_decode``; each
        attention call gathers at most ``attention_tokens`` K/V positions (None or 0: unbounded)."""
        if (reason := unsupported_reason(model)) is not None:
            raise ValueError(f"the batched engine does not support {reason}")
        self._layer_parts = (self._decode_before, self._decode_after)  # a decode layer around its attention
        if compile_decode:
            from server.compiled_decode import compiled_parts

            self._layer_parts = compiled_parts(self, model)
        self.compile_decode = compile_decode
        self.model = model
        self.config = c = model.config
        self.device = model.transformer.wte.weight.device
        self.dtype = model.transformer.wte.weight.dtype
        self.max_len = min(max_len or c.block_size, c.block_size, model.cos.size(0))
        self.block_size, self.max_batch = block_size, max_batch
        self.max_blocks = -(-self.max_len // block_size)  # block-table width of the longest sequence
        if attention_tokens is not None and attention_tokens < 0:
            raise ValueError(
                f"attention_tokens: must be positive (gathered K/V positions per attention call) or 0 for no bound, got {attention_tokens}"
            )
        self.attention_tokens = attention_tokens or None  # a call reads one whole sequence at least, whatever the budget
        # K and V in one tensor, a block of one layer contiguous, so one gather of whole chunks per layer reads both.
        # zeros, not empty: decode reads whole length buckets, and masked-out garbage that happens to
        # be NaN would still poison the softmax (NaN * 0 = NaN)
        self.num_blocks = num_blocks
        self.kv = torch.zeros((c.n_layer, num_blocks, block_size, 2, c.n_query_groups, c.head_size), device=self.device, dtype=self.dtype)
        by_slot = self.kv.view(c.n_layer, num_blocks * block_size, 2, c.n_query_groups, c.head_size)
        self._k_slots, self._v_slots = by_slot[:, :, 0], by_slot[:, :, 1]  # (layer, slot, kv_head, hs)
        chunk = block_size * 2 * c.n_query_groups * c.head_size * self.kv.element_size()  # bytes of one layer's block
        self._word = torch.int64 if chunk % 8 == 0 and self.kv.element_size() < 8 else self.kv.dtype  # what the gather copies
        # litgpt's attention scale, YaRN's mscale (rope_adjustments with mscale_all_dim) included
        mscale = getattr(model.transformer.h[0].attn, "mscale", 1.0)
        self.scale = mscale * mscale / math.sqrt(c.attention_scores_scalar or c.head_size)
        # a window at least as long as the served window can't exclude anything (Mistral-7B-v0.1: 4096)
        self.windows = [
            c.sliding_window_size if block.attn.apply_sliding_window_attention and c.sliding_window_size < self.max_len else None
            for block in model.transformer.h
        ]
        self._fp32_weights: dict[torch.nn.Module, torch.Tensor] = {}  # RMSNorm weights in fp32
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = self._stream = None
        self._logits: torch.Tensor | None = None  # what every graph's decode step writes its logits to
        # decode inputs, static so that CUDA graphs can replay them
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._slots = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._tables = torch.zeros(max_batch, self.max_blocks, dtype=torch.long, device=self.device)

    # --- blocks -------------------------------------------------------------------------------

    def copy_block(self, src: int, dst: int) -> None:
        """Make block ``dst`` hold block ``src``'s K/V (copy-on-write of a partly filled last block)."""
        self.kv[:, dst] = self.kv[:, src]

    def _slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``tables`` (S, M) blocks in order: (S, kv_head, M * block_size, hs) each, views of one copy.

        The copy is of whole blocks (``index_select`` on the block axis, 8-byte words where they fit):
        not an element-wise gather."""
        S, M = tables.shape
        c = self.config
        chunks = self.kv[layer].view(self.num_blocks, -1).view(self._word)
        both = chunks.index_select(0, tables.reshape(-1)).view(self.dtype)
        both = both.view(S, M * self.block_size, 2, c.n_query_groups, c.head_size)
        return both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)

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

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """litgpt's RMSNorm in one fused kernel (same fp32 math); any other norm as is.

        The weight's fp32 copy is made once, not at every call (that was two kernels per layer in
        every decode step)."""
        if type(norm) is RMSNorm and not norm.add_unit_offset and norm.dim == -1:
            # compiled (server.compiled_decode), the cast fuses into the norm's kernel; a dict keyed by
            # the module would make dynamo guard on each layer's identity (a recompile per layer)
            weight = norm.weight.float() if torch.compiler.is_compiling() else self._fp32_weights.get(norm)
            if weight is None:
                weight = self._fp32_weights[norm] = norm.weight.detach().float()
            return F.rms_norm(x.float(), (x.size(-1),), weight, norm.eps).to(x.dtype)
        return norm(x)

    def _block(self, block, x: torch.Tensor, attend) -> torch.Tensor:
        """litgpt's Block.forward with ``attend(attn, x_normed)`` as the attention."""
        x_normed = self._norm(block.norm_1, x)
        return self._block_rest(block, x, x_normed, attend(block.attn, x_normed))

    def _block_rest(self, block, x: torch.Tensor, x_normed: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """What litgpt's Block.forward does after the attention (residuals, norms, MLP)."""
        c = self.config
        h = block.post_attention_norm(attended)
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
        """Run the segments' tokens, write their K/V; logits per segment: (T or 1, vocab)."""
        for s in segments:
            end = s.start + len(s.ids)
            if not s.ids or end > self.max_len or len(s.table) * self.block_size < end:
                raise ValueError(f"a segment needs 1..{self.max_len - s.start} tokens and blocks for positions up to {end}")
        idx = torch.tensor([t for s in segments for t in s.ids], device=self.device)[None]
        positions = torch.cat([torch.arange(s.start, s.start + len(s.ids)) for s in segments]).to(self.device)
        slots = torch.tensor([self._slot(s.table, p) for s in segments for p in range(s.start, s.start + len(s.ids))], device=self.device)
        cos, sin = self.model.cos[positions][None], self.model.sin[positions][None]
        bounds, offset = [], 0
        for s in segments:
            bounds.append((offset, offset + len(s.ids)))
            offset += len(s.ids)
        short = [i for i, s in enumerate(segments) if len(s.ids) <= SHORT_SEGMENT]
        groups = [g for g in self._short_groups(short, segments) if len(g) > 1]  # a group of one is attended alone
        batches = [_ShortBatch(self, [segments[i] for i in g], [bounds[i] for i in g]) for g in groups]
        batched = {i for g in groups for i in g}
        alone = [i for i in range(len(segments)) if i not in batched]
        tables = {
            i: torch.tensor(segments[i].table[: -(-(segments[i].start + len(segments[i].ids)) // self.block_size)], device=self.device)[None]
            for i in alone
        }

        x = self._embed(idx)
        for layer, block in enumerate(self.model.transformer.h):

            def attend(attn, x_normed, layer=layer):
                q, k, v = self._qkv(attn, x_normed, cos, sin)
                self._k_slots[layer][slots] = k[0].transpose(0, 1)  # every segment's K/V in one write
                self._v_slots[layer][slots] = v[0].transpose(0, 1)
                y = torch.empty_like(q)
                for i in alone:
                    a, b = bounds[i]
                    y[:, :, a:b] = self._segment_attention(layer, q[:, :, a:b], segments[i], tables[i])
                for batch in batches:
                    batch.attend(layer, q, y)
                return attn.proj(y.transpose(1, 2).reshape(1, x_normed.size(1), -1))

            x = self._block(block, x, attend)
        keep = torch.cat([torch.arange(a, b) if s.all_logits else torch.tensor([b - 1]) for s, (a, b) in zip(segments, bounds)]).to(self.device)
        logits = self._head(x[0, keep])
        return list(logits.split([len(s.ids) if s.all_logits else 1 for s in segments]))

    def _short_groups(self, short: list[int], segments: list[Segment]) -> list[list[int]]:
        """The short segments (indices ``short``) in groups attended by one call each: segments x the group's
        gathered positions (its longest, in whole blocks) within ``attention_tokens``, by end position so that
        segments of similar lengths share a call; all in one group when unbounded."""
        if not self.attention_tokens:
            return [short]
        groups: list[list[int]] = [[]]
        for i in sorted(short, key=lambda i: segments[i].start + len(segments[i].ids)):
            gathered = -(-(segments[i].start + len(segments[i].ids)) // self.block_size) * self.block_size
            if groups[-1] and (len(groups[-1]) + 1) * gathered > self.attention_tokens:
                groups.append([])
            groups[-1].append(i)
        return groups

    def _segment_attention(self, layer: int, q: torch.Tensor, s: Segment, table: torch.Tensor) -> torch.Tensor:
        """One sequence's new queries (1, nh, T, hs) against its blocks, flash attention when it starts empty.

        Masked, the queries go in chunks whose scores (queries x keys per head) are at most a short batch's
        (``attention_tokens`` x ``SHORT_SEGMENT``): SDPA's math and memory-efficient paths may hold them in fp32."""
        c = self.config
        end = s.start + q.size(2)
        keys, values = self._gather(layer, table)
        keys, values = keys[:, :, :end], values[:, :, :end]
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
        rows = balanced_chunks(q.size(2), end, self.attention_tokens and self.attention_tokens * SHORT_SEGMENT)
        out = [F.scaled_dot_product_attention(q[:, :, r], keys, values, attn_mask=mask[r], scale=self.scale) for r in rows]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    # --- decode -------------------------------------------------------------------------------

    def _bucket(self, B: int, positions: list[int]) -> tuple[int, int]:
        """(padded batch, blocks read per sequence) of the step that runs these positions."""
        padded = min(batch_bucket(B), self.max_batch) if self.cuda_graphs else B
        length = min(self.max_len, LENGTH_BUCKET * math.ceil((max(positions) + 1) / LENGTH_BUCKET))
        return padded, -(-length // self.block_size)

    @torch.inference_mode()
    def decode(
        self, tokens: list[int], positions: list[int], tables: list[list[int]], on_device: tuple[torch.Tensor, list[int]] | None = None
    ) -> torch.Tensor:
        """One token for each sequence at its position (its blocks in ``tables``); logits (B, vocab).

        ``on_device`` (ids, src): the first ``len(src)`` sequences' tokens are ``ids[src]``, the previous
        step's samples still on the device (their entries in ``tokens`` are placeholders), so this step
        can be enqueued before they are read back (``--overlap_decode``)."""
        B = len(tokens)
        if not 0 < B <= self.max_batch or max(positions) >= self.max_len:
            raise ValueError(f"decode needs 1..{self.max_batch} sequences at positions < {self.max_len}")
        padded, blocks = self._bucket(B, positions)
        fill = padded - B  # padding sequences read and write block 0 only
        rows = [t[:blocks] + [0] * (blocks - len(t)) for t in tables] + [[0] * blocks] * fill
        slots = [self._slot(t, p) for t, p in zip(tables, positions)]
        self._tokens[:padded].copy_(torch.tensor(tokens + [0] * fill), non_blocking=True)
        self._positions[:padded].copy_(torch.tensor(positions + [0] * fill), non_blocking=True)
        self._slots[:padded].copy_(torch.tensor(slots + [0] * fill), non_blocking=True)
        self._tables[:padded, :blocks].copy_(torch.tensor(rows), non_blocking=True)
        if on_device is not None:  # after the copy above on the same stream: these rows get the device's ids
            ids, src = on_device
            # (a blocking host-to-device copy of the index would wait for the steps still running)
            taken = ids[: len(src)] if src == list(range(len(src))) else ids[torch.tensor(src).to(ids.device, non_blocking=True)]
            self._tokens[: len(src)].copy_(taken)
        if not self.cuda_graphs:
            return self._decode_step(padded, blocks)
        key = (padded, blocks)
        if key not in self._graphs:
            self._graphs[key] = self._capture(padded, blocks)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:B]

    def _decode_step(self, B: int, blocks: int) -> torch.Tensor:
        c = self.config
        positions, slots, tables = self._positions[:B], self._slots[:B], self._tables[:B, :blocks]
        cos, sin = self.model.cos[positions][:, None], self.model.sin[positions][:, None]  # (B, 1, rope_n_elem)
        key_pos = torch.arange(blocks * self.block_size, device=self.device)
        masks: dict[int | None, torch.Tensor] = {}  # additive, built once per step, not once per layer
        for window in set(self.windows):
            allowed = key_pos[None] <= positions[:, None]  # (B, length)
            if window is not None:
                allowed &= key_pos[None] > positions[:, None] - window
            masks[window] = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))[:, None, None]
        x = self._embed(self._tokens[:B, None])
        before, after = self._layer_parts
        for layer, block in enumerate(self.model.transformer.h):
            x_normed, q, k, v = before(block, x, cos, sin)
            self._k_slots[layer][slots] = k[:, :, 0]
            self._v_slots[layer][slots] = v[:, :, 0]
            q = q.view(B, c.n_query_groups, c.n_head // c.n_query_groups, c.head_size)
            y = self._decode_attention(layer, q, tables, masks[self.windows[layer]])
            x = after(block, x, x_normed, y)
        return self._head(x[:, 0])

    def _decode_before(self, block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """A decode layer up to its attention: the normed input and roped q, k, v."""
        x_normed = self._norm(block.norm_1, x)
        return (x_normed, *self._qkv(block.attn, x_normed, cos, sin))

    def _decode_after(self, block, x: torch.Tensor, x_normed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A decode layer from its attention's output ``y`` (B, n_kv, queries per kv head, hs) on."""
        return self._block_rest(block, x, x_normed, block.attn.proj(y.reshape(y.size(0), 1, -1)))

    def _decode_attention(self, layer: int, q: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, n_kv, queries per kv head, hs) against the batch's blocks gathered as (B, n_kv, length, hs), in
        chunks of sequences of at most ``attention_tokens`` positions (static per step: CUDA graphs capture them)."""
        out = []
        for rows in balanced_chunks(q.size(0), tables.size(1) * self.block_size, self.attention_tokens):
            keys, values = self._gather(layer, tables[rows])
            out.append(F.scaled_dot_product_attention(q[rows], keys, values, attn_mask=mask[rows], scale=self.scale))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _capture(self, B: int, blocks: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the decode step for (B, blocks) once; later steps replay it with new inputs."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._stream is None:  # one side stream: the allocator caches blocks per stream
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):  # warm-up outside the graph (cuBLAS workspaces, lazy init)
            out = self._decode_step(B, blocks)
        torch.cuda.current_stream().wait_stream(self._stream)
        if self._logits is None:  # one logits buffer for all graphs, not one each (32 x 152k vocab: 10 MB a graph)
            self._logits = torch.empty((self.max_batch, out.size(-1)), dtype=out.dtype, device=self.device)
        del out
        torch.cuda.empty_cache()  # the warm-up's blocks serve only the side stream: give them back before the graph's pool grows
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[:B].copy_(self._decode_step(B, blocks))
        return graph, self._logits[:B]

    def warmup(self, max_batch: int, max_length: int | None = None) -> int:
        """Capture the decode graphs up front (so the first requests don't pay for it); returns how many.

        Padding inputs point at block 0, so capturing writes nothing any sequence reads."""
        if not self.cuda_graphs:
            return 0
        max_length = min(max_length or self.max_len, self.max_len)
        batches = sorted({min(batch_bucket(b), self.max_batch) for b in range(1, min(max_batch, self.max_batch) + 1)})
        with torch.inference_mode():
            for length in range(LENGTH_BUCKET, max_length + LENGTH_BUCKET, LENGTH_BUCKET):
                for b in batches:
                    key = self._bucket(b, [min(length, max_length) - 1])
                    if key not in self._graphs:
                        for buffer in (self._positions, self._tokens, self._slots, self._tables):
                            buffer.zero_()
                        self._graphs[key] = self._capture(*key)
        return len(self._graphs)


class _ShortBatch:
    """Short prefill segments attended in one call per layer instead of one call each.

    After a cached few-shot prefix, each of 30 HELM requests adds ~100 tokens; looping over them
    costs ~10 kernel launches per segment per layer, more than the arithmetic. Here queries are
    padded to (segment, T); grouped queries fold into the query axis as in decode; the mask (built
    once per prefill, shared by all layers) encodes each segment's positions. Padding queries see
    key 0 only, so no row is fully masked.
    """

    def __init__(self, model: PagedModel, segments: list[Segment], bounds: list[tuple[int, int]]) -> None:
        c, device = model.config, model.device
        self.model, self.n_kv, self.per_kv = model, c.n_query_groups, c.n_head // c.n_query_groups
        self.T = max(len(s.ids) for s in segments)
        blocks = -(-max(s.start + len(s.ids) for s in segments) // model.block_size)
        self.L = blocks * model.block_size
        tables = torch.zeros(len(segments), blocks, dtype=torch.long)
        for j, s in enumerate(segments):
            used = s.table[:blocks]
            tables[j, : len(used)] = torch.tensor(used)
        self.tables = tables.to(device)
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
        keys, values = self.model._gather(layer, self.tables)  # (S, n_kv, L, hs)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self._mask(self.model.windows[layer]), scale=self.model.scale)
        out = out.reshape(S, self.n_kv * self.per_kv, self.T, hs).permute(1, 0, 2, 3)  # (nh, S, T, hs)
        y[0][:, self.dst] = out[:, self.valid]
