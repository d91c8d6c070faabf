"""benchmarks/layout_probe.py: the shuffled-patch and position-free read-outs it probes with
(RESULTS.md, "Small budgets")."""

from __future__ import annotations

import torch

from tcjepa.models.vit import build_encoder
from tests.conftest import load_benchmark


def test_shuffle_patches_permutes_each_images_tiles_its_own_way():
    script = load_benchmark("layout_probe")
    images = torch.arange(4 * 16, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(2, 3, 1, 1)  # 2 equal images
    out = script.shuffle_patches(images, 2, torch.Generator().manual_seed(0))
    tiles = lambda x: x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, -1)  # noqa: E731
    before, after = tiles(images), tiles(out)
    for b in range(2):  # the same tiles, whole, each image in another order
        assert sorted(map(tuple, after[b].tolist())) == sorted(map(tuple, before[b].tolist()))
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[0], after[1])


def test_without_position_makes_the_mean_pooled_features_blind_to_the_layout():
    """Without its position embedding a ViT is permutation-equivariant, so its mean-pooled features
    are the same for shuffled patches; with it they are not. The original keeps its embedding."""
    script = load_benchmark("layout_probe")
    torch.manual_seed(0)
    encoder = build_encoder("vit_micro_8", 32, depth=2).eval()
    images = torch.randn(3, 3, 32, 32)
    blind = script.without_position(encoder)
    with torch.no_grad():
        shuffled = script.ShuffledPatches(blind, seed=1)(images).mean(1)
        torch.testing.assert_close(shuffled, blind(images).mean(1), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(script.ShuffledPatches(encoder, seed=1)(images).mean(1), encoder(images).mean(1),
                                  atol=1e-3)
    assert encoder.pos_embed.abs().sum() > 0
