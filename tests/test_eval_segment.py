"""`tcjepa eval segment`: metrics from a confusion matrix against a hand computation, the linear
segmentation probe on features that encode the label (near-perfect) and on shuffled labels (the
majority baseline), then end to end through the CLI on tiny synthetic shards and a tiny run,
and the error for shards without segmentation maps."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipelines.labels import IGNORE
from tcjepa.cli import main
from tcjepa.eval.common import LastBlocks
from tcjepa.eval.segment import (SegmentConfig, confusion_matrix, seg_class_names, segmentation_metrics,
                                 train_segmentation_probe)
from tests.conftest import write_tar
from tests.eval_runs import colour_members, train_tiny, write_colour_shards

NAMES = ["background", "circle", "square", "star"]


def test_confusion_and_metrics_equal_a_hand_computation():
    """4 classes; 'star' (3) never occurs in the labels but is predicted once; two ignore pixels."""
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 2], [IGNORE, IGNORE, 0, 2]], dtype=torch.uint8)
    pred = torch.tensor([[0, 0, 1, 1], [1, 3, 2, 0], [2, 1, 0, 2]], dtype=torch.uint8)
    confusion = confusion_matrix(pred, target, 4)
    assert confusion.tolist() == [[3, 1, 0, 0],  # background: 4 pixels, 3 right, 1 called circle
                                  [0, 2, 0, 1],  # circle: 3 pixels, 1 called star
                                  [1, 0, 2, 0],  # square: 3 pixels, 1 called background
                                  [0, 0, 0, 0]]  # star: no pixel (the ignore pixels are not counted)
    m = segmentation_metrics(confusion, NAMES)
    # IoU = TP / (TP + FP + FN): background 3 / (3 + 1 + 1), circle 2 / (2 + 1 + 1), square 2 / (2 + 0 + 1)
    iou = {"background": 3 / 5, "circle": 2 / 4, "square": 2 / 3}
    assert m["per_class_iou"] == pytest.approx({**iou, "star": None})
    assert m["miou"] == pytest.approx(sum(iou.values()) / 3)  # star is left out of the mean
    assert m["pixel_accuracy"] == pytest.approx(7 / 10)
    assert segmentation_metrics(torch.zeros(2, 2, dtype=torch.long), ["a", "b"])["miou"] is None


def test_class_names_come_from_seg_classes_and_ids_beyond_them_are_numbered():
    metas = [{}, {"seg_classes": ["background", "circle"]}, {"seg_classes": ["other"]}]
    assert seg_class_names(metas, 4) == ["background", "circle", "2", "3"]
    assert seg_class_names([{}], 2) == ["0", "1"]


def grid_data(n: int, seed: int, classes: int = 4, regions: int = 4, block: int = 2, patch: int = 4):
    """Label maps of ``regions`` x ``regions`` random-class squares, each ``block`` x ``block``
    patches of ``patch`` x ``patch`` pixels, with patch features that encode them: the one-hot of
    the patch's class plus noise. Regions span several patches, as objects do, so that bilinear
    upsampling of patch logits can be exact but near region corners (all but ~1 % of pixels).
    A fifth of the rows of a quarter of the maps are ignore (255)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randint(0, classes, (n, regions, regions), generator=g)
    grid = grid.repeat_interleave(block, 1).repeat_interleave(block, 2)  # the patch grid
    x = F.one_hot(grid.flatten(1), classes).float() + 0.1 * torch.randn(n, grid[0].numel(), classes, generator=g)
    y = grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2).to(torch.uint8)
    y[: n // 4, : y.size(1) // 5] = IGNORE
    return x.half(), y


FAST = SegmentConfig(epochs=15, batch_size=32, lrs=(1e-2, 1e-1))


def test_probe_reads_features_that_encode_the_label_and_not_shuffled_labels():
    tx, ty = grid_data(300, 1)
    vx, vy = grid_data(100, 2)
    m, _ = train_segmentation_probe(tx, ty, vx, vy, NAMES, FAST)
    assert m["miou"] >= 0.95 and m["pixel_accuracy"] >= 0.97, m
    assert m["num_classes"] == 4 and set(m["per_class_iou"]) == set(NAMES)
    assert m["holdout_miou"] == max(m["lr_sweep"].values()) == m["lr_sweep"][str(m["lr"])]  # chosen on the holdout
    assert set(m["lr_sweep"]) == {"0.01", "0.1"} and sum(map(sum, m["confusion"])) == int((vy != IGNORE).sum())
    assert m["majority_miou"] < 0.1  # one of four balanced classes everywhere: IoU ~1/4 for one class, 0 for three

    _, shuffled_y = grid_data(300, 3)  # labels drawn apart from the features
    s, _ = train_segmentation_probe(tx, shuffled_y, vx, grid_data(100, 4)[1], NAMES, FAST)
    # pixel accuracy at the majority baseline (1/4); an uninformed guess over 4 balanced classes has IoU ~1/7 each
    assert s["pixel_accuracy"] < s["majority_pixel_accuracy"] + 0.05 and s["miou"] < 0.2, s


def test_features_are_standardised_so_their_scale_does_not_matter():
    """Channels scaled by 1/20..20 and shifted: the same heads learn the same maps at the same learning rates."""
    tx, ty = grid_data(200, 7)
    vx, vy = grid_data(60, 8)
    scale, shift = torch.tensor([0.05, 1.0, 20.0, 5.0]), torch.tensor([3.0, -1.0, 40.0, 0.0])
    cfg = SegmentConfig(epochs=10, lrs=(1e-2, 1e-1))
    m, _ = train_segmentation_probe(tx, ty, vx, vy, NAMES, cfg)
    scaled, _ = train_segmentation_probe((tx.float() * scale + shift).half(), ty, (vx.float() * scale + shift).half(),
                                         vy, NAMES, cfg)
    assert scaled["miou"] == pytest.approx(m["miou"], abs=0.01) and m["miou"] >= 0.95


def test_batchnorm_heads_and_majority_baseline():
    """The BatchNorm option trains too; a dominant class sets the majority baseline."""
    tx, ty = grid_data(200, 5)
    vx, vy = grid_data(60, 6)
    ty[ty == 3], vy[vy == 3] = 0, 0  # background now holds half of the pixels
    m, head = train_segmentation_probe(tx, ty, vx, vy, NAMES, SegmentConfig(epochs=10, lrs=(1e-1,), batchnorm=True))
    assert isinstance(head[1], torch.nn.BatchNorm1d) and m["miou"] >= 0.95 and m["per_class_iou"]["star"] is None
    labelled = vy[vy != IGNORE]
    assert m["majority_class"] == "background"
    assert m["majority_pixel_accuracy"] == pytest.approx(float((labelled == 0).float().mean()))
    assert m["majority_miou"] == pytest.approx(m["majority_pixel_accuracy"] / 3)  # background IoU = its share; 0, 0


def test_last_blocks_concatenates_each_block_output_through_the_final_norm():
    from tcjepa.models.vit import build_encoder

    encoder = build_encoder("vit_micro_8", 32, depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = LastBlocks(encoder, 2)(images)
        x = encoder.patch_embed(images) + encoder.pos_embed
        outputs = []
        for block in encoder.blocks:
            x = block(x)
            outputs.append(encoder.norm(x))
    assert features.shape == (2, 16, 2 * 96)
    assert torch.allclose(features, torch.cat(outputs[-2:], -1), atol=1e-5)
    assert torch.allclose(features[..., 96:], encoder(images), atol=1e-5)  # the last one is the encoder's output


def test_segmentation_plot_colours_classes_by_the_fixed_palette(tmp_path):
    """Image | prediction | truth per row, scaled to >= 128 px; class 0 black, 1.. the palette, ignore white."""
    import numpy as np

    from tcjepa.eval.plots import PALETTE, class_colour, segmentation_plot

    image = np.full((32, 32, 3), (10, 200, 30), dtype=np.uint8)
    pred, truth = np.zeros((32, 32), np.uint8), np.full((32, 32), 2, np.uint8)
    truth[:, 16:] = IGNORE
    path = segmentation_plot([image], [pred], [truth], NAMES[:3], tmp_path / "s.png", "title")
    with Image.open(path) as im:
        tile = 32 * 4  # the smallest whole scale to 128 px
        at = lambda col, x, y: im.getpixel((8 + col * (tile + 8) + x, 56 + y))  # noqa: E731
        assert at(0, 5, 5) == (10, 200, 30) and at(1, 5, 5) == (0, 0, 0)
        assert at(2, 5, 5) == PALETTE[1] == class_colour(2) and at(2, tile - 5, 5) == (255, 255, 255)
    assert class_colour(11) not in PALETTE and class_colour(11) != class_colour(12)


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment")
    for name, samples, seed in (("train", 48, 0), ("val", 16, 1)):
        assert main(["data", "synthetic", "--out", str(root / name), "--samples", str(samples), "--seed", str(seed),
                     "--shard-size", "32", "--image-size", "32"]) == 0
    mixed = root / "mixed"  # the val scenes, then 6 samples without a map
    mixed.mkdir()
    shutil.copy(root / "val" / "000000.tar", mixed / "000000.tar")
    write_tar(mixed / "000001.tar", colour_members(100, 6))
    run = train_tiny(root / "train", root / "run", False, "model.image_size=32", "model.depth=2")
    return {"train": root / "train", "val": root / "val", "mixed": mixed, "run": run,
            "plain": write_colour_shards(root / "plain", 6)}


def test_eval_segment_end_to_end(seg_data, tmp_path, capsys):
    """On the last 2 blocks' features; val samples without a map are counted and left out (the
    last batch of 8 has none: the loader gives it no seg maps at all)."""
    run, out = seg_data["run"], tmp_path / "seg.json"
    argv = ["eval", "segment", "--checkpoint", str(run), "--data", str(seg_data["train"]), "--val-data",
            str(seg_data["mixed"]), "--json", str(out), "--set", "segment.epochs=2", "segment.last_blocks=2",
            "segment.batch_size=8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "segmentation: 6 classes, 16 val images" in printed and "IoU circle" in printed, printed
    saved = json.loads((run / "eval" / "segment.json").read_text())
    assert saved["task"] == "segment" and saved == json.loads(out.read_text())
    m = saved["metrics"]
    assert 0 <= m["miou"] <= 1 and 0 <= m["pixel_accuracy"] <= 1 and 0 <= m["majority_miou"] <= 1
    assert 0 < m["majority_pixel_accuracy"] <= 1 and m["majority_class"] == "background"
    assert m["class_names"] == ["background", "circle", "square", "triangle", "diamond", "star"]
    assert set(m["per_class_iou"]) == set(m["class_names"]) and m["num_classes"] == 6
    assert all(v is None or 0 <= v <= 1 for v in m["per_class_iou"].values())
    assert m["lr"] in SegmentConfig().lrs and m["num_train"] == 48 and m["num_val"] == 16
    assert m["unlabelled"] == {"train": 0, "val": 6} and saved["config"]["last_blocks"] == 2
    assert m["method"] == "I-JEPA" and m["encoder"] == "vit_micro_8" and m["weights"] == "teacher"
    png = Path(saved["plots"][0])
    assert png == run / "eval" / "segment_examples.png"
    with Image.open(png) as im:
        assert im.width >= 3 * 128 and im.height >= 4 * 128  # 4 rows of image | prediction | truth


def test_eval_segment_two_blocks_and_bad_settings(seg_data, tmp_path, capsys):
    argv = ["eval", "segment", "--checkpoint", str(seg_data["run"]), "--data", str(seg_data["train"]), "--val-data",
            str(seg_data["val"]), "--json", str(tmp_path / "s.json"), "--set", "segment.epochs=1"]
    assert main(argv + ["segment.last_blocks=3"]) == 2  # the tiny run's encoder has two blocks
    assert "segment.last_blocks 3 exceeds the encoder's 2 blocks" in capsys.readouterr().err
    assert main(argv + ["segment.lrs=[]"]) == 2
    assert "segment.lrs must be a non-empty list" in capsys.readouterr().err
    assert main(argv + ["segment.lr=1"]) == 2
    assert "unknown key segment.lr (did you mean segment.lrs?)" in capsys.readouterr().err


def test_eval_segment_without_masks_is_an_error_before_the_model(seg_data, capsys, monkeypatch):
    import tcjepa.checkpoint

    def no_model(*a, **k):
        raise AssertionError("the encoder was loaded before the data was checked")

    monkeypatch.setattr(tcjepa.checkpoint, "load_encoder", no_model)
    plain = str(seg_data["plain"])
    for data, val, key in ((plain, seg_data["val"], "--data"), (seg_data["train"], plain, "--val-data")):
        assert main(["eval", "segment", "--checkpoint", str(seg_data["run"]), "--data", str(data),
                     "--val-data", str(val)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {key}: none of the first 6 samples of {plain} has a segmentation map (KEY.seg.png); "
                       "`tcjepa data synthetic` writes them, `tcjepa data write --mask-column COLUMN` adds them to "
                       "your own data"), err
