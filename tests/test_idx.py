"""IDX image sets (the MNIST family) -> manifest -> shards, the README's real-data walkthrough path."""

import gzip
import json
import struct

import numpy as np
import pytest

from data_pipelines.idx import CLASS_NAMES, read_idx
from data_pipelines.loader import DataError
from data_pipelines.write import WriteOptions, write_dataset
from tcjepa.cli import main


def write_idx(path, array: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def idx_pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 9, 4, 1, 0], dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab", labels)
    return tmp_path / "img.gz", tmp_path / "lab", images, labels


def test_read_idx_round_trips_and_refuses_other_files(idx_pair, tmp_path):
    img, lab, images, labels = idx_pair
    assert np.array_equal(read_idx(img), images) and np.array_equal(read_idx(lab), labels)
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="bad: not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(DataError, match=r"header says shape \(9,\) \(9 bytes\), file holds 2"):
        read_idx(tmp_path / "short")


def test_idx_manifest_becomes_probe_ready_shards(idx_pair, tmp_path, capsys):
    from PIL import Image

    img, lab, images, labels = idx_pair
    out = tmp_path / "fm"
    assert main(["data", "idx", "--images", str(img), "--labels", str(lab), "--out", str(out), "--limit", "6"]) == 0
    assert "wrote 6 images of 10 classes" in capsys.readouterr().out
    rows = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[3] == {"image": "images/000003.png", "caption": "a photo of a ankle boot.",
                                          "label": 9, "label_name": "ankle boot"}
    with Image.open(out / rows[3]["image"]) as im:
        assert np.array_equal(np.asarray(im), images[3])
    stats = write_dataset(out / "manifest.jsonl", tmp_path / "shards", WriteOptions(), progress=False)
    assert stats["written"] == 6
    from tcjepa.eval.peek import peek

    look = peek(str(tmp_path / "shards"), "--data")
    assert [m["label"] for m in look.metas] == labels[:6].tolist() and look.captions == 6
    assert look.metas[3]["label_name"] == CLASS_NAMES["fashion-mnist"][9]


def test_idx_errors_before_writing(idx_pair, tmp_path, capsys):
    img, lab, _, _ = idx_pair
    out = tmp_path / "o"
    assert main(["data", "idx", "--images", str(img), "--labels", str(lab), "--out", str(out), "--classes", "a,b"]) == 2
    assert "label 9 but only 2 class names" in capsys.readouterr().err and not out.exists()
    assert main(["data", "idx", "--images", str(lab), "--labels", str(lab), "--out", str(out)]) == 2
    assert "expected N images [N, H, W]" in capsys.readouterr().err and not out.exists()
