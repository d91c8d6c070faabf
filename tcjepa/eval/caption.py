"""``tcjepa eval caption``: image captioning by a text decoder on the frozen encoder (CIDEr-D, BLEU-4).

The TC-JEPA paper's protocol, a LiT-style decoder: the run's image encoder is frozen and its patch
features are computed once per image; a transformer decoder (token embedding and learned
positions, then pre-norm blocks of causal self-attention, cross-attention to the projected patch
features and an MLP) learns to write the train split's captions with teacher forcing. Every
caption of a sample (KEY.txt, then KEY.json ``captions``, as training reads them) is a training
sequence. The decoder then writes one caption per val image, greedily (``caption.beam_size`` 1)
or by beam search, scored against all of the image's captions with CIDEr-D and BLEU-4 by
pycocoevalcap's scorers (those of the COCO caption evaluation; ``pip install 'tcjepa[caption]'``).

Scoring tokenisation (:func:`score_tokens`): COCO's PTBTokenizer needs Java, so candidates and
references are lower-cased, every run of characters that are not letters or digits becomes one
space (punctuation is dropped, "top-left" becomes "top left") and the text is split on
whitespace. Scores compare between runs scored here, not with published COCO numbers.

``blind_cider`` and ``blind_bleu4`` come from the same decoder trained and scored on zeroed image
features: a language model of the train captions. The image is worth what the decoder scores
above it.

Captions are tokenized with the run's caption tokenizer (open_clip's BPE for runs without one, as
``eval vqa`` picks it). The decoder's embedding and output layer hold only the tokens of the
train captions, plus five markers (padding, begin, end, unknown, and the separator of generative
VQA), not the tokenizer's whole table; generated ids become text through the tokenizer's
``decode``. A caption longer than ``caption.context_length`` - 2 tokens is cut (and counted,
``captions_cut``).

The defaults are a small decoder that trains in minutes on CPU at the quickstart scale; the
paper's 12-layer decoder is :data:`PAPER_DECODER`, i.e. ``--set caption.depth=12
caption.width=768 caption.heads=12 caption.mlp_ratio=4``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.loader import DataError
from tcjepa.config import ENCODER_CHOICES_TEXT, EVAL_ENCODERS, ConfigError, to_dict
from tcjepa.eval.common import default_device, eval_stem, plot_dir, result_dict, run_description, write_result
from tcjepa.models.attention import attention
from tcjepa.models.vit import MLP, init_weights

if TYPE_CHECKING:
    from data_pipelines.tokenizers import Tokenizer
    from tcjepa.config import Config
    from tcjepa.eval.probe import Features

PAD, BOS, EOS, UNK, SEP = 0, 1, 2, 3, 4  # the decoder's markers; tokens of the train texts follow
NUM_MARKERS = 5
NOT_GENERATED = (PAD, BOS, UNK, SEP)  # never a decoded token (after the end marker, padding follows)
MAX_CAPTIONS = 1000  # references read per sample: all of them, in practice
NUM_EXAMPLES = 8  # val samples whose captions go into the result


@dataclass
class CaptionConfig:
    depth: int = 2  # decoder blocks: causal self-attention, cross-attention to the patches, MLP
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 48  # decoder positions: begin marker, caption tokens, end marker
    epochs: int = 6  # passes over every train caption
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64  # captions per step (every caption of the images drawn); images per decoding batch
    beam_size: int = 1  # 1: greedy decoding
    max_samples: int = 0  # images read per split (0: all)
    encoder: str = "auto"  # auto | teacher | student | init (as probe.encoder)
    seed: int = 0
    blind_baseline: bool = True  # also train and score the decoder on zeroed image features
    plot_samples: int = 4  # val images drawn with their generated and reference captions


# The paper's decoder: 12 blocks at ViT-B width (--set caption.depth=12 caption.width=768
# caption.heads=12 caption.mlp_ratio=4). Training settings stay the defaults.
PAPER_DECODER: dict[str, Any] = {"depth": 12, "width": 768, "heads": 12, "mlp_ratio": 4.0}


def check_config(cfg: CaptionConfig) -> None:
    if min(cfg.depth, cfg.width, cfg.heads, cfg.epochs, cfg.batch_size, cfg.beam_size) < 1:
        raise ConfigError("caption.depth, caption.width, caption.heads, caption.epochs, caption.batch_size and "
                          "caption.beam_size must be >= 1")
    if cfg.width % cfg.heads:
        raise ConfigError(f"caption.heads {cfg.heads} must divide caption.width {cfg.width}")
    if cfg.context_length < 3:
        raise ConfigError(f"caption.context_length must be >= 3 (begin, a token, end), got {cfg.context_length}")
    if cfg.mlp_ratio <= 0 or cfg.lr <= 0 or cfg.weight_decay < 0 or min(cfg.max_samples, cfg.plot_samples) < 0:
        raise ConfigError("caption.mlp_ratio and caption.lr must be > 0, caption.weight_decay, caption.max_samples "
                          "and caption.plot_samples >= 0")
    if cfg.encoder not in EVAL_ENCODERS:
        raise ConfigError(f"caption.encoder {ENCODER_CHOICES_TEXT}, got {cfg.encoder!r}")


def require_scorers() -> None:
    """Before any model work: the CIDEr and BLEU scorers are importable."""
    import importlib

    try:
        for module in ("pycocoevalcap.bleu.bleu", "pycocoevalcap.cider.cider"):
            importlib.import_module(module)
    except ImportError as e:
        raise ConfigError("eval caption scores with pycocoevalcap (CIDEr-D, BLEU-4), which is not installed: "
                          "pip install 'tcjepa[caption]'") from e


def require_captions(shards: str, data_key: str) -> None:
    """Before any model or image: the first samples of ``shards`` have captions."""
    from tcjepa.eval.peek import peek, require

    look = peek(shards, data_key)
    in_json = any(isinstance(m.get("captions"), list) and any(isinstance(c, str) and c.strip() for c in m["captions"])
                  for m in look.metas)
    require(bool(look.captions) or in_json, look, data_key,
            f"none of the first {len(look.metas)} samples of {shards} has a caption (KEY.txt or KEY.json 'captions')")


# ----------------------------------------------------------------------------- scoring


def score_tokens(text: str) -> str:
    """The text as the scorers see it: lower case, each run of characters that are not letters or
    digits one space (punctuation dropped), words joined by single spaces."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """CIDEr-D and BLEU-4 of one candidate per image against that image's references (each a
    non-empty list), both over the whole set, after :func:`score_tokens`; and CIDEr-D per image."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    res = {i: [score_tokens(c)] for i, c in enumerate(candidates)}
    gts = {i: [score_tokens(r) for r in refs] for i, refs in enumerate(references)}
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "per_image_cider": [float(c) for c in per_image]}


# ----------------------------------------------------------------------------- tokens


def caption_tokenizer(run_cfg: Config, context_length: int) -> Tokenizer:
    """The run's caption tokenizer (open_clip's BPE for runs without one), as ``eval vqa`` picks it."""
    from data_pipelines.tokenizers import build_tokenizer
    from tcjepa.config import resolved_tokenizer

    kind, path = resolved_tokenizer(run_cfg.conditioner)
    try:
        return build_tokenizer(kind, path, context_length)
    except FileNotFoundError as e:
        raise ConfigError(f"the run's caption tokenizer ({kind}): {e}") from e


def content_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids without padding and without the markers the tokenizer puts around
    every text (its tokens of the empty text: begin/end of text, CLS/SEP, ...)."""
    empty = tokenizer([""])
    markers = set(empty.ids[0][empty.mask[0]].tolist())
    t = tokenizer(list(texts))
    return [[i for i in row[m].tolist() if i not in markers] for row, m in zip(t.ids, t.mask)]


@dataclass
class Vocab:
    """The decoder's ids: the markers, then the tokenizer ids of the train texts (``tokens``)."""

    tokens: list[int]
    index: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {t: i + NUM_MARKERS for i, t in enumerate(self.tokens)}

    @classmethod
    def of(cls, sequences: Sequence[Sequence[int]]) -> "Vocab":
        return cls(sorted({t for s in sequences for t in s}))

    def __len__(self) -> int:
        return NUM_MARKERS + len(self.tokens)

    def encode(self, ids: Sequence[int]) -> list[int]:
        return [self.index.get(i, UNK) for i in ids]

    def tokenizer_ids(self, ids: Sequence[int]) -> list[int]:
        """Decoder ids -> tokenizer ids; markers are left out."""
        return [self.tokens[i - NUM_MARKERS] for i in ids if i >= NUM_MARKERS]


@dataclass
class Sequences:
    """Decoder sequences (right-padded decoder ids [S, L]), the row of the split's features each
    one describes (``image`` [S]) and where its scored part starts: the loss is on the tokens
    after position ``loss_from`` [S] (0 for a caption, the separator for a VQA answer)."""

    ids: torch.Tensor
    image: torch.Tensor
    loss_from: torch.Tensor


def pad_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def caption_sequences(token_lists: Sequence[Sequence[int]], image: Sequence[int], vocab: Vocab,
                      context_length: int) -> tuple[Sequences, int]:
    """``[BOS] caption [EOS]`` per caption, cut to ``context_length``; and how many were cut."""
    keep = context_length - 2
    rows = [[BOS, *vocab.encode(t[:keep]), EOS] for t in token_lists]
    cut = sum(len(t) > keep for t in token_lists)
    return Sequences(pad_rows(rows), torch.tensor(image, dtype=torch.long), torch.zeros(len(rows), dtype=torch.long)), cut


# ----------------------------------------------------------------------------- the decoder


def causal_mask(past: int, new: int, device: torch.device) -> torch.Tensor | None:
    """[new, past + new]: token ``past + i`` sees the keys up to itself (None: one token sees all)."""
    if new == 1:
        return None
    return torch.arange(past + new, device=device)[None] <= (past + torch.arange(new, device=device))[:, None]


KV = tuple[torch.Tensor, torch.Tensor]  # keys and values [B, heads, N, head_dim]


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention (with a key/value cache for decoding), cross-attention to the
    image, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.cross_proj = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def image_kv(self, image: torch.Tensor) -> KV:
        """Keys and values of the projected patch features [M, N, C], computed once per image."""
        M, N, C = image.shape
        k, v = self.kv(image).view(M, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, image: KV, cache: KV | None) -> tuple[torch.Tensor, KV]:
        """``x`` [B, T, C]: the tokens after those in ``cache``; returns them and the new cache."""
        B, T, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        mask = causal_mask(k.size(2) - T, T, x.device)
        x = x + self.proj(attention(q, k, v, mask).transpose(1, 2).reshape(B, T, C))
        q = self.q(self.norm2(x)).view(B, T, h, C // h).transpose(1, 2)
        x = x + self.cross_proj(attention(q, *image).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm3(x)), (k, v)


class TextDecoder(nn.Module):
    """Decoder ids [B, T] and the images' keys/values (:meth:`image_memory`) -> next-token logits
    [B, T, V]; the same pass, fed one token at a time with its cache, decodes."""

    def __init__(self, vocab_size: int, image_dim: int, num_patches: int, cfg: CaptionConfig):
        super().__init__()
        w = cfg.width
        self.token_embed = nn.Embedding(vocab_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, w))
        self.image_proj = nn.Sequential(nn.LayerNorm(image_dim, eps=1e-6), nn.Linear(image_dim, w))
        self.image_pos = nn.Parameter(torch.zeros(1, num_patches, w))
        self.blocks = nn.ModuleList(DecoderBlock(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.head = nn.Linear(w, vocab_size)
        init_weights(self, 0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.image_pos, std=0.02)

    def image_memory(self, image: torch.Tensor, index: torch.Tensor | None = None) -> list[KV]:
        """Per block, the keys/values of patch features [M, N, D] for each sequence: row
        ``index[i]`` for sequence i (several captions share one image's projection)."""
        img = self.image_proj(image) + self.image_pos
        kvs = [block.image_kv(img) for block in self.blocks]
        return kvs if index is None else [(k[index], v[index]) for k, v in kvs]

    def forward(self, ids: torch.Tensor, memory: list[KV], cache: list[KV] | None = None
                ) -> tuple[torch.Tensor, list[KV]]:
        past = 0 if cache is None else cache[0][0].size(2)
        if past + ids.size(1) > self.pos_embed.size(1):
            raise ValueError(f"{past + ids.size(1)} tokens exceed the decoder's {self.pos_embed.size(1)} positions")
        x = self.token_embed(ids) + self.pos_embed[:, past : past + ids.size(1)]
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, memory[i], None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(self.norm(x)), new_cache


# ----------------------------------------------------------------------------- training


def decoder_loss(model: TextDecoder, seqs: Sequences, image: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of ``seqs`` (on ``image`` rows ``where``), on the tokens after
    each sequence's ``loss_from``."""
    ids = seqs.ids[:, : int((seqs.ids != PAD).sum(1).max())]  # drop columns that are padding everywhere
    targets = ids[:, 1:].clone()
    before = torch.arange(targets.size(1), device=ids.device)[None] < seqs.loss_from[:, None]
    targets[before | (targets == PAD)] = -100
    logits, _ = model(ids[:, :-1], model.image_memory(image, where))
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def subset(seqs: Sequences, idx: torch.Tensor, device: torch.device | str) -> Sequences:
    return Sequences(seqs.ids[idx].to(device), seqs.image[idx], seqs.loss_from[idx].to(device))


def train_decoder(seqs: Sequences, feats: torch.Tensor, vocab_size: int, cfg: CaptionConfig,
                  device: torch.device | str, blind: bool = False, progress: bool = False,
                  desc: str = "caption decoder") -> TextDecoder:
    """Fit a :class:`TextDecoder` to ``seqs`` on patch features ``feats`` [N, P, D] (``blind``:
    zeroed): AdamW, warmup then cosine, each step on every sequence of a batch of images."""
    from tqdm.auto import trange

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = TextDecoder(vocab_size, feats.size(-1), feats.size(1), cfg).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr)
    images = torch.unique(seqs.image)
    per_batch = max(1, round(cfg.batch_size * len(images) / len(seqs.image)))  # images per step: ~batch_size sequences
    steps = cfg.epochs * math.ceil(len(images) / per_batch)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for _ in trange(cfg.epochs, desc=desc + (" (blind)" if blind else ""), unit="epoch", disable=not progress):
        order = images[torch.randperm(len(images), generator=g)]
        for i in range(0, len(order), per_batch):
            idx = torch.isin(seqs.image, order[i : i + per_batch]).nonzero().squeeze(1)
            rows, where = torch.unique(seqs.image[idx], return_inverse=True)
            image = feats[rows].to(device).float()
            loss = decoder_loss(model, subset(seqs, idx, device), torch.zeros_like(image) if blind else image,
                                where.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ----------------------------------------------------------------------------- decoding


def next_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token [B, V] over the tokens a decoder may write."""
    logits = logits[:, -1].float().clone()
    logits[:, list(NOT_GENERATED)] = float("-inf")
    return logits.log_softmax(-1)


def until_end(row: Sequence[int]) -> list[int]:
    """The generated ids before the end marker."""
    out = []
    for t in row:
        if t == EOS:
            break
        if t != PAD:
            out.append(t)
    return out


@torch.no_grad()
def greedy_decode(model: TextDecoder, memory: list[KV], prefix: torch.Tensor, max_new: int
                  ) -> tuple[list[list[int]], torch.Tensor]:
    """The most likely next token, one at a time, after ``prefix`` [B, T] (on ``memory``, one row
    per sequence), up to the end marker or ``max_new`` tokens; returns the tokens and their
    summed log-probability (the end marker's included)."""
    logits, cache = model(prefix, memory)
    B = prefix.size(0)
    out = torch.full((B, max_new), PAD, dtype=torch.long, device=prefix.device)
    score = torch.zeros(B, device=prefix.device)
    done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
    for t in range(max_new):
        logp = next_logprobs(logits)
        token = logp.argmax(1)
        score += torch.where(done, 0.0, logp.gather(1, token[:, None]).squeeze(1))
        out[:, t] = torch.where(done, PAD, token)
        done |= token == EOS
        if bool(done.all()) or t == max_new - 1:
            break
        logits, cache = model(token[:, None], memory, cache)
    return [until_end(row) for row in out.tolist()], score


@torch.no_grad()
def beam_decode(model: TextDecoder, memory: list[KV], prefix: torch.Tensor, max_new: int, beam: int
                ) -> tuple[list[list[int]], torch.Tensor]:
    """Beam search (``beam`` hypotheses per sequence, scored by summed log-probability, no length
    normalisation; a finished hypothesis keeps its score), batched over the sequences of
    ``prefix`` [B, T]; returns the best hypothesis of each and its score."""
    B, k = prefix.size(0), beam
    rows = torch.arange(B, device=prefix.device).repeat_interleave(k)
    memory = [(key[rows], value[rows]) for key, value in memory]
    logits, cache = model(prefix[rows], memory)
    score = torch.full((B, k), float("-inf"), device=prefix.device)
    score[:, 0] = 0.0  # the k copies start alike: expand only the first
    seqs = torch.empty(B * k, 0, dtype=torch.long, device=prefix.device)
    done = torch.zeros(B * k, dtype=torch.bool, device=prefix.device)
    base = torch.arange(B, device=prefix.device)[:, None] * k
    for t in range(max_new):
        logp = next_logprobs(logits)
        V = logp.size(1)
        ended = torch.full((V,), float("-inf"), device=logp.device)
        ended[PAD] = 0.0  # a finished hypothesis continues with padding, at no cost
        logp = torch.where(done[:, None], ended, logp)
        score, flat = (score.view(-1, 1) + logp).view(B, k * V).topk(k, dim=1)
        src, token = (base + flat // V).view(-1), (flat % V).view(-1)
        seqs = torch.cat([seqs[src], token[:, None]], 1)
        done = done[src] | (token == EOS)
        if bool(done.all()) or t == max_new - 1:
            break
        cache = [(key[src], value[src]) for key, value in cache]  # the memory rows of one image are alike
        logits, cache = model(token[:, None], memory, cache)
    best = score.argmax(1)
    return ([until_end(seqs[b * k + int(j)].tolist()) for b, j in enumerate(best)],
            score.gather(1, best[:, None]).squeeze(1))


@torch.no_grad()
def decode_all(model: TextDecoder, feats: torch.Tensor, prefixes: Sequence[Sequence[int]], image: torch.Tensor,
               max_new: int, beam: int, batch_size: int, device: torch.device | str, blind: bool = False
               ) -> list[list[int]]:
    """Decode after each of ``prefixes`` (decoder ids) on ``feats`` row ``image[i]``, in batches of
    prefixes of one length (no padding inside a prefix); greedy for ``beam`` 1."""
    out: list[list[int]] = [[] for _ in prefixes]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            idx = torch.tensor(group[s : s + batch_size])
            rows, where = torch.unique(image[idx], return_inverse=True)
            img = feats[rows].to(device).float()
            memory = model.image_memory(torch.zeros_like(img) if blind else img, where.to(device))
            prefix = torch.tensor([prefixes[i] for i in idx.tolist()], dtype=torch.long, device=device)
            tokens, _ = (greedy_decode(model, memory, prefix, max_new) if beam == 1
                         else beam_decode(model, memory, prefix, max_new, beam))
            for i, t in zip(idx.tolist(), tokens):
                out[i] = t
    return out


# ----------------------------------------------------------------------------- the task


def references(features: Features) -> tuple[list[int], list[list[str]]]:
    """The samples with at least one caption that is not empty to the scorers, and those captions."""
    keep, refs = [], []
    for i, captions in enumerate(features.caption_sets or []):
        texts = [c for c in captions if score_tokens(c)]
        if texts:
            keep.append(i)
            refs.append(texts)
    return keep, refs


def caption_decoder(train: Sequences, train_feats: torch.Tensor, val_feats: torch.Tensor, vocab: Vocab,
                    tokenizer: Tokenizer, cfg: CaptionConfig, device: torch.device | str, blind: bool = False,
                    progress: bool = False) -> list[str]:
    """Train a decoder on ``train`` and write one caption per val image (``blind``: both on zeroed features)."""
    model = train_decoder(train, train_feats, len(vocab), cfg, device, blind, progress)
    tokens = decode_all(model, val_feats, [[BOS]] * len(val_feats), torch.arange(len(val_feats)),
                        cfg.context_length - 1, cfg.beam_size, cfg.batch_size, device, blind)
    return [tokenizer.decode(vocab.tokenizer_ids(t)) for t in tokens]


def caption_metrics(train_feats: torch.Tensor, train_refs: Sequence[Sequence[str]], val_feats: torch.Tensor,
                    val_refs: Sequence[Sequence[str]], tokenizer: Tokenizer, cfg: CaptionConfig,
                    device: torch.device | str = "cpu", progress: bool = False
                    ) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Train the decoder on every caption of the train images (patch features [N, P, D]), caption
    the val images and score them against their references; with ``cfg.blind_baseline`` the same
    for a decoder on zeroed features. Returns the metrics and the captions written
    (``generated``, ``blind``)."""
    image = [i for i, refs in enumerate(train_refs) for _ in refs]
    token_lists = content_ids(tokenizer, [c for refs in train_refs for c in refs])
    vocab = Vocab.of(token_lists)
    train, cut = caption_sequences(token_lists, image, vocab, cfg.context_length)
    texts = {"generated": caption_decoder(train, train_feats, val_feats, vocab, tokenizer, cfg, device,
                                          progress=progress)}
    scores = caption_scores(texts["generated"], val_refs)
    metrics: dict[str, Any] = {"cider": scores["cider"], "bleu4": scores["bleu4"]}
    if cfg.blind_baseline:
        texts["blind"] = caption_decoder(train, train_feats, val_feats, vocab, tokenizer, cfg, device, blind=True,
                                         progress=progress)
        blind = caption_scores(texts["blind"], val_refs)
        metrics.update(blind_cider=blind["cider"], blind_bleu4=blind["bleu4"])
    metrics.update({
        "decoding": "greedy" if cfg.beam_size == 1 else f"beam {cfg.beam_size}",
        "num_train": len(train_refs),
        "num_val": len(val_refs),
        "num_train_captions": len(token_lists),
        "num_val_references": sum(map(len, val_refs)),
        "captions_cut": cut,
        "vocab_size": len(vocab),
        "per_image_cider": scores["per_image_cider"],
    })
    return metrics, texts


def examples(keys: Sequence[str], texts: dict[str, list[str]], refs: Sequence[Sequence[str]], n: int
             ) -> list[dict[str, Any]]:
    return [{"key": keys[i], **{name: t[i] for name, t in texts.items()}, "references": list(refs[i])}
            for i in range(min(n, len(keys)))]


def draw_examples(val_data: str, image_size: int, keys: Sequence[str], read: int, texts: dict[str, list[str]],
                  refs: Sequence[Sequence[str]], path: Path, title: str) -> Path:
    """The val images of ``keys`` (the first ``read`` samples are read again, by the loader that
    extracted the features) beside the captions the decoders wrote and the first references."""
    from tcjepa.eval.common import read_split
    from tcjepa.eval.plots import caption_plot

    split = read_split(val_data, image_size, "--val-data", max_samples=read, max_skip_rate=1.0)
    where = {k: i for i, k in enumerate(split.keys)}
    shown = [i for i, k in enumerate(keys) if k in where]
    images = [split.images[where[keys[i]]].permute(1, 2, 0).numpy() for i in shown]
    lines = [[(name, t[i]) for name, t in texts.items()] + [("reference", r) for r in refs[i][:2]] for i in shown]
    return caption_plot(images, lines, path, title)


def run_caption(checkpoint: str | Path, data: str, val_data: str, cfg: CaptionConfig | None = None,
                json_out: str | Path | None = None, progress: bool = True, save_to_run: bool = True,
                encoder: nn.Module | None = None) -> dict[str, Any]:
    """Train the caption decoder on ``data``'s captions and score it on ``val_data``'s. Writes
    ``RUN_DIR/eval/caption.json`` (unless ``save_to_run`` is False), ``json_out`` if given and a
    PNG of a few val images with their captions beside them; returns the result."""
    from tcjepa.checkpoint import load_encoder, load_run_config
    from tcjepa.eval.probe import extract

    cfg = cfg or CaptionConfig()
    check_config(cfg)
    require_scorers()
    if not val_data:
        raise DataError("--val-data: captioning needs a validation split (SHARDS) to score the decoder trained on --data")
    for shards, key in ((data, "--data"), (val_data, "--val-data")):
        require_captions(shards, key)
    run_cfg = load_run_config(checkpoint)
    tokenizer = caption_tokenizer(run_cfg, cfg.context_length + 1)  # one token more than kept: a cut shows
    encoder = encoder if encoder is not None else load_encoder(checkpoint, cfg.encoder)
    size, device, skip = run_cfg.model.image_size, default_device(), run_cfg.data.max_skip_rate
    tr, va = (extract(encoder, shards, size, cfg.batch_size, device, data_key=key, progress=progress, max_skip_rate=skip,
                      patches=True, max_samples=cfg.max_samples, max_captions=MAX_CAPTIONS)
              for shards, key in ((data, "--data"), (val_data, "--val-data")))
    (ti, train_refs), (vi, val_refs) = references(tr), references(va)
    if not ti or not vi:
        where = f"--data {data}" if not ti else f"--val-data {val_data}"
        raise DataError(f"{where}: no sample read has a caption (KEY.txt or KEY.json 'captions')")
    metrics, texts = caption_metrics(tr.patches[ti], train_refs, va.patches[vi], val_refs, tokenizer, cfg, device,
                                     progress)
    val_keys = [va.keys[i] for i in vi]
    shown = examples(val_keys, texts, val_refs, NUM_EXAMPLES)
    for example, cider in zip(shown, metrics.pop("per_image_cider")):
        example["cider"] = cider
    metrics.update({
        **run_description(run_cfg, cfg.encoder),
        "no_caption": {"train": len(tr.keys) - len(ti), "val": len(va.keys) - len(vi)},
        "skipped": {"train": tr.skipped, "val": va.skipped},
        "examples": shown,
    })
    plots, where = [], plot_dir(checkpoint if save_to_run else None, json_out)
    if where is not None and cfg.plot_samples:
        n = min(cfg.plot_samples, len(vi))
        read = vi[n - 1] + 1 + sum(va.skipped.values())  # the loader of the features may have skipped more
        title = f"caption decoder ({metrics['decoding']}): val CIDEr {metrics['cider']:.3f}, BLEU-4 {metrics['bleu4']:.3f}"
        plots.append(str(draw_examples(val_data, size, val_keys[:n], read, {k: t[:n] for k, t in texts.items()},
                                       val_refs[:n], where / f"{eval_stem('caption', cfg.encoder)}_examples.png", title)))
    result = result_dict("caption", checkpoint, data, metrics, val_data=val_data, config=to_dict(cfg), plots=plots)
    write_result(result, checkpoint if save_to_run else None, json_out)
    return result
