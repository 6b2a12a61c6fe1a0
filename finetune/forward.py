"""The training forward and loss, over litgpt's own modules.

``GPT.forward`` computes logits for every position and has no per-token positions. Training wants
three things it can't give, so this walks the same modules (embedding, blocks, final norm, head):

- per-token ``positions`` and a ``DocumentMask`` for packed rows (``finetune.packing``);
- the head and cross-entropy only where there are labels (prompt tokens and padding have none),
  in chunks that are recomputed in the backward, so the (tokens x vocab) logits never all live at once;
- optional activation checkpointing per block, for runs that don't fit otherwise.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from litgpt.model import GPT, do_softcapping
from torch.utils.checkpoint import checkpoint

from finetune.attention import document_mask
from finetune.data import target_index

HEAD_CHUNK_ROWS = 2048  # positions per head+loss chunk once the logits would pass LOGITS_DIRECT elements
LOGITS_DIRECT = 2**27  # below this many logits, one head call without recomputation is cheaper


def hidden_states(
    gpt: GPT,
    input_ids: torch.Tensor,
    positions: torch.Tensor | None = None,
    mask=None,
    checkpoint_blocks: bool = False,
) -> torch.Tensor:
    """Final-norm output (B, T, n_embd), as ``GPT.forward`` computes it before the head.

    ``mask``: None (causal) or ``finetune.attention.document_mask`` of packed rows.
    """
    T = input_ids.size(1)
    if T > gpt.max_seq_length:
        raise ValueError(f"a batch of {T} tokens is longer than the model's max_seq_length {gpt.max_seq_length}")
    if positions is None:
        cos, sin = gpt.cos[:T].unsqueeze(0), gpt.sin[:T].unsqueeze(0)
    else:
        cos, sin = gpt.cos[positions], gpt.sin[positions]
    x = gpt.transformer.wte(input_ids)
    if gpt.config.scale_embeddings:
        x = x * torch.tensor(gpt.config.n_embd**0.5, dtype=x.dtype)
    rope_indices = gpt.config.rope_indices
    for i, block in enumerate(gpt.transformer.h):
        c, s = (cos[..., rope_indices[i]], sin[..., rope_indices[i]]) if rope_indices is not None else (cos, sin)
        if checkpoint_blocks and torch.is_grad_enabled():
            x = checkpoint(block, x, c, s, mask, use_reentrant=False, context_fn=same_default_dtype)
        else:
            x = block(x, c, s, mask)
    return gpt.transformer.ln_f(x)


def same_default_dtype() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Checkpoint contexts: the recompute runs under the forward's default dtype.

    Fabric's bf16-true sets the default dtype to bf16 only inside ``fabric.autocast()``; the backward,
    where checkpointed blocks are recomputed, runs outside it. Autocast state is restored by torch's
    checkpoint, the default dtype is not, so compiled blocks were traced again under float32 and saved
    other tensors than the forward: CheckpointError on CUDA (tests/test_gpu.py)."""
    return contextlib.nullcontext(), _default_dtype(torch.get_default_dtype())


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _head_loss_sum(gpt: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = gpt.lm_head(hidden)
    if gpt.config.final_logit_softcapping is not None:
        logits = do_softcapping(logits, gpt.config.final_logit_softcapping)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def next_token_loss(gpt: GPT, hidden: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t+1]`` from position t, over labelled targets only.

    Equals ``litgpt.utils.chunked_cross_entropy(logits[:, :-1], labels[:, 1:])`` without computing the
    logits of unlabelled positions. ``keep``: ``finetune.data.target_index(labels)``, if already known.
    """
    targets = labels[:, 1:].reshape(-1)
    keep = target_index(labels) if keep is None else keep
    rows = hidden[:, :-1].reshape(-1, hidden.size(-1)).index_select(0, keep)
    targets = targets.index_select(0, keep)
    if rows.size(0) * gpt.config.padded_vocab_size <= LOGITS_DIRECT or not torch.is_grad_enabled():
        total = _head_loss_sum(gpt, rows, targets)
    else:
        head = partial(_head_loss_sum, gpt)
        total = sum(
            checkpoint(head, h, t, use_reentrant=False, context_fn=same_default_dtype)
            for h, t in zip(rows.split(HEAD_CHUNK_ROWS), targets.split(HEAD_CHUNK_ROWS))
        )
    return total / max(targets.numel(), 1)


def training_loss(gpt: GPT, batch: dict[str, torch.Tensor], checkpoint_blocks: bool = False) -> torch.Tensor:
    """The loss of a padded batch or of a packed one (``positions`` + ``documents``, from ``PackCollate``)."""
    mask = document_mask(batch["documents"]) if "documents" in batch else None
    hidden = hidden_states(gpt, batch["input_ids"], batch.get("positions"), mask, checkpoint_blocks)
    return next_token_loss(gpt, hidden, batch["labels"], batch.get("target_index"))
