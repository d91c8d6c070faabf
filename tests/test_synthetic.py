"""Synthetic captioned scenes and the shard writer: determinism, format, captions, labels, QA."""

from __future__ import annotations

import io
import json
import re
import hashlib
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.shards import write_shards
from data_pipelines.synthetic import (
    ATTRIBUTE_NAMES,
    COLOR_NAMES,
    COLOR_RGB,
    COUNT_WORDS,
    LABEL_NAMES,
    POSITION_NAMES,
    QA_TYPES,
    SHAPE_NAMES,
    write_synthetic_shards,
)

N = 500


def read_samples(shards: list[str | Path]) -> dict[str, dict[str, bytes]]:
    """All samples of ``shards`` as ``{key: {ext: bytes}}``, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, dict[str, bytes]]]:
    summary = write_synthetic_shards(tmp_path_factory.mktemp("synthetic"), samples=N, shard_size=200, seed=0)
    return summary, read_samples(summary["shards"])


@pytest.fixture(scope="module")
def metas(dataset) -> list[dict]:
    _, samples = dataset
    return [json.loads(s["json"]) for _, s in sorted(samples.items())]


@pytest.fixture(scope="module")
def captions(dataset) -> list[str]:
    _, samples = dataset
    return [s["txt"].decode("utf-8") for _, s in sorted(samples.items())]


# ----------------------------------------------------------------------------- shards


def test_summary_shards_and_member_names(dataset):
    summary, samples = dataset
    assert summary["samples"] == N
    assert summary["label_names"] == list(LABEL_NAMES)
    assert [Path(p).name for p in summary["shards"]] == ["000000.tar", "000001.tar", "000002.tar"]
    sizes = [len(read_samples([p])) for p in summary["shards"]]
    assert sizes == [200, 200, 100]
    assert sorted(samples) == [f"{i:09d}" for i in range(N)]
    assert all(set(s) == {"png", "seg.png", "inst.png", "txt", "json"} for s in samples.values())
    assert not list(Path(summary["shards"][0]).parent.glob("*.tmp"))


def test_same_seed_byte_identical_and_independent_of_shard_size(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", samples=40, shard_size=15, seed=7)
    b = write_synthetic_shards(tmp_path / "b", samples=40, shard_size=15, seed=7)
    assert [Path(p).read_bytes() for p in a["shards"]] == [Path(p).read_bytes() for p in b["shards"]]
    c = write_synthetic_shards(tmp_path / "c", samples=40, shard_size=40, seed=7)
    assert read_samples(c["shards"]) == read_samples(a["shards"])
    d = write_synthetic_shards(tmp_path / "d", samples=40, shard_size=15, seed=8)
    sa, sd = read_samples(a["shards"]), read_samples(d["shards"])
    assert sum(sa[k]["png"] != sd[k]["png"] for k in sa) >= 38
    assert sum(sa[k]["txt"] != sd[k]["txt"] for k in sa) >= 38


@pytest.mark.parametrize("size", [64, 48])
def test_images_decode_rgb_at_requested_size(tmp_path, size):
    summary = write_synthetic_shards(tmp_path, samples=10, shard_size=10, image_size=size)
    for s in read_samples(summary["shards"]).values():
        img = Image.open(io.BytesIO(s["png"]))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (size, size)
        assert np.asarray(img).std() > 5  # not blank


def test_write_shards_contract(tmp_path):
    samples = [{"__key__": f"k{i}", "txt": f"caption {i}", "json": b"{}", "cls": "3"} for i in range(5)]
    shards = write_shards(samples, tmp_path / "out", shard_size=2, prefix="train-")
    paths = [sh.path for sh in shards]
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [sh.samples for sh in shards] == [2, 2, 1]
    assert all(sh.bytes == sh.path.stat().st_size and sh.sha256 == hashlib.sha256(sh.path.read_bytes()).hexdigest()
               for sh in shards)
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["k0.cls", "k0.json", "k0.txt", "k1.cls", "k1.json", "k1.txt"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o444 for m in members)
        assert tar.extractfile("k1.txt").read() == b"caption 1"
    again = write_shards(samples, tmp_path / "again", shard_size=2, prefix="train-")
    assert [p.read_bytes() for p in paths] == [sh.path.read_bytes() for sh in again]
    assert write_shards([], tmp_path / "empty") == []


@pytest.mark.parametrize("key", ["a.b", "dir/x", ""])
def test_write_shards_rejects_bad_key_and_leaves_no_tmp(tmp_path, key):
    samples = [{"__key__": "ok0", "txt": "x"}, {"__key__": "ok1", "txt": "x"}, {"__key__": key, "txt": "x"}]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        write_shards(samples, tmp_path, shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar"]  # the finished shard only


def test_write_shards_rejects_duplicates_and_non_bytes(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([{"__key__": "a", "txt": "x"}, {"__key__": "a", "txt": "y"}], tmp_path)
    with pytest.raises(TypeError, match="'cls'"):
        write_shards([{"__key__": "a", "cls": 3}], tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_webdataset_reads_shards_back(dataset):
    wds = pytest.importorskip("webdataset")
    summary, _ = dataset
    ds = wds.WebDataset(summary["shards"], shardshuffle=False, empty_check=False).decode("pil")
    seen = 0
    for sample in ds:
        assert {"png", "txt", "json"} <= set(sample)
        assert sample["png"].size == (64, 64)
        assert isinstance(sample["txt"], str) and sample["txt"]
        assert sample["json"]["label"] in range(len(LABEL_NAMES))
        seen += 1
    assert seen == N


# ----------------------------------------------------------------------------- content


def region_of(x: int, y: int, size: int = 64) -> str:
    return POSITION_NAMES[3 * min(3 * y // size, 2) + min(3 * x // size, 2)]


def test_objects_valid_and_drawn_where_metadata_says(dataset, metas):
    _, samples = dataset
    counts = Counter()
    for (key, s), meta in zip(sorted(samples.items()), metas):
        objs = meta["objects"]
        assert 1 <= len(objs) <= 4
        counts[len(objs)] += 1
        assert len({o["position"] for o in objs}) == len(objs)
        pixels = np.asarray(Image.open(io.BytesIO(s["png"]))).astype(int)
        for o in objs:
            assert o["shape"] in SHAPE_NAMES and o["color"] in COLOR_NAMES and o["size"] in ("small", "large")
            assert o["position"] == region_of(o["x"], o["y"]), key
            assert 0 <= o["x"] - o["px"] / 2 and o["x"] + o["px"] / 2 <= 64
            assert (o["px"] <= 16) == (o["size"] == "small") and 12 <= o["px"] <= 28
            rgb = pixels[o["y"], o["x"]]
            nearest = min(COLOR_NAMES, key=lambda c: np.abs(rgb - COLOR_RGB[c]).sum())
            assert nearest == o["color"], (key, o, rgb)
    assert set(counts) == {1, 2, 3, 4}


def test_caption_mentions_every_object_and_background(metas, captions):
    for meta, caption in zip(metas, captions):
        words = caption.lower()
        assert meta["background"]["color"] in words
        for o in meta["objects"]:
            assert re.search(rf"\b{o['color']} {o['shape']}s?\b", words), (caption, o)
            pos = o["position"]
            assert pos in words or (pos == "center" and "middle" in words), (caption, o)
        assert len({(o["color"], o["shape"]) for o in meta["objects"]}) == len(
            re.findall(rf"\b(?:{'|'.join(COLOR_NAMES)}) (?:{'|'.join(SHAPE_NAMES)})s?\b", words))
    assert len(set(captions)) == len(captions)
    assert len({c.split()[0] for c in captions}) >= 4  # varied templates


def test_labels_in_range_match_largest_object_and_cover_all_classes(metas):
    for meta in metas:
        largest = max(meta["objects"], key=lambda o: o["px"])
        assert sum(o["px"] == largest["px"] for o in meta["objects"]) == 1
        assert meta["label"] == SHAPE_NAMES.index(largest["shape"]) and meta["label_name"] == largest["shape"]
        labels = meta["labels"]
        assert set(labels) == set(ATTRIBUTE_NAMES)
        assert labels["shape"] == meta["label"]
        assert labels["color"] == COLOR_NAMES.index(largest["color"])
        assert labels["count"] == len(meta["objects"]) - 1
        assert labels["bg"] == ATTRIBUTE_NAMES["bg"].index(meta["background"]["color"])
        for name, classes in ATTRIBUTE_NAMES.items():
            assert 0 <= labels[name] < len(classes)
    for name, classes in ATTRIBUTE_NAMES.items():
        dist = Counter(m["labels"][name] for m in metas)
        assert set(dist) == set(range(len(classes))), (name, dist)
        assert max(dist.values()) < 0.5 * len(metas), (name, dist)


def _expected_answer(question: str, objs: list[dict]) -> str:
    """Recompute an answer from the object list; fails if the question is ambiguous."""
    def one(match) -> dict:
        assert len(match) == 1, (question, objs)
        return match[0]

    def at(phrase: str) -> list[dict]:
        phrase = phrase.replace(" corner", "").replace(" side", "").replace("middle", "center")
        return [o for o in objs if o["position"] == phrase]

    if m := re.fullmatch(r"How many (shapes are there|objects are in the image)\?", question):
        return COUNT_WORDS[len(objs)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return COUNT_WORDS[sum(o["color"] == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return COUNT_WORDS[sum(o["shape"] == m[1] for o in objs)]
    if m := re.fullmatch(r"(?:Is there|Does the image contain) an? (\w+) (\w+)(?: in the picture)?\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"What color is the shape (?:in|at|on|near|along) the ([\w ]+)\?", question):
        return one(at(m[1]))["color"]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return one([o for o in objs if o["shape"] == m[1]])["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return one([o for o in objs if o["color"] == m[1]])["shape"]
    if m := re.fullmatch(r"What shape is (?:in|at|on|near|along) the ([\w ]+)\?", question):
        return one(at(m[1]))["shape"]
    if m := re.fullmatch(r"Where is the (\w+) object\?", question):
        return one([o for o in objs if o["color"] == m[1]])["position"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        return one([o for o in objs if o["color"] == m[1] and o["shape"] == m[2]])["position"]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return one([o for o in objs if o["shape"] == m[1]])["position"]
    raise AssertionError(f"unrecognised question: {question}")


def test_qa_answers_consistent_with_objects_and_balanced(metas):
    types, yes_no = Counter(), Counter()
    for meta in metas:
        qa = meta["qa"]
        assert 3 <= len(qa) <= 6
        assert len({q["question"] for q in qa}) == len(qa)
        assert {"count", "yes/no"} <= {q["type"] for q in qa}
        for q in qa:
            assert q["type"] in QA_TYPES
            assert q["answer"] == _expected_answer(q["question"], meta["objects"]), q
            types[q["type"]] += 1
            if q["type"] == "yes/no":
                yes_no[q["answer"]] += 1
            if q["type"] == "position":
                assert q["answer"] in POSITION_NAMES
    assert set(types) == set(QA_TYPES)
    assert set(yes_no) == {"yes", "no"}
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6, yes_no
