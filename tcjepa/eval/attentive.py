"""Attentive probe: a small cross-attention pooling head over frozen patch features.

Mean pooling throws away *where* things are and lets a large background drown a small object;
V-JEPA and DINOv2 evaluate frozen encoders with a learned pooling instead (``AttentivePooler`` in
facebookresearch/jepa): a learnable query token cross-attends over the layer-normed patch
features, an MLP refines it, and a linear layer classifies it. It has far more capacity than a
linear probe, so it measures what the patch features *contain* rather than what a mean of them
makes linearly separable; report both when comparing encoders.

As for the linear probe, one head per learning rate trains on the same batches (a sweep in one
pass); the head and the epoch are chosen on a held-out slice of the train split (early stopping)
and reported on val. Also as for the linear probe, the tokens are PCA-whitened first (statistics
of the fit split's tokens, ``probe.attentive_whiten_floor``): a ViT's tokens are badly
conditioned and what tells classes apart can lie in their small directions, which AdamW on the
raw tokens reaches only after far more steps than a probe gets (measured on the 2,000-step
quickstart I-JEPA, the scenes' shape label: 0.31 raw, 0.56 whitened, the same 20 epochs of
batch 64; the linear probe on the mean reads 0.37). The floor trades reach for noise: 1e-5 read
that shape at 0.63 but overfits a 90-sample split that 1e-4 reads near-perfectly. Above the
floor the whitening is an invertible linear map of the tokens, so it changes how fast the head
learns, not what it can express.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tcjepa.config import ProbeConfig
from tcjepa.eval.common import classification_metrics, default_device, holdout_split, pca_whitening, train_heads_per_lr
from tcjepa.models.attention import attention
from tcjepa.models.vit import MLP


def auto_heads(dim: int) -> int:
    """One head per 64 channels (ViT's convention), at least 1, dividing ``dim``."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


class AttentivePooler(nn.Module):
    """``num_queries`` learned queries attend over ``[B, N, D]`` tokens -> ``[B, D]``:
    ``q + proj(attn(q, LN(x)))`` then a pre-norm MLP residual, averaged over queries."""

    def __init__(self, dim: int, num_heads: int, num_queries: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the feature width {dim}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.norm_x = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        k, v = self.kv(self.norm_x(x)).view(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)
        query = self.query.expand(B, -1, -1)
        q = self.q(query).view(B, -1, h, D // h).transpose(1, 2)
        out = attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        out = query + self.proj(out)
        out = out + self.mlp(self.norm_mlp(out))
        return out.mean(dim=1)


class AttentiveClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooler(x))


def token_whitener(fit: torch.Tensor, floor: float, device: torch.device
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch of tokens [B, P, D] (any float dtype) -> fp32 on ``device``, PCA-whitened with the
    statistics of the ``fit`` tokens [N, P, D] (eigenvalues floored at ``floor`` x the largest;
    ``floor`` 0: not whitened)."""
    if floor == 0:
        return lambda x: x.to(device).float()
    mean, proj = pca_whitening(fit.reshape(-1, fit.size(-1)), floor)
    mean, proj = mean.float().to(device), proj.float().to(device)
    return lambda x: (x.to(device).float() - mean) @ proj


@torch.no_grad()
def _predict(head: nn.Module, x: torch.Tensor, batch_size: int,
             prepare: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.cat([head(prepare(x[i : i + batch_size])).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def train_attentive_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one attentive classifier per ``cfg.attentive_lrs`` on patch features [N, P, D]
    (any float dtype; batches are cast to fp32) and report val metrics of the (learning rate,
    epoch) that scores best on the holdout: the head has far more parameters than a linear probe
    and small train splits overfit it, so its last epoch is not the one to read. The holdout
    split is the linear probe's (same seed), so the two compare one to one. ``holdout_curve`` and
    ``fit_curve`` (accuracy per epoch on the holdout and on as many fit samples) tell an
    unconverged head (both low) from an overfitted one (fit high, holdout falling)."""
    device = torch.device(device) if device is not None else default_device()
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    hold_idx, fit_idx, g = holdout_split(len(train_x), cfg.holdout, seed)
    fit_probe_idx = fit_idx[: len(hold_idx)]
    dim = train_x.size(-1)
    heads_n = cfg.attentive_heads or auto_heads(dim)
    lrs = cfg.attentive_lrs

    prepare = token_whitener(train_x[fit_idx], cfg.attentive_whiten_floor, device)

    torch.manual_seed(seed)
    heads = nn.ModuleList(AttentiveClassifier(dim, num_classes, heads_n) for _ in lrs).to(device)

    def loss_of(positions: torch.Tensor) -> torch.Tensor:
        idx = fit_idx[positions]
        x, y = prepare(train_x[idx]), train_y[idx].to(device)
        return sum(F.cross_entropy(h(x), y) for h in heads)

    def accuracy(head: nn.Module, idx: torch.Tensor) -> float:
        return (_predict(head, train_x[idx], cfg.batch_size, prepare) == train_y[idx]).float().mean().item()

    hold_curve: list[list[float]] = [[] for _ in lrs]
    fit_curve: list[list[float]] = [[] for _ in lrs]
    best: dict[str, Any] = {"acc": -1.0}

    def keep_best(epoch: int) -> None:
        for i, head in enumerate(heads):
            hold_curve[i].append(accuracy(head, hold_idx))
            fit_curve[i].append(accuracy(head, fit_probe_idx))
            if hold_curve[i][-1] > best["acc"]:
                state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                best.update(acc=hold_curve[i][-1], head=i, epoch=epoch, state=state)

    train_heads_per_lr(heads, lrs, cfg.attentive_weight_decay, len(fit_idx), cfg.attentive_epochs,
                       cfg.attentive_batch_size, g, loss_of, progress, desc="attentive probes", after_epoch=keep_best)
    chosen = heads[best["head"]]
    chosen.load_state_dict(best["state"])
    chosen.eval()
    pred = _predict(chosen, val_x, cfg.batch_size, prepare)
    return {
        **classification_metrics(pred, val_y, num_classes),
        "best_lr": lrs[best["head"]],
        "best_epoch": best["epoch"] + 1,
        "holdout_top1": best["acc"],
        "lr_sweep": {str(lr): max(curve) for lr, curve in zip(lrs, hold_curve)},
        "holdout_curve": {str(lr): [round(a, 4) for a in c] for lr, c in zip(lrs, hold_curve)},
        "fit_curve": {str(lr): [round(a, 4) for a in c] for lr, c in zip(lrs, fit_curve)},
        "heads": heads_n,
        "num_train": len(train_x),
        "num_val": len(val_x),
        "num_classes": num_classes,
        "majority_class": max(torch.bincount(val_y).tolist()) / len(val_y),
    }
