import pytest
import torch
import torch.nn.functional as F

from tcjepa.config import ProbeConfig
from tcjepa.eval.probe import extract_features, fit_logistic, select_labels, train_linear_probes
from tcjepa.models.vit import build_encoder


def blobs(n: int, seed: int, noise: float):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, 16, generator=g), y


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_probe_separates_separable_features(solver):
    tx, ty = blobs(300, 1, 0.5)
    vx, vy = blobs(100, 2, 0.5)
    m = train_linear_probes(tx, ty, vx, vy, ProbeConfig(solver=solver, epochs=20, lrs=(1e-3, 1e-2), l2_grid=(1e-3, 1e-1)))
    assert m["top1"] > 0.95
    chosen, grid = ("best_l2", (1e-3, 1e-1)) if solver == "lbfgs" else ("best_lr", (1e-3, 1e-2))
    assert m[chosen] in grid and set(m["per_class"]) == {"0", "1", "2"}
    assert m["num_train"] == 300 and m["num_classes"] == 3


def test_fit_logistic_reaches_the_optimum():
    """The penalised loss's gradient is ~0 at the answer: the probe is solved, not stopped early."""
    x, y = blobs(200, 3, 2.0)
    x = x.double()
    head = fit_logistic(x, y, 3, l2=1e-2)
    w, b = head.weight.clone().requires_grad_(), head.bias.clone().requires_grad_()
    loss = F.cross_entropy(x @ w.T + b, y) + 1e-2 * w.square().sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert torch.cat([gw.flatten(), gb]).abs().max() < 1e-5


def test_lbfgs_probe_finds_a_small_variance_direction():
    """Classes told apart only by the difference of two nearly equal channels (variance 1e-6 of
    the shared one's): the whitened, solved probe finds it; the SGD heads on standardised
    features, as before, do not."""
    g = torch.Generator().manual_seed(0)
    n = 600
    y = torch.randint(0, 2, (n,), generator=g)
    shared = 10 * torch.randn(n, generator=g)
    x = torch.stack([shared, shared + 1e-2 * (2 * y - 1) + 1e-3 * torch.randn(n, generator=g),
                     torch.randn(n, generator=g)], 1)
    lbfgs = train_linear_probes(x[:400], y[:400], x[400:], y[400:], ProbeConfig())
    sgd = train_linear_probes(x[:400], y[:400], x[400:], y[400:], ProbeConfig(solver="sgd", epochs=20))
    assert lbfgs["top1"] > 0.95 and sgd["top1"] < 0.75


def test_probe_is_at_chance_on_random_labels():
    tx, _ = blobs(300, 1, 0.5)
    vx, _ = blobs(300, 2, 0.5)
    g = torch.Generator().manual_seed(5)
    ty, vy = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    m = train_linear_probes(tx, ty, vx, vy, ProbeConfig(epochs=20))
    assert m["top1"] < 0.5


def test_extract_features_and_label_selection(tmp_path):
    from tests.conftest import labelled_members, png_bytes, write_tar

    members = labelled_members(0, 5) + [("nolabel.png", png_bytes((9, 9, 9))), ("nolabel.txt", b"x")]
    write_tar(tmp_path / "000000.tar", members)
    enc = build_encoder("vit_micro_8", 32)
    x, metas, skipped = extract_features(enc, str(tmp_path), 32, batch_size=4)
    assert x.shape == (6, 96) and skipped == {}
    idx, y = select_labels(metas, "label")
    assert y.tolist() == [0, 1, 2, 0, 1] and len(idx) == 5  # the unlabelled sample is left out
    metas[0]["labels"] = {"color": 4}
    idx, y = select_labels(metas, "labels.color")
    assert idx.tolist() == [0] and y.tolist() == [4]
