"""Representation health: two cheap numbers that expose collapse long before a probe would.

A JEPA can lower its loss by making every feature the same (or by using a few directions only):
the predictor then has nothing left to predict. Both signals below are pure functions of a batch
of features, so the training loop can log them every few steps and tests can pin them:

- :func:`rankme` is the effective rank of a feature matrix (Garrido et al., "RankMe", ICML 2023):
  the exponential of the entropy of its normalised singular values. It is ~1 for a collapsed
  (constant) encoder and approaches ``min(N, D)`` for features spread over every direction.
- :func:`target_std` is the per-dimension standard deviation across samples and tokens, averaged
  over dimensions. I-JEPA's targets are layer-normed per token, so each token always has unit
  spread across channels; what falls to zero under collapse is the spread of one channel across
  tokens and images, which is what this measures.
"""

from __future__ import annotations

import math

import torch


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``features`` ([N, D], or [..., D] flattened to rows): ``exp(H(p))`` with
    ``p_k = s_k / sum(s) + eps`` over the singular values ``s`` (RankMe's definition; features are
    not centred, so a constant non-zero encoder has one singular value and a RankMe of 1).

    Computed in float64 on the CPU; ``N`` should exceed ``D`` for the number to reach full rank
    (RankMe can never exceed ``min(N, D)``)."""
    x = features.detach().reshape(-1, features.shape[-1]).to("cpu", torch.float64)
    if x.numel() == 0:
        raise ValueError("rankme: empty feature matrix")
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(math.exp(float(-(p * p.log()).sum())))


def target_std(features: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Mean over channels of each channel's std across all tokens ([..., D]); ``valid`` (the
    leading shape, True = real token) leaves padded tokens out, as the JEPA loss does."""
    x = features.detach().float()
    x = x.reshape(-1, x.shape[-1]) if valid is None else x[valid.to(torch.bool)]
    if x.shape[0] < 2:
        raise ValueError(f"target_std needs at least 2 tokens, got {x.shape[0]}")
    return float(x.std(dim=0).mean())
