"""I-JEPA multi-block masks: one context block minus several target blocks, sampled for a whole
batch at once with tensor ops and a caller-owned ``torch.Generator`` (same seed, same masks).

Each sample gets ``num_targets`` rectangular target blocks (area ``scale * H * W``, aspect
``h / w``) and one context block from which the union of the targets is removed; a sample whose
context keeps fewer than ``min_context`` patches is redrawn (targets and context together).

Two policies:

``"pad"`` (default, ours) improves on the official collator (facebookresearch/ijepa,
``src/masks/multiblock.py``) in three ways:

* block sizes are drawn per sample and per block, so a batch mixes small and large, wide and
  tall targets instead of sharing one draw (which also ties scale and aspect to one random
  number in the official code);
* block corners are uniform over every valid position, so blocks can touch the last row and
  column (the official ``randint(0, H - h)`` excludes ``H - h``, and its size clamp keeps
  ``h <= H - 1``, so the last row and column are never targeted);
* nothing is truncated: every context patch is kept and rows are padded to the batch maximum,
  whereas the official collator cuts every sample to the batch's smallest context (with batch
  128 on a 14x14 grid a large share of the context is silently dropped).

The cost: rows have different lengths, so the encoder and predictor need key-padding attention
masks (``MaskBatch.padded`` lets them skip the mask when nothing is padded) and padded target
positions must be excluded from the loss (``target_valid``).

``"official"`` reproduces the official behaviour for comparison: one size draw per batch for the
targets (scale and aspect from the same uniform number, area floored, ``h <= H - 1``) and one for
the context, exclusive corner range, contexts truncated to the batch minimum (first K indices in
sorted order), everything valid. Two deliberate differences: a too-small context is fixed by
redrawing the sample's corners (the official code instead relaxes the no-overlap constraint after
20 tries, letting context and targets overlap), and the threshold is ``>= min_context`` where the
official uses ``> min_keep``. The official draws corners from the global RNG; here every draw
comes from ``generator``.

``sample_block_masks`` returns the underlying boolean masks (before truncation) for tests and
analysis. Index layout: patch indices are row-major over the ``H x W`` grid; within a row valid indices come
first in ascending order; padding holds index 0 with ``valid = False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

POLICIES = ("pad", "official")


@dataclass(frozen=True)
class MaskBatch:
    """Context and target patch indices for a batch (see the module docstring for the layout)."""

    context_idx: torch.Tensor  # int64 [B, Nc]
    context_valid: torch.Tensor  # bool [B, Nc]
    target_idx: torch.Tensor  # int64 [B, T, Nt]
    target_valid: torch.Tensor  # bool [B, T, Nt]
    _padded: bool | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._padded is None:  # computed once, so reading it on GPU tensors never syncs
            padded = not (bool(self.context_valid.all()) and bool(self.target_valid.all()))
            object.__setattr__(self, "_padded", padded)

    @property
    def padded(self) -> bool:
        """True if any entry is padding (the models then need attention masks)."""
        return bool(self._padded)

    @property
    def batch_size(self) -> int:
        return self.context_idx.shape[0]

    @property
    def num_targets(self) -> int:
        return self.target_idx.shape[1]

    def num_context(self) -> torch.Tensor:
        """Valid context patches per sample, int64 [B]."""
        return self.context_valid.sum(dim=1)

    def num_target(self) -> torch.Tensor:
        """Valid patches per target block, int64 [B, T]."""
        return self.target_valid.sum(dim=-1)

    def split(self, parts: int) -> list[MaskBatch]:
        """``parts`` consecutive equal slices of the batch, each without the padding none of its
        samples needs (valid entries come first in every row); one host sync for all of them.
        Each keeps the batch's ``padded`` flag: the losses of a padded batch's slices are
        normalised by the batch's counts (tcjepa.accumulate), so they must read the valid masks
        even where a slice happens to need no padding."""
        size = self.batch_size // parts
        if self._padded:
            nc = self.context_valid.sum(1).view(parts, size).amax(1)
            nt = self.target_valid.sum(2).view(parts, -1).amax(1)
            lengths = torch.stack([nc, nt], 1).tolist()
        else:
            lengths = [[self.context_idx.size(1), self.target_idx.size(2)]] * parts
        return [MaskBatch(self.context_idx[a:a + size, :nc], self.context_valid[a:a + size, :nc],
                          self.target_idx[a:a + size, :, :nt], self.target_valid[a:a + size, :, :nt],
                          _padded=self._padded)
                for a, (nc, nt) in zip(range(0, self.batch_size, size), lengths)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(
            self.context_idx.to(device, non_blocking=non_blocking),
            self.context_valid.to(device, non_blocking=non_blocking),
            self.target_idx.to(device, non_blocking=non_blocking),
            self.target_valid.to(device, non_blocking=non_blocking),
            _padded=self._padded,
        )


# ----------------------------------------------------------------------------- sizes


def _block_hw(area: torch.Tensor, aspect: torch.Tensor, h_max: int, w_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a block of ``area`` patches and aspect ``h / w`` to integer sides clamped to [1, max]."""
    h = torch.round(torch.sqrt(area * aspect)).clamp(1, h_max).long()
    w = torch.round(torch.sqrt(area / aspect)).clamp(1, w_max).long()
    return h, w


def _uniform(shape: tuple[int, ...], lo_hi: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo)


def _sizes_pad(n: int, t: int, grid: tuple[int, int], scale, aspect, g: torch.Generator):
    H, W = grid
    area = _uniform((n, t), scale, g) * (H * W)
    return _block_hw(area, _uniform((n, t), aspect, g), H, W)


def _sizes_official(grid: tuple[int, int], scale, aspect, g: torch.Generator):
    """One draw for the whole batch; scale and aspect share one uniform number, area is floored
    and sides are kept below the grid size, as in the official ``_sample_block_size``."""
    H, W = grid
    r = torch.rand(1, generator=g, dtype=torch.float64)
    area = torch.floor((scale[0] + r * (scale[1] - scale[0])) * (H * W))
    h, w = _block_hw(area, aspect[0] + r * (aspect[1] - aspect[0]), H - 1, W - 1)
    return h, w  # shape [1]


# ----------------------------------------------------------------------------- blocks


def _corners(h: torch.Tensor, w: torch.Tensor, grid: tuple[int, int], inclusive: bool, g: torch.Generator):
    """Uniform top-left corners: top in [0, H - h] if ``inclusive`` else [0, H - h)."""
    H, W = grid
    extra = 1 if inclusive else 0
    n_top = (H - h + extra).clamp(min=1)
    n_left = (W - w + extra).clamp(min=1)
    u = torch.rand((2, *h.shape), generator=g, dtype=torch.float64)
    top = torch.minimum((u[0] * n_top).long(), n_top - 1)
    left = torch.minimum((u[1] * n_left).long(), n_left - 1)
    return top, left


def _rect_masks(top, left, h, w, grid: tuple[int, int]) -> torch.Tensor:
    """Boolean [..., H, W] masks of the rectangles ``[top, top + h) x [left, left + w)``."""
    H, W = grid
    rows = torch.arange(H)
    cols = torch.arange(W)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])
    return in_rows[..., :, None] & in_cols[..., None, :]


def _draw(n: int, grid: tuple[int, int], policy: str, sizes, g: torch.Generator):
    """Draw ``n`` samples: target masks [n, T, H, W] and context masks [n, H, W]."""
    (th, tw), (ch, cw) = sizes(n)
    inclusive = policy == "pad"
    ttop, tleft = _corners(th, tw, grid, inclusive, g)
    ctop, cleft = _corners(ch, cw, grid, inclusive, g)
    targets = _rect_masks(ttop, tleft, th, tw, grid)
    context = _rect_masks(ctop, cleft, ch, cw, grid)[:, 0] & ~targets.any(dim=1)
    return targets, context


def _to_indices(mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [M, N] -> (int64 [M, length] indices, bool [M, length] valid): each row's True
    positions in ascending order, then padding (index 0, valid False); rows longer than
    ``length`` keep their first ``length`` indices."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :length]
    valid = torch.arange(length) < mask.sum(dim=1, keepdim=True)
    return order.masked_fill(~valid, 0), valid


# ----------------------------------------------------------------------------- public API


def check_feasible(
    grid: tuple[int, int],
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_context: int = 10,
    policy: str = "pad",
) -> None:
    """Raise ``ValueError`` if these settings can never produce masks on ``grid``.

    Checks necessary conditions only (bounds that hold for every draw), so it never rejects
    settings that can work; settings that work only rarely surface as ``RuntimeError`` from
    ``sample_masks``."""
    H, W = int(grid[0]), int(grid[1])
    if H < 1 or W < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if num_targets < 1:
        raise ValueError(f"num_targets must be >= 1, got {num_targets}")
    if min_context < 1:
        raise ValueError(f"min_context must be >= 1, got {min_context}")
    for name, (lo, hi) in (("target_scale", target_scale), ("context_scale", context_scale)):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    for name, (lo, hi) in (("target_aspect", target_aspect), ("context_aspect", context_aspect)):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} must satisfy 0 < min <= max, got {[lo, hi]}")
    official = policy == "official"
    if official and (H < 2 or W < 2):
        raise ValueError(f"policy 'official' keeps blocks strictly smaller than the grid; grid {grid} is too small")
    h_max, w_max = (H - 1, W - 1) if official else (H, W)

    def side(area: float, aspect: float, limit: int) -> int:
        return min(limit, max(1, round(math.sqrt(area * aspect))))

    def area(scale: float) -> float:
        return math.floor(scale * H * W) if official else scale * H * W

    # Largest context block: each side at its own maximum (an upper bound on the product).
    a = area(context_scale[1])
    ctx_max = side(a, context_aspect[1], h_max) * side(a, 1 / context_aspect[0], w_max)
    if ctx_max < min_context:
        raise ValueError(
            f"min_context={min_context} but the context block holds at most {ctx_max} patches on a "
            f"{H}x{W} grid (context_scale max {context_scale[1]}); lower min_context or raise context_scale"
        )
    # Smallest target block: each side at its own minimum; at least one lies on the grid.
    a = area(target_scale[0])
    tgt_min = side(a, target_aspect[0], h_max) * side(a, 1 / target_aspect[1], w_max)
    if H * W - tgt_min < min_context:
        raise ValueError(
            f"min_context={min_context} but a target block covers at least {tgt_min} of the {H * W} "
            f"patches, leaving at most {H * W - tgt_min}; lower min_context or target_scale"
        )


def sample_block_masks(
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_context: int = 10,
    policy: str = "pad",
    max_rounds: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The boolean masks behind ``sample_masks`` (same arguments, same draws): targets
    [B, T, H, W] and context [B, H, W] (block minus targets), before any truncation.

    Samples whose context has fewer than ``min_context`` patches are redrawn together (targets
    and context; under "official" only the corners, sizes being shared by the batch), up to
    ``max_rounds`` rounds; then ``RuntimeError``."""
    check_feasible(
        grid, num_targets=num_targets, target_scale=target_scale, target_aspect=target_aspect,
        context_scale=context_scale, context_aspect=context_aspect, min_context=min_context, policy=policy,
    )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grid = (int(grid[0]), int(grid[1]))
    H, W = grid
    T = num_targets

    if policy == "official":
        th, tw = _sizes_official(grid, target_scale, target_aspect, generator)
        ch, cw = _sizes_official(grid, context_scale, context_aspect, generator)

        def sizes(n: int):
            return (th.expand(n, T), tw.expand(n, T)), (ch.expand(n, 1), cw.expand(n, 1))
    else:

        def sizes(n: int):
            return (
                _sizes_pad(n, T, grid, target_scale, target_aspect, generator),
                _sizes_pad(n, 1, grid, context_scale, context_aspect, generator),
            )

    targets, context = _draw(batch_size, grid, policy, sizes, generator)
    for _ in range(max_rounds):
        bad = (context.sum(dim=(1, 2)) < min_context).nonzero().squeeze(1)
        if bad.numel() == 0:
            return targets, context
        targets[bad], context[bad] = _draw(bad.numel(), grid, policy, sizes, generator)
    bad = (context.sum(dim=(1, 2)) < min_context).nonzero().squeeze(1)
    if bad.numel():
        raise RuntimeError(
            f"{bad.numel()} of {batch_size} samples still had fewer than min_context={min_context} "
            f"context patches after {max_rounds} redraws on a {H}x{W} grid; lower min_context, "
            f"num_targets={T} or target_scale={tuple(target_scale)}, or raise context_scale={tuple(context_scale)}"
        )
    return targets, context


def sample_masks(
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_context: int = 10,
    policy: str = "pad",
    max_rounds: int = 100,
) -> MaskBatch:
    """Sample I-JEPA multi-block masks for ``batch_size`` images on an ``H x W`` patch grid.

    All randomness comes from ``generator`` (CPU); same generator state, same masks. "pad" keeps
    every context patch and pads rows to the batch maximum; "official" truncates every context
    to the batch minimum. Returns CPU tensors (``MaskBatch.to`` moves them)."""
    targets, context = sample_block_masks(
        batch_size, grid, generator, num_targets=num_targets, target_scale=target_scale,
        target_aspect=target_aspect, context_scale=context_scale, context_aspect=context_aspect,
        min_context=min_context, policy=policy, max_rounds=max_rounds,
    )
    B, T, H, W = targets.shape
    ctx_flat = context.reshape(B, H * W)
    tgt_flat = targets.reshape(B * T, H * W)
    ctx_count = ctx_flat.sum(dim=1)
    # official `[:min_keep]`: every context cut to the batch minimum; ours: pad to the maximum
    ctx_len = int(ctx_count.min() if policy == "official" else ctx_count.max())
    context_idx, context_valid = _to_indices(ctx_flat, ctx_len)
    target_idx, target_valid = _to_indices(tgt_flat, int(tgt_flat.sum(dim=1).max()))
    return MaskBatch(
        context_idx=context_idx,
        context_valid=context_valid,
        target_idx=target_idx.reshape(B, T, -1),
        target_valid=target_valid.reshape(B, T, -1),
    )
