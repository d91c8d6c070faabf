"""Segmentation labels through the data path: KEY.seg.png / KEY.inst.png written by `data synthetic`
and `data write --mask-column`, carried by the loader through the image's own crop and flip, and
counted by `data inspect`; broken maps are skipped as bad_mask."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.inspection import inspect_shards, seg_class_shares
from data_pipelines.labels import IGNORE, LabelError, decode_label
from data_pipelines.loader import SKIP_REASONS, LoaderSpec, SkipTracker, center_crop_box, decode_sample, make_loader, \
    resolve_shards
from data_pipelines.synthetic import COLOR_NAMES, COLOR_RGB, SEG_CLASSES, SHAPE_NAMES, draw_labels, draw_scene, \
    sample_scene, write_synthetic_shards
from data_pipelines.write import WRITE_SKIP_REASONS, WriteOptions, write_dataset
from tcjepa.cli import main
from tests.conftest import png_bytes, write_tar
from tests.test_synthetic import read_samples


def png_of(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def uniform_interior(labels: np.ndarray, radius: int) -> np.ndarray:
    """True where the (2r+1)^2 neighbourhood holds one label: far enough from any boundary that
    the image's bicubic interpolation cannot reach across it."""
    k = 2 * radius + 1
    windows = np.lib.stride_tricks.sliding_window_view(labels, (k, k))
    inside = np.zeros(labels.shape, bool)
    inside[radius:-radius, radius:-radius] = windows.min(axis=(2, 3)) == windows.max(axis=(2, 3))
    return inside


# ----------------------------------------------------------------------------- synthetic scenes


def test_synthetic_label_maps_are_drawn_with_the_image_geometry():
    rng = random.Random("label-geometry")
    for _ in range(30):
        scene = sample_scene(rng, 64)
        image = np.asarray(draw_scene(scene, 64)).astype(int)
        seg, inst = (np.asarray(m) for m in draw_labels(scene, 64))
        for i, o in enumerate(scene.objects):
            mine = inst == i + 1
            assert mine.sum() > 30  # every object is visible
            assert (image[mine] == o.rgb).all()  # exactly the pixels the image filled with its colour
            assert (seg[mine] == SEG_CLASSES.index(o.shape)).all()
        assert (seg[inst == 0] == 0).all()
        object_colour = np.zeros(inst.shape, bool)
        for o in scene.objects:
            object_colour |= (image == o.rgb).all(axis=-1)
        assert not (object_colour & (inst == 0)).any()  # no object colour outside the maps


def test_synthetic_shards_hold_label_maps_that_match_the_pixels(tmp_path):
    summary = write_synthetic_shards(tmp_path, samples=24, shard_size=24, seed=5)
    assert summary["seg_classes"] == ["background", "circle", "square", "triangle", "diamond", "star"]
    assert list(SEG_CLASSES[1:]) == list(SHAPE_NAMES)
    for key, s in read_samples(summary["shards"]).items():
        meta = json.loads(s["json"])
        assert meta["seg_classes"] == summary["seg_classes"]
        image = np.asarray(Image.open(io.BytesIO(s["png"]))).astype(int)
        seg_img, inst_img = Image.open(io.BytesIO(s["seg.png"])), Image.open(io.BytesIO(s["inst.png"]))
        assert seg_img.mode == inst_img.mode == "L" and seg_img.size == inst_img.size == (64, 64)
        seg, inst = np.asarray(seg_img), np.asarray(inst_img)
        assert set(np.unique(seg)) <= set(range(6)) and set(np.unique(inst)) == set(range(len(meta["objects"]) + 1))
        interior = uniform_interior(inst, 1)
        for i, o in enumerate(meta["objects"]):
            mine = inst == i + 1
            assert (seg[mine] == SEG_CLASSES.index(o["shape"])).all(), key  # instance i+1 is objects[i]
            assert mine[o["y"], o["x"]], (key, o)  # its centre is labelled with it
            pixels = image[mine & interior]
            assert len(pixels) and (np.abs(pixels - COLOR_RGB[o["color"]]) <= 12).all(), (key, o)  # colour jitter
        background = image[(inst == 0) & interior]
        for colour in {o["color"] for o in meta["objects"]}:
            assert (np.abs(background - COLOR_RGB[colour]).max(axis=-1) > 12).all(), (key, colour)
        assert set(COLOR_NAMES) >= {o["color"] for o in meta["objects"]}


# ----------------------------------------------------------------------------- the loader

W, H, GRID = 96, 72, 3  # blocks of 32 x 24 pixels


def block_ids(key: int) -> np.ndarray:
    """The 3 x 3 block ids of sample ``key``: 1..9 in an order of its own, so that a map that
    missed a flip, a crop or its sample shows."""
    return np.random.default_rng(key).permutation(np.arange(1, GRID * GRID + 1)).reshape(GRID, GRID)


def block_map(key: int) -> np.ndarray:
    return np.kron(block_ids(key), np.ones((H // GRID, W // GRID), int)).astype(np.uint8)


def encoding_image(seg: np.ndarray) -> np.ndarray:
    """An image whose pixels spell out their own label: R = 20 * id, G = 255 - 20 * id."""
    return np.stack([20 * seg, 255 - 20 * seg.astype(int), np.full_like(seg, 7)], axis=-1).astype(np.uint8)


def write_encoded_shards(root: Path, keys: range, shards: int = 2, with_maps=lambda k: True) -> list[str]:
    root.mkdir(exist_ok=True)
    per = -(-len(keys) // shards)
    for n in range(shards):
        members = []
        for k in keys[n * per:(n + 1) * per]:
            seg = block_map(k)
            members.append((f"{k:06d}.png", png_of(encoding_image(seg))))
            if with_maps(k):
                members += [(f"{k:06d}.seg.png", png_of(seg, "L")), (f"{k:06d}.inst.png", png_of(10 - seg, "L"))]
            members.append((f"{k:06d}.txt", b"blocks"))
        write_tar(root / f"{n:06d}.tar", sorted(members))
    return resolve_shards(str(root))


def check_aligned(batch: dict, size: int) -> list[tuple[str, bool, bool]]:
    """Every interior pixel of every sample: the image spells the label it has. Returns per
    sample (key, flipped, cropped), read off the label map against the whole image's."""
    found = []
    for i, key in enumerate(batch["keys"]):
        seg, inst = batch["seg"][i].numpy(), batch["inst"][i].numpy()
        image = batch["images"][i].permute(1, 2, 0).numpy().astype(int)
        assert (inst == 10 - seg.astype(int)).all(), key  # both maps went through the same transform
        inside = uniform_interior(seg, 3)
        assert inside.sum() > 0.15 * size * size, key
        assert (np.abs(image[..., 0] - 20 * seg.astype(int))[inside] <= 1).all(), key
        assert (np.abs(image[..., 1] - (255 - 20 * seg.astype(int)))[inside] <= 1).all(), key
        ids = block_ids(int(key))
        first_row = [v for v in dict.fromkeys(seg[size // 2].tolist())]  # ids left to right
        cols = [int(np.argwhere(ids == v)[0][1]) for v in first_row]
        flipped = cols != sorted(cols)
        whole = np.asarray(Image.fromarray(block_map(int(key))).resize((size, size), Image.NEAREST,
                                                                       box=center_crop_box(W, H)))
        cropped = not ((seg == whole).all() or (seg == whole[:, ::-1]).all())
        found.append((key, flipped, cropped))
    return found


def test_training_crops_and_flips_move_the_label_maps_with_the_image(tmp_path):
    urls = write_encoded_shards(tmp_path / "shards", range(40))
    size = 48
    loader = make_loader(LoaderSpec(urls, 8, size, seed=2, shuffle_buffer=6, crop_scale=(0.3, 1.0)))
    seen = []
    for n, batch in enumerate(loader):
        assert batch["seg"].shape == (8, size, size) and batch["seg"].dtype == torch.uint8
        seen += check_aligned(batch, size)
        if n == 7:
            break
    assert len(seen) == 64
    assert any(flipped for _, flipped, _ in seen) and not all(flipped for _, flipped, _ in seen)
    assert any(cropped for _, _, cropped in seen)


def test_label_maps_draw_nothing_from_the_augmentation_rng(tmp_path):
    with_maps = write_encoded_shards(tmp_path / "a", range(16), shards=1)
    without = write_encoded_shards(tmp_path / "b", range(16), shards=1, with_maps=lambda k: False)
    spec = dict(batch_size=8, image_size=32, seed=4, shuffle_buffer=4)
    a = next(iter(make_loader(LoaderSpec(with_maps, **spec))))
    b = next(iter(make_loader(LoaderSpec(without, **spec))))
    assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])  # the same crops and flips
    assert "seg" not in b and "inst" not in b
    unread = next(iter(make_loader(LoaderSpec(with_maps, labels=False, **spec))))  # as training reads
    assert unread["keys"] == a["keys"] and torch.equal(unread["images"], a["images"])
    assert "seg" not in unread and "inst" not in unread


def test_training_leaves_the_label_maps_unread(monkeypatch, tmp_path):
    """The training loop's loader is built with labels=False (the maps cost decoding time and no
    method reads them)."""
    import tcjepa.train as loop
    from tcjepa.config import load_config, project_root

    specs = []
    monkeypatch.setattr(loop, "make_loader", lambda spec: specs.append(spec) or iter(()))
    cfg = load_config(project_root() / "recipes/ijepa_quickstart.yaml",
                           [f"data.train={tmp_path}", "model.encoder=vit_micro_8", "model.depth=1",
                            "model.predictor_depth=1", "model.predictor_width=48", "train.batch_size=4"])
    write_encoded_shards(tmp_path, range(4), shards=1)
    with pytest.raises(StopIteration):
        loop.train(cfg, tmp_path / "run", progress=False)
    assert specs and specs[0].labels is False


def test_evaluation_reads_each_sample_once_with_centre_cropped_maps(tmp_path):
    urls = write_encoded_shards(tmp_path / "shards", range(21), shards=3)
    size = 40
    keys = []
    for rank in range(2):
        for batch in make_loader(LoaderSpec(urls, 4, size, train=False, rank=rank, world_size=2, workers=1)):
            if not batch["keys"]:
                continue
            for key, flipped, cropped in check_aligned(batch, size):
                assert not flipped and not cropped, key  # exactly the centre crop of the whole map
            keys += batch["keys"]
    assert sorted(keys) == [f"{k:06d}" for k in range(21)]


def test_a_batch_mixing_samples_with_and_without_maps_marks_the_missing_ones_ignore(tmp_path):
    urls = write_encoded_shards(tmp_path / "shards", range(8), shards=1, with_maps=lambda k: k % 2 == 0)
    batch = next(iter(make_loader(LoaderSpec(urls, 8, 24, train=False))))
    for i, key in enumerate(batch["keys"]):
        seg = batch["seg"][i]
        if int(key) % 2:
            assert (seg == IGNORE).all() and (batch["inst"][i] == IGNORE).all()
        else:
            assert set(seg.unique().tolist()) <= set(range(1, 10))


def test_jpeg_with_label_map_is_decoded_at_full_size():
    buf = io.BytesIO()
    Image.new("RGB", (1024, 768), (90, 20, 200)).save(buf, format="JPEG")
    raw = {"__key__": "k", "jpg": buf.getvalue(), "seg.png": png_of(np.zeros((768, 1024), np.uint8))}
    sample = decode_sample(raw, min_side=150)  # without the map this decodes at 1/4 scale
    assert sample["image"].size == sample["labels"]["seg"].size == (1024, 768)
    del raw["seg.png"]
    assert decode_sample(raw, min_side=150)["labels"] == {}


def test_broken_label_maps_in_shards_are_skipped_as_bad_mask(tmp_path):
    assert "bad_mask" in SKIP_REASONS
    good = np.ones((32, 32), np.uint8)
    members = []
    for k in range(4):
        members += [(f"good{k}.png", png_bytes((9, 9, 9))), (f"good{k}.seg.png", png_of(good))]
    members += [("junk.png", png_bytes((9, 9, 9))), ("junk.seg.png", b"not a png")]
    members += [("small.png", png_bytes((9, 9, 9))), ("small.seg.png", png_of(np.ones((16, 32), np.uint8)))]
    members += [("rgb.png", png_bytes((9, 9, 9))), ("rgb.seg.png", png_bytes((1, 1, 1)))]
    members += [("inst.png", png_bytes((9, 9, 9))), ("inst.seg.png", png_of(good)), ("inst.inst.png", b"")]
    write_tar(tmp_path / "000000.tar", members)
    urls = resolve_shards(str(tmp_path))
    keys, tracker = [], SkipTracker()
    with pytest.warns(UserWarning, match=r"skipped sample \(bad_mask\)"):
        for batch in make_loader(LoaderSpec(urls, 3, 16, train=False)):
            keys += batch["keys"]
            tracker.update(batch["skipped"])
    assert sorted(keys) == [f"good{k}" for k in range(4)]
    assert tracker.counts == {"bad_mask": 4} and tracker.delivered == 4


def test_decode_label_accepts_ids_and_refuses_colours():
    ids = np.array([[0, 1], [2, 7]], np.uint8)
    palette = Image.fromarray(ids, "P")
    palette.putpalette([255, 255, 255, 200, 0, 0, 0, 200, 0] + [9] * (256 * 3 - 9))  # ids, not colours
    for image in (Image.fromarray(ids, "L"), palette, Image.fromarray(ids.astype(np.uint16)).convert("I;16"),
                  Image.fromarray(ids.astype(np.int32), "I")):
        buf = io.BytesIO()
        image.save(buf, format="TIFF" if image.mode == "I" else "PNG")  # PNG has no 32-bit grey
        decoded = decode_label(buf.getvalue(), (2, 2))
        assert decoded.mode == "L" and (np.asarray(decoded) == ids).all(), image.mode
    wide = io.BytesIO()
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(wide, format="PNG")
    with pytest.raises(LabelError, match="ids 0..300"):
        decode_label(wide.getvalue())
    with pytest.raises(LabelError, match="mode 'RGB'"):
        decode_label(png_bytes((1, 2, 3)))
    with pytest.raises(LabelError, match=r"the label map is 2x2 but the image is 3x2"):
        decode_label(png_of(ids), (3, 2))


# ----------------------------------------------------------------------------- data write --mask-column


def test_data_write_mask_column(tmp_path, capsys):
    d = tmp_path / "data"
    (d / "masks").mkdir(parents=True)
    ids = np.kron(np.array([[0, 1], [2, 3]]), np.ones((20, 30), int)).astype(np.uint8)  # 60 x 40
    rgb = Image.fromarray(encoding_image(ids))
    for i in range(4):
        rgb.save(d / f"img{i}.png")
    Image.fromarray(ids, "L").save(d / "masks/l.png")
    pal = Image.fromarray(ids, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(d / "masks/p.png")
    Image.fromarray(ids, "L").convert("RGB").save(d / "masks/rgb.png")
    Image.fromarray(ids[:20], "L").save(d / "masks/small.png")
    (d / "masks/junk.png").write_bytes(b"not a png")
    rows = [("img0.png", "masks/l.png"), ("img1.png", "masks/p.png"), ("img2.png", ""), ("img3.png", "masks/rgb.png"),
            ("img0.png", "masks/small.png"), ("img1.png", "masks/junk.png"), ("img2.png", "masks/none.png")]
    manifest = d / "data.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "seg"])
        w.writerows([(img, f"blocks {i}", mask) for i, (img, mask) in enumerate(rows)])
    out = tmp_path / "out"
    assert main(["data", "write", "--input", str(manifest), "--out", str(out), "--mask-column", "seg"]) == 0
    line = capsys.readouterr().out
    assert "2 with a mask, 1 without (no_mask)" in line and "bad_mask: 4" in line
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 3 and stats["skipped_by_reason"] == {"bad_mask": 4}
    assert stats["masks"] == {"with_mask": 2, "no_mask": 1} and "bad_mask" in WRITE_SKIP_REASONS
    details = [json.loads(x)["detail"] for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert any("mode 'RGB'" in x for x in details) and any("is 60x20 but the image is 60x40" in x for x in details)
    assert any("does not decode" in x for x in details) and any("no mask file" in x for x in details)
    members = read_samples(sorted(out.glob("*.tar")))
    assert set(members["000000000"]) == {"png", "seg.png", "txt", "json"}
    assert "seg" not in json.loads(members["000000000"]["json"])  # the mask column is not a json field
    assert set(members["000000002"]) == {"png", "txt", "json"}  # the empty cell: no mask
    for key in ("000000000", "000000001"):  # L and P alike: stored as L, the ids themselves
        stored = Image.open(io.BytesIO(members[key]["seg.png"]))
        assert stored.mode == "L" and (np.asarray(stored) == ids).all()
    batch = next(iter(make_loader(LoaderSpec(resolve_shards(str(out)), 3, 20, train=False))))
    assert batch["keys"] == ["000000000", "000000001", "000000002"] and (batch["seg"][2] == IGNORE).all()


def test_data_write_mask_with_resize_and_refusals(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    ids = np.kron(np.array([[0, 5], [9, 1]]), np.ones((50, 100), int)).astype(np.uint8)  # 200 x 100
    Image.fromarray(encoding_image(ids)).save(d / "big.png")
    Image.fromarray(ids, "L").save(d / "big_mask.png")
    (d / "rows.jsonl").write_text(json.dumps({"image": "big.png", "caption": "big", "mask": "big_mask.png",
                                              "seg_classes": ["a", "b"]}) + "\n"
                                  + json.dumps({"image": "big.png", "caption": "odd", "mask": 3}) + "\n")
    stats = write_dataset(d / "rows.jsonl", tmp_path / "out", WriteOptions(resize=50, mask_column="mask"),
                          progress=False)
    assert stats["written"] == 1 and stats["skipped_by_reason"] == {"bad_mask": 1}
    sample = read_samples(sorted((tmp_path / "out").glob("*.tar")))["000000000"]
    mask = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
    assert mask.shape == (25, 50) and set(np.unique(mask)) == {0, 5, 9, 1}  # nearest: ids, never blends
    assert json.loads(sample["json"])["seg_classes"] == ["a", "b"]
    from data_pipelines.loader import DataError

    with pytest.raises(DataError, match="no column 'segmentation' for the mask"):
        write_dataset(d / "rows.jsonl", tmp_path / "o2", WriteOptions(mask_column="segmentation"), progress=False)
    with pytest.raises(DataError, match="is a folder, which has no columns"):
        write_dataset(d, tmp_path / "o3", WriteOptions(mask_column="mask"), progress=False)


# ----------------------------------------------------------------------------- data inspect


def test_seg_class_shares_names_the_classes_seen():
    pixels = np.zeros(256, np.int64)
    pixels[[0, 2, 255]] = [60, 30, 10]
    assert seg_class_shares(pixels, ["background", "cat", "dog"]) == [
        {"id": 0, "name": "background", "pixels": 60, "share": 0.6},
        {"id": 2, "name": "dog", "pixels": 30, "share": 0.3},
        {"id": 255, "name": "ignore", "pixels": 10, "share": 0.1},
    ]
    assert [c["name"] for c in seg_class_shares(pixels)] == [None, None, "ignore"]


def test_inspect_reports_label_statistics(tmp_path, capsys):
    write_synthetic_shards(tmp_path / "syn", samples=6, shard_size=6)
    report = inspect_shards(str(tmp_path / "syn"), progress=False)
    labels = report["labels"]
    assert labels["samples"] == labels["with_seg"] == labels["with_inst"] == 6
    names = [c["name"] for c in labels["classes"]]
    assert names[0] == "background" and set(names) <= set(SEG_CLASSES)
    assert abs(sum(c["share"] for c in labels["classes"]) - 1) < 1e-3 and labels["classes"][0]["share"] > 0.5
    urls = write_encoded_shards(tmp_path / "blocks", range(3), shards=1, with_maps=lambda k: k != 1)
    assert main(["data", "inspect", urls[0]]) == 0
    out = capsys.readouterr().out
    assert "segmentation masks: 2 of 3 samples; instance maps: 2" in out
    assert "9 classes; share of pixels by class id: 1 11.1%, 2 11.1%," in out
    plain = tmp_path / "plain"
    plain.mkdir()
    write_tar(plain / "000000.tar", [("a.png", png_bytes((1, 2, 3))), ("a.txt", b"x")])
    assert "labels" not in inspect_shards(str(plain), progress=False)
