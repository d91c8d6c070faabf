"""`tcjepa data write` / `data inspect` / `data easy-vqa`: every input format, every skip reason,
atomic output, and shards the loader reads back."""

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.loader import DataError, LoaderSpec, make_loader, resolve_shards
from data_pipelines.write import WriteOptions, parse_size, write_dataset
from tcjepa.cli import main
from tests.conftest import labelled_members, png_bytes, write_tar


def jpeg_bytes(color, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def read_back(out: Path) -> dict[str, dict]:
    """key -> {caption, meta, size} through the training loader's evaluation mode."""
    loader = make_loader(LoaderSpec(resolve_shards(str(out)), 4, 16, train=False))
    found = {}
    for batch in loader:
        for k, c, m in zip(batch["keys"], batch["captions"], batch["meta"]):
            found[k] = {"caption": c, "meta": m}
    return found


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        (d / f"img{i}.jpg").write_bytes(jpeg_bytes((40 * i, 100, 200 - 30 * i)))
    (d / "zero.jpg").write_bytes(b"")
    (d / "fake.jpg").write_bytes(b"this is not a jpeg")
    return d


def dirty_rows(images: Path) -> list[dict]:
    """Six good rows, then one of each skip reason (in this order)."""
    rows = [{"image": f"imgs/img{i}.jpg", "caption": f"picture number {i}", "label": i % 3, "label_name": f"c{i % 3}"}
            for i in range(6)]
    rows += [
        {"image": "imgs/missing.jpg", "caption": "no such file", "label": 0, "label_name": "c0"},
        {"image": "imgs/zero.jpg", "caption": "zero bytes", "label": 0, "label_name": "c0"},
        {"image": "imgs/fake.jpg", "caption": "text named .jpg", "label": 0, "label_name": "c0"},
        {"image": "imgs/img0.jpg", "caption": "   ", "label": 0, "label_name": "c0"},
        {"image": "imgs/img0.jpg", "caption": "x" * 70000, "label": 0, "label_name": "c0"},
    ]
    return rows


EXPECTED_SKIPS = {"missing_file": 1, "empty_image": 1, "bad_image": 1, "empty_caption": 1, "huge_caption": 1}


def check_output(out: Path, stats: dict, extra_skips: dict | None = None) -> dict[str, dict]:
    assert stats["written"] == 6
    assert stats["skipped_by_reason"] == {**EXPECTED_SKIPS, **(extra_skips or {})}
    assert json.loads((out / "stats.json").read_text()) == stats
    listed = [json.loads(l) for l in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in listed) == sorted(k for k, n in stats["skipped_by_reason"].items() for _ in range(n))
    assert all(r["source"] and r["detail"] for r in listed)
    for shard in stats["shards"]:  # checksums are those of the files on disk
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert not list(out.glob("*.tmp"))
    found = read_back(out)
    assert sorted(found) == [f"{i:09d}" for i in range(6)]  # keys are the row numbers
    assert found["000000004"]["caption"] == "picture number 4"
    meta = found["000000004"]["meta"]
    assert meta["label"] == 1 and meta["label_name"] == "c1"  # extra columns, typed, in KEY.json
    assert (meta["width"], meta["height"]) == (48, 32) and meta["source"].endswith("img4.jpg")
    return found


def test_csv_manifest_with_every_skip_reason(tmp_path, images):
    rows = dirty_rows(images)
    manifest = tmp_path / "data.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "label", "label_name"])
        w.writeheader()
        w.writerows(rows)
    with manifest.open("ab") as f:  # a caption cell that is not UTF-8
        f.write(b"imgs/img1.jpg,\xff\xfe latin garbage,0,c0\n")
    out = tmp_path / "shards"
    stats = write_dataset(manifest, out, WriteOptions(shard_size=4), progress=False)
    check_output(out, stats, {"bad_text": 1})
    assert [s["samples"] for s in stats["shards"]] == [4, 2]


def test_tsv_jsonl_and_parquet_manifests(tmp_path, images):
    rows = dirty_rows(images)
    tsv = tmp_path / "data.tsv"
    tsv.write_text("filepath\ttext\tlabel\tlabel_name\n" + "".join(
        f"{r['image']}\t{r['caption']}\t{r['label']}\t{r['label_name']}\n" for r in rows))
    stats = write_dataset(tsv, tmp_path / "tsv", WriteOptions(), progress=False)
    check_output(tmp_path / "tsv", stats)

    jsonl = tmp_path / "data.jsonl"
    with jsonl.open("wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(b'{"image": "imgs/img1.jpg", "caption": "\xff\xfe"}\n')  # not UTF-8
        f.write(b"{broken json\n")
        f.write(b'{"image": 7, "caption": "an image cell that is a number"}\n')
        f.write(b'{"image": "imgs/img1.jpg", "caption": "a mask cell that is a list", "mask": [1, 2]}\n')
    stats = write_dataset(jsonl, tmp_path / "jsonl", WriteOptions(mask_column="mask"), progress=False)
    check_output(tmp_path / "jsonl", stats, {"bad_text": 1, "bad_row": 2, "bad_mask": 1})
    details = [json.loads(l)["detail"] for l in (tmp_path / "jsonl" / "skipped.jsonl").read_text().splitlines()]
    assert "the image cell holds a int, not a file path or bytes" in details
    assert "the mask cell holds a list, not a file path" in details

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    stats = write_dataset(tmp_path / "data.parquet", tmp_path / "pq", WriteOptions(), progress=False)
    check_output(tmp_path / "pq", stats)


def test_folder_input_with_txt_and_json(tmp_path, images):
    for i in range(6):
        (images / f"img{i}.txt").write_text(f"picture number {i}")
        (images / f"img{i}.json").write_text(json.dumps({"label": i % 3, "label_name": f"c{i % 3}"}))
    (images / "zero.txt").write_text("zero bytes")
    (images / "fake.txt").write_text("text named .jpg")
    (images / "nocap.png").write_bytes(png_bytes((1, 2, 3)))  # no .txt: empty caption
    (images / "badtext.png").write_bytes(png_bytes((1, 2, 3)))
    (images / "badtext.txt").write_bytes(b"\xff\xfe not utf-8")
    (images / "huge.png").write_bytes(png_bytes((1, 2, 3)))
    (images / "huge.txt").write_text("y" * 70000)
    out = tmp_path / "out"
    stats = write_dataset(images, out, WriteOptions(), progress=False)
    assert stats["written"] == 6
    assert stats["skipped_by_reason"] == {"empty_image": 1, "bad_image": 1, "empty_caption": 1, "bad_text": 1,
                                          "huge_caption": 1}
    found = read_back(out)
    captions = sorted(v["caption"] for v in found.values())
    assert captions == [f"picture number {i}" for i in range(6)]
    kept = write_dataset(images, tmp_path / "keep", WriteOptions(allow_empty_captions=True), progress=False)
    assert kept["written"] == 7 and "empty_caption" not in kept["skipped_by_reason"]


def test_resize_keeps_aspect_and_shard_bytes_cap(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    for i in range(5):
        Image.new("RGB", (300, 150), (i * 40, 90, 90)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"wide picture {i}")
    Image.new("RGB", (60, 90), (9, 9, 9)).save(d / "small.png")  # already small: left as it is
    (d / "small.txt").write_text("small")
    out = tmp_path / "out"
    stats = write_dataset(d, out, WriteOptions(resize=100, shard_bytes=parse_size("1k")), progress=False)
    assert stats["written"] == 6
    assert all(s["samples"] == 1 for s in stats["shards"])  # each sample passes 1 KiB on its own
    sizes = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    sizes[m.name] = Image.open(io.BytesIO(tar.extractfile(m).read())).size
    assert sorted(sizes.values()) == [(60, 90)] + [(100, 50)] * 5
    assert parse_size("500MB") == 500 * 2**20 and parse_size("2g") == 2 * 2**30 and parse_size("123") == 123
    with pytest.raises(DataError, match="not a size"):
        parse_size("lots")


def test_workers_do_not_change_the_bytes(tmp_path, images):
    manifest = tmp_path / "data.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "label", "label_name"])
        w.writeheader()
        w.writerows(dirty_rows(images) * 3)
    one = write_dataset(manifest, tmp_path / "one", WriteOptions(shard_size=5), progress=False)
    two = write_dataset(manifest, tmp_path / "two", WriteOptions(shard_size=5, workers=2), progress=False)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["skipped_by_reason"] == two["skipped_by_reason"]


def test_output_is_protected_and_a_crash_leaves_only_complete_shards(tmp_path, images, monkeypatch):
    import data_pipelines.write as write

    manifest = tmp_path / "data.csv"
    manifest.write_text("image,caption\n" + "".join(f"imgs/img{i % 6}.jpg,pic {i}\n" for i in range(10)))
    out = tmp_path / "out"
    write_dataset(manifest, out, WriteOptions(shard_size=3), progress=False)
    with pytest.raises(DataError, match="already holds 4 shard"):
        write_dataset(manifest, out, WriteOptions(shard_size=3), progress=False)

    real = write.encode_row

    def crash_on_row_7(row, root, opts):
        if row.index == 7:
            raise RuntimeError("disk on fire")
        return real(row, root, opts)

    monkeypatch.setattr(write, "encode_row", crash_on_row_7)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(manifest, out, WriteOptions(shard_size=3, overwrite=True), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "skipped.jsonl"]  # no stats.json
    assert len(read_back(out)) == 6  # the finished shards are whole


def test_bad_inputs_are_clear_errors(tmp_path, images, capsys):
    bad = tmp_path / "cols.csv"
    bad.write_text("picture,words\nimgs/img0.jpg,hello\n")
    with pytest.raises(DataError, match=r"no image column \(tried image, filepath.*columns are \['picture', 'words'\]"):
        write_dataset(bad, tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists()  # refused before anything was created
    with pytest.raises(DataError, match="no column 'words2' for the caption"):
        write_dataset(bad, tmp_path / "o1", WriteOptions(image_column="picture", caption_column="words,words2"))
    assert not (tmp_path / "o1").exists()
    stats = write_dataset(bad, tmp_path / "o2", WriteOptions(image_column="picture", caption_column="words"),
                          progress=False)
    assert stats["written"] == 1
    (tmp_path / "cols.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="cols.xlsx is neither a folder nor"):
        write_dataset(tmp_path / "cols.xlsx", tmp_path / "o3")
    assert main(["data", "write", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input:") and "nope.csv does not exist" in err
    allbad = tmp_path / "allbad.csv"
    allbad.write_text("image,caption\nimgs/missing.jpg,hi\n")
    assert main(["data", "write", "--input", str(allbad), "--out", str(tmp_path / "o5")]) == 2
    assert "no row could be written" in capsys.readouterr().err


def test_cli_write_then_train_two_commands(tmp_path, images, capsys):
    """The README's CSV -> training path, as two commands."""
    manifest = tmp_path / "data.csv"
    manifest.write_text("image,caption\n" + "".join(f"imgs/img{i % 6}.jpg,pic {i}\n" for i in range(40)))
    assert main(["data", "write", "--input", str(manifest), "--out", str(tmp_path / "shards"), "--resize", "64"]) == 0
    assert "wrote 40 samples in 1 shards" in capsys.readouterr().out
    args = ["train", "recipes/ijepa_quickstart.yaml", "--data", str(tmp_path / "shards"), "--steps", "2",
            "--out", str(tmp_path / "run"), "--set", "model.encoder=vit_micro_8", "model.depth=1",
            "model.predictor_depth=1", "model.predictor_width=48", "train.batch_size=8", "data.workers=0"]
    assert main(args) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_inspect_reports_counts_reasons_and_sheet(tmp_path, capsys):
    d = tmp_path / "shards"
    d.mkdir()
    members = labelled_members(0, 9, size=40)
    members += [("bad.png", b"junk"), ("bad.txt", b"x"), ("nocap.png", png_bytes((1, 2, 3)))]
    write_tar(d / "000000.tar", members)
    assert main(["data", "inspect", str(d), "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "10 samples in 1 shards; 1 broken" in text and "bad_image: 1" in text
    report = json.loads((tmp_path / "report" / "inspect.json").read_text())
    assert report["samples"] == 10 and report["skipped_by_reason"] == {"bad_image": 1}
    assert report["width"]["max"] == 40 and report["empty_captions"] == 1
    assert report["caption_words_histogram"]["1-4"] == 9 and report["caption_words_histogram"]["0"] == 1
    sheet = Image.open(tmp_path / "report" / "contact_sheet.png")
    assert sheet.width == 4 * 160 and sheet.height == 3 * (160 + 56)  # 10 samples in 3 rows of 4


def test_easy_vqa_conversion(tmp_path, capsys):
    from data_pipelines.easy_vqa import _attributes

    assert _attributes([("what color is the shape?", "teal"), ("is there not a circle?", "yes")]) == (None, "teal")
    assert _attributes([("is there a circle?", "no"), ("does the image not contain a triangle?", "yes")]) == \
        ("rectangle", None)  # two of three shapes ruled out
    assert main(["data", "easy-vqa", "--out", str(tmp_path / "evqa")]) == 0
    assert "train: wrote 4000 samples" in capsys.readouterr().out
    found = read_back(tmp_path / "evqa" / "test")
    assert len(found) == 1000
    sample = found["000000000"]
    assert sample["caption"] == "a red triangle." and sample["meta"]["label_name"] == "triangle"
    qa = sample["meta"]["qa"]
    assert {q["type"] for q in qa} <= {"shape", "color", "yes/no"} and len(qa) >= 3
    total_qa = sum(len(v["meta"]["qa"]) for v in found.values())
    assert total_qa == 9673  # every test question is kept
