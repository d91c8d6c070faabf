import random
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import (
    DataError, LoaderSpec, SkipTracker, make_loader, normalize, random_resized_crop_box, resolve_shards,
)
from tests.conftest import labelled_members, png_bytes, write_tar


def keys_of(loader, max_batches=None):
    keys, tracker = [], SkipTracker()
    for i, batch in enumerate(loader):
        keys += batch["keys"]
        tracker.update(batch["skipped"])
        if max_batches and i + 1 >= max_batches:
            break
    return keys, tracker


def test_resolve_shards_forms(tiny_shards: Path, tmp_path: Path):
    assert [Path(u).name for u in resolve_shards(str(tiny_shards))] == ["000000.tar", "000001.tar"]
    assert len(resolve_shards(f"{tiny_shards}/{{000000..000001}}.tar")) == 2
    listing = tmp_path / "list.txt"
    listing.write_text("shards/000001.tar\n# comment\n")
    assert resolve_shards(str(listing)) == [str(tmp_path / "shards/000001.tar")]


def test_resolve_shards_errors(tmp_path: Path):
    with pytest.raises(DataError, match="not set"):
        resolve_shards("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards in directory"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"000008.tar does not exist"):
        resolve_shards(f"{tmp_path}/{{000008..000009}}.tar")
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(DataError, match="zero.tar is empty"):
        resolve_shards(str(tmp_path / "zero.tar"), key="data.val")


def test_eval_loader_reads_each_sample_once(tiny_shards: Path):
    urls = resolve_shards(str(tiny_shards))
    keys, tracker = keys_of(make_loader(LoaderSpec(urls, 5, 16, train=False)))
    assert sorted(keys) == [f"{i:06d}" for i in range(24)]
    assert tracker.total == 0


def test_eval_loader_split_over_ranks_and_workers(tiny_shards: Path):
    urls = resolve_shards(str(tiny_shards))
    seen = []
    for rank in range(2):
        keys, _ = keys_of(make_loader(LoaderSpec(urls, 4, 16, train=False, rank=rank, world_size=2, workers=1)))
        seen += keys
    assert sorted(seen) == [f"{i:06d}" for i in range(24)]


def test_train_loader_batches_and_determinism(tiny_shards: Path):
    urls = resolve_shards(str(tiny_shards))
    spec = LoaderSpec(urls, 8, 16, seed=3, shuffle_buffer=10)
    batch = next(iter(make_loader(spec)))
    assert batch["images"].shape == (8, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert len(batch["captions"]) == 8 and all("square" in c for c in batch["captions"])
    assert all(m["label"] in (0, 1, 2) for m in batch["meta"])
    a, _ = keys_of(make_loader(spec), 6)
    b, _ = keys_of(make_loader(spec), 6)
    c, _ = keys_of(make_loader(LoaderSpec(urls, 8, 16, seed=4, shuffle_buffer=10)), 6)
    assert a == b and a != c
    assert len(a) == 48  # infinite: more samples than the data set holds


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path):
    members = labelled_members(0, 6)
    members += [("bad1.png", b"not a png at all"), ("bad1.txt", b"broken image")]
    members += [("bad2.png", png_bytes((1, 2, 3))), ("bad2.json", b"{not json")]
    members += [("bad3.txt", b"caption without an image")]
    members += [("bad4.png", png_bytes((1, 2, 3))), ("bad4.txt", b"\xff\xfe invalid utf-8")]
    write_tar(tmp_path / "000000.tar", members)
    # a truncated shard: valid header of a member whose data is cut off
    good = tmp_path / "000001.tar"
    write_tar(good, labelled_members(100, 4))
    data = good.read_bytes()  # 3 members of 512 B header + 512 B data per sample
    (tmp_path / "000002.tar").write_bytes(data[: 3072 * 2 + 512 + 50])  # cut inside sample 2's png
    good.unlink()
    urls = resolve_shards(str(tmp_path))
    with pytest.warns(UserWarning, match="skipped sample"):
        keys, tracker = keys_of(make_loader(LoaderSpec(urls, 2, 16, train=False)))
    assert set(keys) >= {f"{i:06d}" for i in range(6)}
    assert not any(k.startswith("bad") for k in keys)
    counts = tracker.counts
    assert counts["decode_error"] == 4  # bad1..bad4, each named in a warning
    assert counts["tar_error"] == 1  # the truncated shard, counted once
    assert {"000100", "000101"} <= set(keys)  # its samples before the cut still arrive


def test_random_resized_crop_box_in_bounds():
    rng = random.Random(0)
    for _ in range(200):
        l, t, r, b = random_resized_crop_box(rng, 64, 48, (0.3, 1.0))
        assert 0 <= l < r <= 64 and 0 <= t < b <= 48
        assert (r - l) * (b - t) >= 0.25 * 64 * 48


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize(x)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_stream_of_only_broken_samples_is_an_error(tmp_path: Path, monkeypatch):
    import data_pipelines.loader as loader

    monkeypatch.setattr(loader, "MAX_SKIPS_BEFORE_FIRST", 5)
    write_tar(tmp_path / "000000.tar", [(f"{i:03d}.png", b"garbage") for i in range(10)])
    urls = resolve_shards(str(tmp_path))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="all failed to decode"):
        next(iter(make_loader(LoaderSpec(urls, 2, 16, train=True))))
