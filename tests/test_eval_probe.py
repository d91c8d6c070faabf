"""Probes: the attentive probe on its own, then linear + attentive probes end to end on a tiny run
(near-perfect on a trivially separable label, chance on shuffled labels), with the confusion PNG."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tcjepa.config import ConfigError, ProbeConfig
from tcjepa.eval.attentive import AttentivePooler, auto_heads, train_attentive_probes
from tcjepa.eval.common import classification_metrics, holdout_split, pca_whitening
from tcjepa.eval.probe import run_probe
from tests.eval_runs import train_tiny, write_colour_shards

FAST = ProbeConfig(epochs=30, attentive_epochs=15, batch_size=64, kind="both")


def patch_data(n: int, seed: int, classes: int = 4):
    """16 noise patches per sample; the class shows in one patch at a random position."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 16, 32, generator=g)
    centers = torch.randn(classes, 32, generator=torch.Generator().manual_seed(0)) * 3
    x[torch.arange(n), torch.randint(0, 16, (n,), generator=g)] += centers[y]
    return x, y


def test_attentive_pooler_shapes_and_heads():
    pool = AttentivePooler(48, num_heads=3)
    assert pool(torch.randn(5, 7, 48)).shape == (5, 48)
    assert auto_heads(192) == 3 and auto_heads(96) == 1 and auto_heads(1280) == 20
    with pytest.raises(ValueError, match="must divide"):
        AttentivePooler(50, num_heads=3)


def test_attentive_probe_finds_the_informative_patch_and_not_shuffled_labels():
    tx, ty = patch_data(400, 1)
    vx, vy = patch_data(200, 2)
    m = train_attentive_probes(tx, ty, vx, vy, FAST, device="cpu")
    assert m["top1"] > 0.9 and set(m["lr_sweep"]) == {str(lr) for lr in FAST.attentive_lrs}
    assert len(m["confusion"]) == 4 and sum(map(sum, m["confusion"])) == 200
    g = torch.Generator().manual_seed(3)
    shuffled = train_attentive_probes(tx, torch.randint(0, 4, (400,), generator=g), vx,
                                      torch.randint(0, 4, (200,), generator=g), FAST, device="cpu")
    assert shuffled["top1"] < 0.4  # chance is 0.25


def test_attentive_probe_reads_the_epoch_that_scored_best_on_the_holdout():
    """Noisy labels on a small split overfit the head: its last epoch is worse than an earlier
    one, and the probe must report the earlier one (here val is the holdout itself, so the
    reported top-1 is exactly the best point of the holdout curve)."""
    tx, ty = patch_data(200, 1)
    g = torch.Generator().manual_seed(5)
    ty = torch.where(torch.rand(200, generator=g) < 0.4, torch.randint(0, 4, (200,), generator=g), ty)
    cfg = ProbeConfig(attentive_epochs=30, attentive_batch_size=32, holdout=0.25, attentive_lrs=(3e-3,))
    hold, _, _ = holdout_split(200, cfg.holdout, 0)
    m = train_attentive_probes(tx, ty, tx[hold], ty[hold], cfg, device="cpu")
    hold_curve, fit_curve = m["holdout_curve"]["0.003"], m["fit_curve"]["0.003"]
    assert len(hold_curve) == len(fit_curve) == 30
    assert hold_curve[-1] < max(hold_curve) and fit_curve[-1] > 0.9  # it overfits by the end
    assert m["best_epoch"] == hold_curve.index(max(hold_curve)) + 1 < 30
    assert m["top1"] == pytest.approx(max(hold_curve), abs=1e-4) == pytest.approx(m["holdout_top1"], abs=1e-4)


def test_attentive_probe_whitens_the_tokens_so_quiet_directions_are_learned():
    """Four loud channels (x300) drown the class signal after the head's LayerNorm: on the raw
    tokens 15 epochs stay at chance; PCA-whitened with the fit split's statistics they suffice."""
    def loud(n: int, seed: int):
        x, y = patch_data(n, seed)
        x[..., :4] *= 300
        return x, y

    tx, ty = loud(400, 1)
    vx, vy = loud(200, 2)
    raw = train_attentive_probes(tx, ty, vx, vy, ProbeConfig(attentive_epochs=15, attentive_whiten_floor=0), device="cpu")
    white = train_attentive_probes(tx, ty, vx, vy, ProbeConfig(attentive_epochs=15), device="cpu")
    assert raw["top1"] < 0.5 < 0.9 < white["top1"]


def test_pca_whitening_gives_identity_covariance_in_chunks():
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0)) @ torch.randn(8, 8) * 5 + 3
    mean, proj = pca_whitening(x, 1e-6, chunk=300)
    whole = pca_whitening(x, 1e-6, chunk=10_000)
    assert torch.allclose(mean, whole[0]) and torch.allclose(proj.abs(), whole[1].abs(), atol=1e-10)
    assert torch.allclose(torch.cov(((x.double() - mean) @ proj).T), torch.eye(8, dtype=torch.float64), atol=1e-9)
    g = torch.Generator().manual_seed(1)
    quiet = torch.randn(1000, 2, generator=g) * torch.tensor([1.0, 1e-5])  # variances 1 and 1e-10
    _, proj = pca_whitening(quiet, 1e-4)
    var = torch.cov(((quiet.double() - quiet.double().mean(0)) @ proj).T).diagonal().sort().values
    assert var[0] < 1e-3 and abs(var[1] - 1) < 1e-6  # the quiet direction floored, not blown up to unit variance


def test_classification_metrics_confusion():
    m = classification_metrics(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert m["top1"] == 0.75 and m["per_class"] == {"0": 1.0, "1": 1.0, "2": 0.5}
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    data = {
        "train": write_colour_shards(root / "train", 90),
        "val": write_colour_shards(root / "val", 45, start=1000),
        "train_shuffled": write_colour_shards(root / "train_shuffled", 90, shuffle_labels_seed=1),
        "val_shuffled": write_colour_shards(root / "val_shuffled", 45, start=1000, shuffle_labels_seed=2),
    }
    data["run"] = train_tiny(data["train"], root / "run")
    return data


@pytest.mark.slow
def test_probe_both_kinds_near_perfect_on_a_separable_label(probe_data, tmp_path):
    run = probe_data["run"]
    out = tmp_path / "probe.json"
    result = run_probe(run, str(probe_data["train"]), str(probe_data["val"]), FAST, json_out=out, progress=False)
    saved = json.loads((run / "eval" / "probe.json").read_text())
    assert saved == json.loads(out.read_text()) and saved["task"] == "probe" and saved["checkpoint"] == str(run)
    m = saved["metrics"]
    assert m["top1"] == m["linear_top1"] and m["kind"] == "linear"  # the headline is the linear probe's
    assert m["linear_top1"] > 0.95 and m["attentive_top1"] > 0.9
    label = m["per_label"]["label"]
    assert label["class_names"] == ["red", "green", "blue"] and set(label["per_class"]) == {"0", "1", "2"}
    assert label["linear"]["best_l2"] in FAST.l2_grid and label["attentive"]["best_lr"] in FAST.attentive_lrs
    pngs = sorted(Path(p).name for p in result["plots"])
    assert pngs == ["probe_confusion_label_attentive.png", "probe_confusion_label_linear.png"]
    with Image.open(run / "eval" / pngs[0]) as im:
        assert im.width > 100 and im.height > 100


@pytest.mark.slow
def test_probe_is_at_chance_on_shuffled_labels(probe_data, tmp_path):
    result = run_probe(probe_data["run"], str(probe_data["train_shuffled"]), str(probe_data["val_shuffled"]), FAST,
                       json_out=tmp_path / "p.json", progress=False, save_to_run=False)
    m = result["metrics"]
    assert m["linear_top1"] < 0.6 and m["attentive_top1"] < 0.6  # chance is 1/3 on 45 samples


@pytest.mark.slow
def test_probe_cli_rejects_a_bad_kind_and_other_sections(probe_data, capsys):
    from tcjepa.cli import main

    argv = ["eval", "probe", "--checkpoint", str(probe_data["run"]), "--data", str(probe_data["train"]),
            "--val-data", str(probe_data["val"])]
    assert main(argv + ["--set", "probe.kind=mlp"]) == 2
    assert "probe.kind must be one of linear, attentive, both" in capsys.readouterr().err
    assert main(argv + ["--set", "probe.l2_grid=[]"]) == 2  # eval overrides skip load-time validation
    assert "probe.l2_grid must be a non-empty list" in capsys.readouterr().err
    assert main(argv + ["--set", "probe.solver=adam"]) == 2
    assert "probe.solver must be one of lbfgs, sgd" in capsys.readouterr().err
    assert main(argv + ["--set", "probe.kind=both", "probe.attentive_batch_size=0"]) == 2
    assert "probe.attentive_epochs and probe.attentive_batch_size must be >= 1" in capsys.readouterr().err
    assert main(argv + ["--set", "probe.encoder=random"]) == 2
    assert "probe.encoder must be auto, teacher, student or init" in capsys.readouterr().err
    assert main(argv + ["--set", "vqa.epochs=1"]) == 2
    assert "only probe.* keys" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown key probe.knd"):
        from tcjepa.eval.tasks import task_config

        task_config("probe", probe_data["run"], ["probe.knd=linear"])


@pytest.mark.slow
def test_probe_labels_follow_the_data(probe_data, tmp_path, capsys, monkeypatch):
    """The run's recipe probes [label, labels.color, labels.count]; shards holding only `label`
    are probed on `label`, the others named; a label given with --set and missing is an error;
    shards with none of the labels are refused before any image is encoded, naming their keys."""
    from tcjepa.cli import main
    from tests.conftest import png_bytes, write_tar

    argv = ["eval", "probe", "--checkpoint", str(probe_data["run"]), "--data", str(probe_data["train"]),
            "--val-data", str(probe_data["val"]), "--json", str(tmp_path / "p.json"), "--set", "probe.epochs=5"]
    with pytest.warns(UserWarning, match=r"probe.labels: labels.color, labels.count not in the data \(--data, "
                                         r"--val-data\); evaluating label"):
        assert main(argv) == 0
    assert set(json.loads((tmp_path / "p.json").read_text())["metrics"]["per_label"]) == {"label"}

    import tcjepa.checkpoint
    import tcjepa.eval.probe

    def no_work(*a, **k):
        raise AssertionError("an image was encoded before the labels were checked")

    monkeypatch.setattr(tcjepa.checkpoint, "load_encoder", no_work)
    monkeypatch.setattr(tcjepa.eval.probe, "extract", no_work)
    assert main(argv + ["probe.labels=[labels.color]"]) == 2
    err = capsys.readouterr().err
    assert "no sample has an integer 'labels.color' in its json (probe.labels, given with --set); its json keys " \
           "are: label, label_name" in err, err
    other = tmp_path / "other"
    other.mkdir()
    write_tar(other / "000000.tar", [("000000.png", png_bytes((1, 2, 3))), ("000000.json", b'{"species": "cat"}')])
    assert main(argv[:5] + [str(other)] + argv[6:]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --data: none of probe.labels ['label', 'labels.color', 'labels.count'] is an integer in "
                   "its json; its json keys are: species. Name a label with --set probe.labels=[KEY]"), err


@pytest.mark.slow
def test_probe_reads_the_last_blocks_concatenated(probe_data, monkeypatch):
    """probe.last_blocks = 2 probes the last two blocks' features side by side (twice the width); more
    layers than the encoder has is an error naming the key. (The run's encoder has one block, so a
    two-block encoder of the same kind is probed with the run's settings.)"""
    import dataclasses

    import tcjepa.eval.probe as probe
    from tcjepa.models.vit import build_encoder

    widths, extract = [], probe.extract

    def spy(*a, **k):
        f = extract(*a, **k)
        widths.append(f.pooled.size(1))
        return f

    monkeypatch.setattr(probe, "extract", spy)
    torch.manual_seed(0)
    two_blocks = build_encoder("vit_micro_8", 64, depth=2)
    args = (probe_data["run"], str(probe_data["train"]), str(probe_data["val"]))
    cfg = dataclasses.replace(FAST, kind="linear", last_blocks=2)
    m = run_probe(*args, cfg, encoder=two_blocks, progress=False, save_to_run=False)["metrics"]
    one = run_probe(*args, dataclasses.replace(cfg, last_blocks=1), encoder=two_blocks, progress=False,
                    save_to_run=False)["metrics"]
    assert widths == [192, 192, 96, 96] and m["linear_top1"] > 0.95 and one["linear_top1"] > 0.95
    with pytest.raises(ConfigError, match="probe.last_blocks 2 exceeds the encoder's 1 blocks"):
        run_probe(*args, cfg, progress=False, save_to_run=False)


@pytest.mark.slow
def test_probe_of_the_random_init_sits_beside_the_trained_result(probe_data, capsys):
    """--set probe.encoder=init probes the encoder the run started from (initial_encoder: same
    seed, same weights) and keeps it as eval/probe_init.json, leaving eval/probe.json alone."""
    from tcjepa.checkpoint import initial_encoder, load_encoder, load_run_config
    from tcjepa.cli import main

    run = probe_data["run"]
    init, teacher = load_encoder(run, "init"), load_encoder(run, "teacher")
    fresh = initial_encoder(load_run_config(run)).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in init.state_dict().items()) and not init.training
    assert any(not torch.equal(v, teacher.state_dict()[k]) for k, v in init.state_dict().items())

    trained = run / "eval" / "probe.json"
    trained.unlink(missing_ok=True)
    argv = ["eval", "probe", "--checkpoint", str(run), "--data", str(probe_data["train"]), "--val-data",
            str(probe_data["val"]), "--set", "probe.labels=[label]", "probe.encoder=init"]
    assert main(argv) == 0
    assert f"wrote {run / 'eval' / 'probe_init.json'}" in capsys.readouterr().out
    result = json.loads((run / "eval" / "probe_init.json").read_text())
    assert result["config"]["encoder"] == "init" and not trained.exists()
    assert main(argv[:-1]) == 0 and json.loads(trained.read_text())["config"]["encoder"] == "auto"
    from tcjepa.eval.report import write_report

    report = write_report([run], None)
    assert "probe label top-1 (linear)" in report and "probe_init label top-1 (linear)" in report
