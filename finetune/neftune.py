"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, arXiv 2310.05914).

The 4090 track's winner trained with NEFTune alpha 5. Each training forward adds
``U(-1, 1) * alpha / sqrt(L * d)`` to the token embeddings, ``L`` the batch's sequence length (a
packed row's length when packing, the padded length otherwise) and ``d`` the embedding width: the
formula of the paper and of TRL / transformers (``transformers.trainer_utils.neftune_post_forward_hook``,
which ``tests/test_neftune.py`` checks this against). The hook adds nothing when the embedding is in
eval mode (validation runs under ``model.eval()``), it is not part of any saved weight, and the server
never installs it, so evaluation and serving see the model as trained, without noise.
"""

from __future__ import annotations

import math

import torch
from torch.utils.hooks import RemovableHandle


def noise_bound(alpha: float, seq_len: int, n_embd: int) -> float:
    """The half-width of the uniform noise: ``alpha / sqrt(L * d)``."""
    return alpha / math.sqrt(seq_len * n_embd)


def add_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """``embeddings`` (B, L, d) plus NEFTune noise, drawn from torch's global generator (seeded and resumed with it)."""
    bound = noise_bound(alpha, embeddings.size(1), embeddings.size(2))
    return embeddings + torch.zeros_like(embeddings).uniform_(-bound, bound)


def check_alpha(alpha: float) -> float:
    """``alpha`` itself, or a ``ValueError`` naming ``neftune_alpha`` when it is not a finite number >= 0."""
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"neftune_alpha: must be a number >= 0 (0 turns NEFTune off; the paper uses 5-15), got {alpha!r}")
    return float(alpha)


def attach(model: torch.nn.Module, alpha: float) -> RemovableHandle | None:
    """Register NEFTune on ``model``'s token embedding (a litgpt GPT, or Fabric's wrapper of one).

    ``alpha`` 0 attaches nothing. Returns the hook handle (``.remove()`` detaches it).
    """
    if check_alpha(alpha) == 0:
        return None
    return getattr(model, "module", model).transformer.wte.register_forward_hook(forward_hook(alpha))


def forward_hook(alpha: float):
    """A forward hook for an embedding module: noise while ``module.training``, the output untouched otherwise."""

    def hook(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return add_noise(output, alpha) if module.training else output

    return hook
