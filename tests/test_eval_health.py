"""Representation-health signals: RankMe and the per-dimension std of targets."""

import math

import pytest
import torch

from tcjepa.eval.health import rankme, target_std


def test_rankme_of_a_collapsed_encoder_is_one():
    constant = torch.randn(1, 64).expand(500, 64)  # every image maps to the same feature
    assert rankme(constant) == pytest.approx(1.0, abs=1e-3)
    assert rankme(torch.zeros(100, 16)) == pytest.approx(1.0, abs=1e-3)  # the degenerate all-zero case too


def test_rankme_counts_the_directions_in_use():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(4000, 32, generator=g)
    assert 30 < rankme(full) <= 32  # isotropic: close to full rank
    three = torch.randn(4000, 3, generator=g) @ torch.randn(3, 32, generator=g)
    assert 2.0 < rankme(three) < 3.01  # rank 3, unequal singular values
    assert rankme(three * 100) == pytest.approx(rankme(three), rel=1e-6)  # scale does not matter
    assert rankme(full.view(40, 100, 32)) == pytest.approx(rankme(full))  # leading dims are rows


def test_rankme_matches_its_definition():
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([0.75, 0.25]) + 1e-7
    assert rankme(x) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)


def test_target_std_is_zero_when_collapsed_and_ignores_padding():
    assert target_std(torch.ones(4, 10, 8)) == 0.0
    x = torch.tensor([[[0.0], [2.0], [100.0]]])  # the third token is padding
    valid = torch.tensor([[True, True, False]])
    assert target_std(x, valid) == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        target_std(torch.ones(1, 8))
