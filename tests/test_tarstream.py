"""The fast tar reader gives exactly what webdataset gives, and fails per shard with a clear error."""

import io
import tarfile
from pathlib import Path

import pytest

from data_pipelines.tarstream import TarError, iter_members, iter_samples, read_sample, split_name
from tests.conftest import labelled_members, write_tar


def wds_samples(urls):
    import webdataset as wds

    out = []
    for s in wds.tarfile_to_samples()(iter({"url": u} for u in urls)):
        s.pop("__local_path__", None)
        out.append(s)
    return out


def test_same_samples_as_webdataset(tmp_path: Path):
    write_tar(tmp_path / "a.tar", labelled_members(0, 5))
    long_key = "x" * 150  # > 100 characters: pax (default) and GNU long-name headers
    for fmt, name in ((tarfile.PAX_FORMAT, "pax.tar"), (tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.USTAR_FORMAT, "ustar.tar")):
        key = long_key if fmt != tarfile.USTAR_FORMAT else "deep/" * 30 + "k"  # ustar: a long path via prefix
        with tarfile.open(tmp_path / name, "w", format=fmt) as tar:
            for ext, data in (("jpg", b"\xff\xd8 image"), ("TXT", b"caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("__index__")  # no extension: not a sample member
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    urls = [str(tmp_path / n) for n in ("a.tar", "pax.tar", "gnu.tar", "ustar.tar")]
    ours = [{k: v for k, v in x.items() if k not in ("__offset__", "__next__")} for x in iter_samples(urls, lambda e: False)]
    assert ours == wds_samples(urls)
    assert len(ours) == 8 and ours[5]["__key__"] == long_key and ours[5]["txt"] == b"caption"
    assert ours[7]["__key__"] == "deep/" * 30 + "k"


def test_split_name():
    assert split_name("dir/KEY.seg.png") == ("dir/KEY", "seg.png")
    assert split_name("a.b/KEY.jpg") == ("a.b/KEY", "jpg")
    assert split_name("README") is None


def test_truncated_and_corrupt_shards_yield_what_is_complete(tmp_path: Path):
    good = write_tar(tmp_path / "good.tar", labelled_members(0, 4))
    data = good.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 3072 * 2 + 512 + 50])  # inside sample 2's first member
    corrupt = bytearray(data)
    corrupt[3072 + 10] ^= 0xFF  # sample 1's first header: checksum mismatch
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    errors = []
    samples = list(iter_samples([str(tmp_path / n) for n in ("cut.tar", "corrupt.tar", "good.tar")],
                                lambda e: errors.append(e) or True))
    keys = [s["__key__"] for s in samples]
    assert keys == ["000000", "000001", "000000", "000000", "000001", "000002", "000003"]
    assert [type(e) for e in errors] == [TarError, TarError]
    assert "cut.tar: member at byte 6144 is truncated" in str(errors[0])
    assert "corrupt.tar: bad header checksum at byte 3072" in str(errors[1])
    with pytest.raises(TarError, match="truncated"):
        list(iter_samples([str(tmp_path / "cut.tar")], lambda e: False))


def test_members_of_an_empty_archive(tmp_path: Path):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with open(tmp_path / "empty.tar", "rb") as f:
        assert list(iter_members(f)) == []


def test_offsets_reread_a_sample_and_continue_a_shard(tmp_path: Path):
    with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # long names: pax headers
        for i in range(5):
            for ext in ("png", "txt"):
                data = f"{i}-{ext}".encode()
                info = tarfile.TarInfo(f"{'k' * 120}{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    url = str(tmp_path / "a.tar")
    samples = list(iter_samples([url], lambda e: False))
    assert [s["txt"] for s in samples] == [f"{i}-txt".encode() for i in range(5)]
    for s in samples:
        again = read_sample(url, s["__offset__"])
        assert again["__key__"] == s["__key__"] and again["png"] == s["png"]
    rest = list(iter_samples([url], lambda e: False, start=samples[1]["__next__"]))
    assert [s["__key__"] for s in rest] == [s["__key__"] for s in samples[2:]]
    assert list(iter_samples([url], lambda e: False, start=samples[-1]["__next__"])) == []
