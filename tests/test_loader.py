import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path: Path):
    members = labelled_members(0, 6)
    members += [("badimg.jpg", b"not a jpeg at all"), ("badimg.txt", b"text bytes named .jpg")]
    members += [("empty.jpg", b""), ("empty.txt", b"zero-byte image")]
    members += [("badjson.png", png_bytes((1, 2, 3))), ("badjson.json", b"{not json")]
    members += [("listjson.png", png_bytes((1, 2, 3))), ("listjson.json", b"[1, 2]")]
    members += [("noimage.txt", b"caption without an image")]
    members += [("badtext.png", png_bytes((1, 2, 3))), ("badtext.txt", b"\xff\xfe invalid utf-8")]
    members += [("huge.png", png_bytes((1, 2, 3))), ("huge.txt", b"word " * 20000)]
    members += [("nocaption.png", png_bytes((1, 2, 3)))]  # kept: captions are not required by default
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
    assert set(keys) == {f"{i:06d}" for i in range(6)} | {"000100", "000101", "nocaption"}
    assert tracker.counts == {
        "bad_image": 1, "empty_image": 1, "bad_json": 2, "missing_image": 1, "bad_text": 1,
        "huge_caption": 1, "tar_error": 1,
    }
    assert tracker.delivered == len(keys)


def test_required_captions_skip_samples_without_one(tmp_path: Path):
    members = labelled_members(0, 3) + [("nocap.png", png_bytes((1, 2, 3))), ("blank.png", png_bytes((1, 2, 3))),
                                        ("blank.txt", b"   \n")]
    write_tar(tmp_path / "000000.tar", members)
    spec = LoaderSpec(resolve_shards(str(tmp_path)), 2, 16, train=False, require_caption=True)
    with pytest.warns(UserWarning, match="missing_caption"):
        keys, tracker = keys_of(make_loader(spec))
    assert sorted(keys) == ["000000", "000001", "000002"] and tracker.counts == {"missing_caption": 2}


def test_caption_list_in_json_picks_one(tmp_path: Path):
    options = ["a red square", "a crimson box", "red on black"]
    members = [(f"{i:03d}.png", png_bytes((200, 0, 0))) for i in range(40)]
    members += [(f"{i:03d}.json", json.dumps({"captions": options}).encode()) for i in range(40)]
    members += [(f"{i:03d}.txt", b"ignored when the json has a list") for i in range(40)]
    write_tar(tmp_path / "000000.tar", sorted(members))
    urls = resolve_shards(str(tmp_path))
    evals = next(iter(make_loader(LoaderSpec(urls, 40, 16, train=False))))["captions"]
    assert evals == [options[0]] * 40  # evaluation: deterministic, the first
    train = next(iter(make_loader(LoaderSpec(urls, 40, 16, seed=1, shuffle_buffer=1))))["captions"]
    assert set(train) == set(options)  # training: one at random per sample


@pytest.mark.parametrize("n_shards,world,workers", [(1, 1, 2), (2, 2, 2), (3, 2, 1), (5, 2, 2)])
def test_eval_mode_reads_each_sample_exactly_once_across_ranks_and_workers(tmp_path, n_shards, world, workers):
    per = 7
    for k in range(n_shards):
        write_tar(tmp_path / f"{k:06d}.tar", labelled_members(k * per, per))
    urls = resolve_shards(str(tmp_path))
    seen = []
    for rank in range(world):
        keys, _ = keys_of(make_loader(LoaderSpec(urls, 3, 16, train=False, rank=rank, world_size=world, workers=workers)))
        seen += keys
    assert sorted(seen) == [f"{i:06d}" for i in range(n_shards * per)]  # the union is the data set, no repeats


def test_eval_partition_is_a_partition():
    from data_pipelines.loader import eval_partition

    per_shard = 5
    for n_shards in range(1, 9):
        for world, workers in [(1, 1), (1, 3), (2, 2), (4, 1)]:
            taken = []  # (shard, sample) pairs each reader keeps
            for rank in range(world):
                for w in range(workers):
                    shards, stride, offset = eval_partition(n_shards, rank, world, w, workers)
                    stream = [(k, j) for k in list(range(n_shards))[shards] for j in range(per_shard)]
                    taken += [x for i, x in enumerate(stream) if i % stride == offset]
            assert sorted(taken) == [(k, j) for k in range(n_shards) for j in range(per_shard)]


def test_skip_rate_limit(tmp_path: Path):
    members = labelled_members(0, 18) + [(f"bad{i}.png", b"junk") for i in range(2)]
    write_tar(tmp_path / "000000.tar", members)
    urls = resolve_shards(str(tmp_path))
    with pytest.warns(UserWarning):
        _, tracker = keys_of(make_loader(LoaderSpec(urls, 4, 16, train=False)))
    assert tracker.total == 2 and tracker.delivered == 18
    tracker.check_rate(0.2, 10, "data.train x")  # 10% skipped: under a 20% limit
    tracker.check_rate(0.05, 100, "data.train x")  # under the minimum sample count: not judged yet
    with pytest.raises(DataError, match=r"data.train x: 2 of 20 samples \(10.0%\) were skipped.*bad_image: 2"):
        tracker.check_rate(0.05, 10, "data.train x")
    tracker.check_rate(1.0, 1, "data.train x")  # 1 disables


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


def test_jpeg_draft_decodes_large_images_at_reduced_scale():
    from data_pipelines.loader import decode_sample, draft_side

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((1024, 768), Image.BICUBIC).save(buf, format="JPEG", quality=92)
    raw = {"__key__": "k", "jpg": buf.getvalue(), "txt": b"big"}
    full = decode_sample(raw)["image"]
    small = decode_sample(raw, min_side=150)["image"]
    assert full.size == (1024, 768) and small.size == (256, 192)  # 1/4 scale: the last with both sides >= 150
    a = np.asarray(full.resize((64, 48), Image.BICUBIC), dtype=np.float32)
    b = np.asarray(small.resize((64, 48), Image.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 2.0  # the same picture at the size the model sees
    assert draft_side(LoaderSpec([], 1, 224, train=False)) == 224
    assert draft_side(LoaderSpec([], 1, 224, crop_scale=(0.3, 1.0))) == 473  # 224 / sqrt(0.3 * 3/4)


def test_loader_tokenizes_in_workers_and_dropout_matches(tiny_shards: Path):
    from data_pipelines.tokenizers import OpenCLIPTokenizer, drop_captions

    tok = OpenCLIPTokenizer(16)
    urls = resolve_shards(str(tiny_shards))
    batch = next(iter(make_loader(LoaderSpec(urls, 6, 16, train=False, workers=1, tokenizer=tok))))
    expected = tok(batch["captions"])
    assert torch.equal(batch["tokens"].ids, expected.ids) and torch.equal(batch["tokens"].mask, expected.mask)
    drop = torch.tensor([True, False, True, False, False, False])
    dropped = drop_captions(batch["tokens"], drop, tok([""]))
    reference = tok(["" if d else c for c, d in zip(batch["captions"], drop.tolist())])
    assert torch.equal(dropped.ids, reference.ids) and torch.equal(dropped.mask, reference.mask)
    assert torch.equal(dropped.has_text, reference.has_text)
