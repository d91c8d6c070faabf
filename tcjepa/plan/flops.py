"""Compute: analytic matmul FLOPs per image for each part's forward, and a training step's total
(:func:`model_flops`, :func:`mean_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tcjepa.plan.model import ModelInventory, Tower
from tcjepa.plan.tokens import MaskCounts, TokenStats


def tower_flops(lengths: list[int] | tuple[int, ...], t: Tower) -> float:
    """Forward matmul FLOPs of a tower over sequences of these lengths: 2 x (qkv, proj, fc1, fc2)
    per token plus QK^T and AV over each sequence (2 x 2 x n^2 x width)."""
    per_token = 2 * (4 * t.width * t.width + 2 * t.width * t.hidden)
    return t.depth * sum(n * per_token + 4 * n * n * t.width for n in lengths)


@dataclass(frozen=True)
class Flops:
    """Model FLOPs per image: forward of each part, and a training step's total (x3 for the
    trained parts' forward and backward, x1 for the teacher and frozen towers)."""

    encoder: float
    predictor: float
    text: float  # the text encoder (frozen or trained)
    conditioner: float  # the text projection and the cross-attention layers (always trained)
    teacher: float
    text_trained: bool

    @property
    def train(self) -> float:
        text = self.text * (3 if self.text_trained else 1)
        return 3 * (self.encoder + self.predictor + self.conditioner) + text + self.teacher


def model_flops(inv: ModelInventory, tok: TokenStats) -> Flops:
    """Analytic matmul FLOPs per image (real tokens only: padding is overhead, not model work)."""
    e, p, B = inv.encoder, inv.predictor, tok.batch
    embed = 2 * tok.full * 3 * inv.patch**2 * e.width  # patch embedding runs on the whole image
    enc = embed + tower_flops(tok.context, e) / B
    seqs = [nc + nt for nc, row in zip(tok.context, tok.target) for nt in row]
    pred = (2 * tok.context_real * e.width * p.width + tower_flops(seqs, p)
            + 2 * tok.target_real * p.width * inv.out_dim) / B
    teacher = embed * inv.teacher.width / e.width + tower_flops([tok.full], inv.teacher)
    text = cond = 0.0
    if inv.text is not None:
        tt, L, W, N = inv.text.tower, inv.text.length, p.width, inv.captions
        text = N * tower_flops([L], tt)
        q = sum(seqs) / B  # predictor tokens per image: the conditioners' queries
        if inv.variant == "paper":  # q and the MLP once; k, v, scores, AV and cosines per caption (overlap
            # logits: the cosines are the scores); the logged attention entropy re-scores the first caption
            hidden, relu = inv.cond_hidden or 4 * W, inv.cond_logits == "overlap"
            per_layer = (2 * q * W * W + 2 * q * 2 * W * hidden * inv.cond_mlp + 2 * q * L * W * (not relu)
                         + N * (2 * L * W * 2 * W + (2 if relu else 3) * 2 * q * L * W))
            if not inv.cond_regularise_encoder:  # the regularisers' own queries (overlap logits: the cosines
                per_layer += 2 * q * W * W  # of both are one product, rectified_cosines)
        else:
            per_layer = 2 * q * W * W * 2 + 2 * L * W * 2 * W + 4 * q * L * W
        cond = N * 2 * L * tt.width * W + inv.cond_layers * per_layer
    trained = inv.text.trained if inv.text else False
    return Flops(enc, pred, text, cond, teacher, trained)


def mean_flops(inv: ModelInventory, draws: list[MaskCounts], micro: int) -> Flops:
    """:func:`model_flops` averaged over every micro-batch of the draws: per-image FLOPs should not
    depend on which few images the recipe's micro-batch happens to hold."""
    parts = [model_flops(inv, d.batch(micro, i)) for d in draws for i in range(0, len(d.context) - micro + 1, micro)]
    keys = ("encoder", "predictor", "text", "conditioner", "teacher")
    return Flops(*(sum(getattr(f, k) for f in parts) / len(parts) for k in keys), text_trained=parts[0].text_trained)
