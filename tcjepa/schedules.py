"""Step-indexed schedules as pure functions (I-JEPA's: warmup + cosine lr, cosine weight
decay, linear EMA momentum). Pure so that a resumed run recomputes them exactly."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, *, lr: float, start_lr: float, final_lr: float, warmup: int) -> float:
    """Linear warmup ``start_lr -> lr`` over ``warmup`` steps, then cosine ``lr -> final_lr`` at ``total``."""
    if step < warmup:
        return start_lr + (lr - start_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(step: int, total: int, *, start: float, final: float) -> float:
    """Cosine from ``start`` to ``final`` (I-JEPA raises weight decay 0.04 -> 0.4 over training)."""
    progress = min(1.0, step / max(1, total))
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, total: int, *, start: float, final: float) -> float:
    """Linear EMA momentum from ``start`` to ``final``."""
    return start + (final - start) * min(1.0, step / max(1, total))
