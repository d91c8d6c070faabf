import math

import pytest
import torch

from tcjepa.models.vit import gather_tokens

from tcjepa.masks import MaskBatch, check_feasible, sample_block_masks, sample_masks

GRID = (14, 14)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rect_of(idx: torch.Tensor, W: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the rectangle formed by ``idx``; fails if it is not an exact rectangle."""
    r, c = idx // W, idx % W
    top, left = int(r.min()), int(c.min())
    h, w = int(r.max()) - top + 1, int(c.max()) - left + 1
    assert idx.numel() == h * w == torch.unique(idx).numel(), "target block is not an exact rectangle"
    return top, left, h, w


def size_possible(h: int, w: int, area: tuple[float, float], aspect: tuple[float, float]) -> bool:
    """Whether some (area, aspect) in the ranges rounds to sides (h, w) (no clamping involved)."""
    a_lo, a_hi = max(area[0], (h - 0.5) * (w - 0.5)), min(area[1], (h + 0.5) * (w + 0.5))
    r_lo, r_hi = max(aspect[0], (h - 0.5) / (w + 0.5)), min(aspect[1], (h + 0.5) / max(w - 0.5, 1e-9))
    return a_lo <= a_hi + 1e-9 and r_lo <= r_hi + 1e-9


@pytest.mark.parametrize("policy", ["pad", "official"])
def test_shapes_ranges_overlap_min_context(policy):
    B, T, (H, W) = 64, 4, GRID
    m = sample_masks(B, GRID, gen(), policy=policy)
    assert m.context_idx.dtype == torch.int64 and m.target_idx.dtype == torch.int64
    assert m.context_valid.dtype == torch.bool and m.target_valid.dtype == torch.bool
    assert m.context_idx.shape == m.context_valid.shape and m.context_idx.shape[0] == B
    assert m.target_idx.shape == m.target_valid.shape and m.target_idx.shape[:2] == (B, T)
    assert m.num_context().shape == (B,) and m.num_target().shape == (B, T)
    for b in range(B):
        ctx = m.context_idx[b][m.context_valid[b]]
        assert ctx.numel() >= 10
        assert ((ctx >= 0) & (ctx < H * W)).all()
        assert (ctx[1:] > ctx[:-1]).all()  # sorted, unique
        assert (m.context_idx[b][~m.context_valid[b]] == 0).all()
        assert not m.context_valid[b][ctx.numel():].any()  # valid entries first
        for t in range(T):
            valid = m.target_valid[b, t]
            tgt = m.target_idx[b, t][valid]
            assert ((tgt >= 0) & (tgt < H * W)).all()
            assert (tgt[1:] > tgt[:-1]).all()
            assert not valid[tgt.numel():].any() and (m.target_idx[b, t][~valid] == 0).all()
            assert not torch.isin(ctx, tgt).any(), "context overlaps a target"
    if policy == "official":
        assert m.context_valid.all() and m.target_valid.all() and not m.padded


def test_target_blocks_are_rectangles_of_drawn_size():
    H, W = GRID
    area = (0.15 * H * W, 0.2 * H * W)
    m = sample_masks(256, GRID, gen(1))
    for b in range(256):
        for t in range(4):
            _, _, h, w = rect_of(m.target_idx[b, t][m.target_valid[b, t]], W)
            assert size_possible(h, w, area, (0.75, 1.5)), (h, w)

    mo = sample_masks(256, GRID, gen(1), policy="official")
    sizes = {rect_of(mo.target_idx[b, t], W)[2:] for b in range(256) for t in range(4)}
    assert len(sizes) == 1  # one draw for the batch
    (h, w), = sizes
    assert h <= H - 1 and w <= W - 1
    assert size_possible(h, w, (math.floor(area[0]) - 1, area[1]), (0.75, 1.5))


def test_blocks_match_boolean_masks_and_pad_keeps_all_context():
    B, (H, W) = 128, GRID
    targets, context = sample_block_masks(B, GRID, gen(3))
    m = sample_masks(B, GRID, gen(3))
    assert m.padded and m.context_idx.shape[1] == int(context.sum((1, 2)).max())
    for b in range(B):
        assert torch.equal(m.context_idx[b][m.context_valid[b]], context[b].flatten().nonzero().squeeze(1))
        for t in range(4):
            assert torch.equal(m.target_idx[b, t][m.target_valid[b, t]], targets[b, t].flatten().nonzero().squeeze(1))
        # context = its bounding rectangle minus the union of the targets: nothing inside it dropped
        ctx = context[b]
        rows, cols = ctx.any(1).nonzero().squeeze(1), ctx.any(0).nonzero().squeeze(1)
        box = torch.zeros(H, W, dtype=torch.bool)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(ctx, box & ~targets[b].any(0))


def test_official_truncates_to_batch_min():
    B = 128
    targets, context = sample_block_masks(B, GRID, gen(4), policy="official")
    m = sample_masks(B, GRID, gen(4), policy="official")
    counts = context.flatten(1).sum(1)
    K = int(counts.min())
    assert m.context_idx.shape == (B, K) and m.context_valid.all()
    for b in range(B):
        assert torch.equal(m.context_idx[b], context[b].flatten().nonzero().squeeze(1)[:K])
    assert len(set(m.num_target().flatten().tolist())) == 1
    assert counts.max() > K  # the official collator drops context


def test_determinism():
    for policy in ("pad", "official"):
        a = sample_masks(32, GRID, gen(7), policy=policy)
        b = sample_masks(32, GRID, gen(7), policy=policy)
        c = sample_masks(32, GRID, gen(8), policy=policy)
        for f in ("context_idx", "context_valid", "target_idx", "target_valid"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        assert not (a.context_idx.shape == c.context_idx.shape and torch.equal(a.context_idx, c.context_idx))


def _touches(m: MaskBatch, H: int, W: int) -> tuple[bool, bool]:
    idx = m.target_idx[m.target_valid]
    return bool((idx // W == H - 1).any()), bool((idx % W == W - 1).any())


def test_edge_reachability():
    H, W = GRID
    assert _touches(sample_masks(2000, GRID, gen(5)), H, W) == (True, True)
    g = gen(5)
    for _ in range(20):  # 20 batches x 100 = 2000 samples, 20 different official size draws
        mo = sample_masks(100, GRID, g, policy="official")
        assert _touches(mo, H, W) == (False, False)
        ctx = mo.context_idx[mo.context_valid]
        assert not (ctx // W == H - 1).any() and not (ctx % W == W - 1).any()


def test_size_variety():
    W = GRID[1]
    m = sample_masks(64, GRID, gen(6))
    sizes = {rect_of(m.target_idx[b, t][m.target_valid[b, t]], W)[2:] for b in range(64) for t in range(4)}
    assert len(sizes) > 3
    assert len(set(m.num_context().tolist())) > 3


def test_context_fraction_pad_beats_official():
    H, W = GRID
    g_pad, g_off = gen(9), gen(9)
    pad = torch.stack([sample_masks(128, GRID, g_pad).num_context() for _ in range(8)]).float()
    off = torch.stack([sample_masks(128, GRID, g_off, policy="official").num_context() for _ in range(8)]).float()
    f_pad, f_off = pad.mean().item() / (H * W), off.mean().item() / (H * W)
    # fraction of the available (untruncated) context the official collator keeps
    targets, context = sample_block_masks(128, GRID, gen(10), policy="official")
    counts = context.flatten(1).sum(1).float()
    kept = (counts.min() / counts).mean().item()
    print(f"\ncontext / grid: pad {f_pad:.3f}, official {f_off:.3f}; official keeps {kept:.3f} of its context")
    assert f_pad > f_off and kept < 1.0


def test_min_context_enforced_by_redraw():
    # many large targets on a small grid: some samples need redraws, none may end below min_context
    m = sample_masks(256, (8, 8), gen(11), num_targets=4, target_scale=(0.2, 0.3), min_context=16)
    assert (m.num_context() >= 16).all()
    with pytest.raises(RuntimeError, match="min_context"):
        sample_masks(64, (4, 4), gen(0), num_targets=2, target_scale=(0.25, 0.25),
                     context_scale=(1.0, 1.0), min_context=11, max_rounds=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_scale=(0.15, 1.5)), r"target_scale must satisfy 0 < min <= max <= 1, got \[0.15, 1.5\]"),
    (dict(target_scale=(0.0, 0.2)), r"target_scale must satisfy 0 < min <= max <= 1, got \[0.0, 0.2\]"),
    (dict(context_scale=(0.9, 0.8)), r"context_scale must satisfy 0 < min <= max <= 1"),
    (dict(target_aspect=(0.0, 1.0)), r"target_aspect must satisfy 0 < min <= max, got \[0.0, 1.0\]"),
    (dict(num_targets=0), r"num_targets must be >= 1, got 0"),
    (dict(min_context=197), r"min_context=197 but the context block holds at most 196 patches"),
    # a target covering the whole grid leaves no context
    (dict(target_scale=(1.0, 1.0), target_aspect=(1.0, 1.0)), r"a target block covers at least 196 of the 196"),
    (dict(policy="nope"), r"policy must be one of .*got 'nope'"),
])
def test_check_feasible_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_feasible(GRID, **kwargs)


def test_check_feasible_small_grids():
    with pytest.raises(ValueError, match="min_context"):
        check_feasible((2, 2), min_context=10)
    with pytest.raises(ValueError):
        check_feasible((1, 8), policy="official")
    for grid in ((14, 14), (8, 8)):
        for policy in ("pad", "official"):
            check_feasible(grid, policy=policy)
            assert (sample_masks(64, grid, gen(), policy=policy).num_context() >= 10).all()


def test_gather_tokens_picks_the_indexed_tokens():
    B, N, D, K = 3, 20, 5, 7
    x = torch.randn(B, N, D)
    idx = torch.randint(0, N, (B, K), generator=gen())
    ref = torch.stack([torch.stack([x[b, idx[b, k]] for k in range(K)]) for b in range(B)])
    assert torch.equal(gather_tokens(x, idx), ref)


@pytest.mark.parametrize("padded", [True, False])
def test_mask_batch_to_keeps_every_field_and_the_padded_flag(padded):
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = not padded
    m = MaskBatch(torch.arange(12).view(2, 6), valid, torch.arange(8).view(2, 2, 2), torch.ones(2, 2, 2, dtype=torch.bool))
    assert m.padded == padded
    moved = m.to("meta")  # no values there: the flag must come along, it cannot be recomputed
    for name in ("context_idx", "context_valid", "target_idx", "target_valid"):
        a, b = getattr(m, name), getattr(moved, name)
        assert b.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype, name
    assert moved.padded == padded
    back = m.to("cpu")
    assert back.padded == padded and all(torch.equal(getattr(m, n), getattr(back, n))
                                         for n in ("context_idx", "context_valid", "target_idx", "target_valid"))
