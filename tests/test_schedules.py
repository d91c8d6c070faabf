import math

import pytest

from tcjepa.schedules import lr_at, momentum_at, weight_decay_at


def test_lr_warmup_then_cosine():
    kw = dict(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup=10)
    assert lr_at(0, 100, **kw) == pytest.approx(2e-4)
    assert lr_at(5, 100, **kw) == pytest.approx(6e-4)
    assert lr_at(10, 100, **kw) == pytest.approx(1e-3)
    assert lr_at(100, 100, **kw) == pytest.approx(1e-6)
    assert lr_at(55, 100, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    values = [lr_at(s, 100, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 50, lr=0.1, start_lr=0.0, final_lr=0.0, warmup=0) == pytest.approx(0.1)


def test_weight_decay_cosine_rises():
    assert weight_decay_at(0, 100, start=0.04, final=0.4) == pytest.approx(0.04)
    assert weight_decay_at(50, 100, start=0.04, final=0.4) == pytest.approx(0.22)
    assert weight_decay_at(100, 100, start=0.04, final=0.4) == pytest.approx(0.4)


def test_momentum_linear():
    assert momentum_at(0, 1000, start=0.996, final=1.0) == pytest.approx(0.996)
    assert momentum_at(500, 1000, start=0.996, final=1.0) == pytest.approx(0.998)
    assert momentum_at(2000, 1000, start=0.996, final=1.0) == pytest.approx(1.0)
    assert not math.isnan(momentum_at(0, 0, start=0.9, final=1.0))
