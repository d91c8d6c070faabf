"""``tcjepa eval vqa``: visual question answering with a frozen image encoder.

The run's image encoder is frozen; its patch features are computed once per image. A small head
learns to answer: the question is tokenized (the run's caption tokenizer; open_clip's BPE for
runs without one), embedded by a small trainable embedding + transformer, then its tokens
cross-attend to the projected patch features in a few fusion blocks, are mean-pooled and
classified over the answers seen in training. The head trains on the QA pairs of the train split
(``KEY.json`` ``qa``: ``[{"question", "answer", "type"}]``, as written by ``tcjepa data
synthetic`` and ``tcjepa data easy-vqa``) and is scored on the test split.

So that a number can be read, the result carries baselines that never look at the image:
``majority_baseline`` (always the most common training answer), ``per_type_majority`` (the most
common training answer of each question type: a question-type prior), and with
``vqa.blind_baseline`` the same head trained on zeroed image features. An encoder is only
useful for VQA by as much as it beats those.

``vqa.head=decoder`` answers generatively instead, as the TC-JEPA paper does: the captioning
decoder of ``tcjepa.eval.caption`` (``vqa.text_depth + vqa.fusion_depth`` blocks, each with
causal self-attention and cross-attention to the patch features) learns ``question [SEP] answer``
sequences, its loss on the answer's tokens only, and writes each test answer greedily after its
question. An answer is right when it equals the true one after :func:`normalize_answer`
(VQAv2's normalisation: lower case, punctuation, articles, number words as digits); the
baselines compare normalised answers too, and the result has ``head: "decoder"``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.loader import DataError
from tcjepa.config import ENCODER_CHOICES_TEXT, EVAL_ENCODERS, ConfigError, to_dict
from tcjepa.eval.common import default_device, result_dict, write_result
from tcjepa.eval.peek import peek, require
from tcjepa.models.attention import attention
from tcjepa.models.vit import MLP, init_weights

if TYPE_CHECKING:
    from tcjepa.eval.probe import Features


@dataclass
class VQAConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    width: int = 128  # the head's width
    heads: int = 4
    text_depth: int = 1  # self-attention blocks over the question
    fusion_depth: int = 2  # blocks with question self-attention + cross-attention to the patches
    context_length: int = 32  # question tokens kept
    encoder: str = "auto"  # auto | teacher | student | init (as probe.encoder)
    seed: int = 0
    blind_baseline: bool = False  # also train the head on zeroed image features (a question-only model)
    max_samples: int = 0  # images read per split (0: all)
    head: str = "classifier"  # classifier (over the train answers) | decoder (generates the answer)


def check_config(cfg: VQAConfig) -> None:
    if cfg.width % cfg.heads:
        raise ConfigError(f"vqa.heads {cfg.heads} must divide vqa.width {cfg.width}")
    if min(cfg.epochs, cfg.batch_size, cfg.fusion_depth, cfg.context_length - 1) < 1 or cfg.text_depth < 0:
        raise ConfigError("vqa.epochs, vqa.batch_size and vqa.fusion_depth must be >= 1, vqa.context_length >= 2, "
                          "vqa.text_depth >= 0")
    if cfg.encoder not in EVAL_ENCODERS:
        raise ConfigError(f"vqa.encoder {ENCODER_CHOICES_TEXT}, got {cfg.encoder!r}")
    if cfg.head not in ("classifier", "decoder"):
        raise ConfigError(f"vqa.head must be classifier or decoder, got {cfg.head!r}")


# ----------------------------------------------------------------------------- the head


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` [B, L, C] to ``context`` [B, N, C] (``key_valid`` [B, N])."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor | None = None,
                context_index: torch.Tensor | None = None) -> torch.Tensor:
        """``context_index`` [B]: row of ``context`` each query row reads (several questions share
        one image: its keys and values are computed once)."""
        B, L, C = x.shape
        h = self.num_heads
        q = self.q(x).view(B, L, h, C // h).transpose(1, 2)
        k, v = self.kv(context).view(context.size(0), context.size(1), 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        if context_index is not None:
            k, v = k[context_index], v[context_index]
        mask = key_valid[:, None, None, :] if key_valid is not None else None
        return self.proj(attention(q, k, v, mask).transpose(1, 2).reshape(B, L, C))


class FusionBlock(nn.Module):
    """Pre-norm: question self-attention, then (if ``cross``) cross-attention to the image, then MLP."""

    def __init__(self, dim: int, num_heads: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = CrossAttention(dim, num_heads)
        self.cross = CrossAttention(dim, num_heads) if cross else None
        self.norm_q = nn.LayerNorm(dim, eps=1e-6) if cross else None
        self.norm_img = nn.LayerNorm(dim, eps=1e-6) if cross else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, image: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, valid)
        if self.cross is not None:
            x = x + self.cross(self.norm_q(x), self.norm_img(image), context_index=image_index)
        return x + self.mlp(self.norm2(x))


class VQAHead(nn.Module):
    """Question ids [B, L] (+ mask) and patch features [M, P, D] of the M images they ask about,
    ``image_index`` [B] (default: question i asks about image i) -> answer logits [B, A]."""

    def __init__(self, vocab_size: int, context_length: int, image_dim: int, num_patches: int, num_answers: int,
                 cfg: VQAConfig):
        super().__init__()
        w = cfg.width
        self.token_embed = nn.Embedding(vocab_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, w))
        self.image_proj = nn.Sequential(nn.LayerNorm(image_dim, eps=1e-6), nn.Linear(image_dim, w))
        self.image_pos = nn.Parameter(torch.zeros(1, num_patches, w))  # where a patch is, for "where" questions
        self.text_blocks = nn.ModuleList(FusionBlock(w, cfg.heads, cross=False) for _ in range(cfg.text_depth))
        self.fusion_blocks = nn.ModuleList(FusionBlock(w, cfg.heads, cross=True) for _ in range(cfg.fusion_depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.classifier = nn.Linear(w, num_answers)
        init_weights(self, 0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.image_pos, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        keep = int(mask.sum(1).max())  # right-padded: drop the columns that are padding everywhere
        ids, mask = ids[:, :keep], mask[:, :keep]
        x = self.token_embed(ids) + self.pos_embed[:, :keep]
        for block in self.text_blocks:
            x = block(x, mask)
        img = self.image_proj(image) + self.image_pos
        for block in self.fusion_blocks:
            x = block(x, mask, img, image_index)
        w = mask.unsqueeze(-1).to(x.dtype)
        return self.classifier((self.norm(x) * w).sum(1) / w.sum(1).clamp_min(1.0))


# ----------------------------------------------------------------------------- data


@dataclass
class QASet:
    image: torch.Tensor  # [Q] index into the split's features
    ids: torch.Tensor  # [Q, L] compact token ids (0 padding, 1 unknown)
    mask: torch.Tensor  # [Q, L]
    answers: list[str]
    types: list[str]


def collect_qa(metas: list[dict[str, Any]], keys: list[str], data_key: str) -> tuple[list[int], list[str], list[str], list[str]]:
    """(image index, question, answer, type) of every QA pair; malformed entries are errors naming
    the sample (a silently dropped question would change the score)."""
    image, questions, answers, types = [], [], [], []
    for i, (meta, key) in enumerate(zip(metas, keys)):
        qa = meta.get("qa", [])
        if not isinstance(qa, list):
            raise DataError(f"{data_key}: sample {key}: json 'qa' must be a list of {{question, answer, type}}")
        for j, item in enumerate(qa):
            if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)):
                raise DataError(f"{data_key}: sample {key}: qa[{j}] needs string 'question' and 'answer', got {item!r}")
            image.append(i)
            questions.append(item["question"])
            answers.append(item["answer"].strip().lower())
            types.append(str(item.get("type", "all")))
    if not questions:
        raise DataError(f"{data_key}: no sample has question/answer pairs (json 'qa'); write VQA shards with "
                        "`tcjepa data synthetic` or `tcjepa data easy-vqa`")
    return image, questions, answers, types


def compact_vocab(ids: torch.Tensor, mask: torch.Tensor) -> dict[int, int]:
    """Tokenizer ids seen in training questions -> 2..V+1 (0 padding, 1 unknown), so the head's
    embedding holds only the words the questions use, not a 49k-entry BPE table."""
    return {t: i + 2 for i, t in enumerate(sorted(set(ids[mask].tolist())))}


def to_qaset(image: list[int], questions: list[str], answers: list[str], types: list[str], tokenizer: Any,
             vocab: dict[int, int] | None) -> tuple[QASet, dict[int, int]]:
    tokens = tokenizer(questions)
    if vocab is None:
        vocab = compact_vocab(tokens.ids, tokens.mask)
    lut = torch.ones(int(tokens.ids.max()) + 1, dtype=torch.long)
    for t, i in vocab.items():
        if t < len(lut):
            lut[t] = i
    ids = torch.where(tokens.mask, lut[tokens.ids], torch.zeros_like(tokens.ids))
    return QASet(torch.tensor(image), ids, tokens.mask, answers, types), vocab


# ----------------------------------------------------------------------------- training


def train_head(train: QASet, train_feats: torch.Tensor, answer_ids: dict[str, int], vocab_size: int,
               cfg: VQAConfig, device: torch.device, blind: bool = False, progress: bool = False) -> VQAHead:
    """Fit a :class:`VQAHead` on the training QA pairs (``blind``: with zeroed image features)."""
    from tqdm.auto import trange

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    head = VQAHead(vocab_size, train.ids.size(1), train_feats.size(-1), train_feats.size(1), len(answer_ids), cfg).to(device)
    decay = [p for p in head.parameters() if p.ndim >= 2]
    rest = [p for p in head.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr)
    y = torch.tensor([answer_ids[a] for a in train.answers])
    images = torch.unique(train.image)
    per_batch = max(1, round(cfg.batch_size * len(images) / len(y)))  # images per batch: ~batch_size questions
    steps = cfg.epochs * ((len(images) + per_batch - 1) // per_batch)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    head.train()
    for _ in trange(cfg.epochs, desc="vqa head" + (" (blind)" if blind else ""), unit="epoch", disable=not progress):
        order = images[torch.randperm(len(images), generator=g)]
        for i in range(0, len(order), per_batch):
            # every question about a batch of images: each image's keys/values are computed once
            chosen = order[i : i + per_batch]
            idx = torch.isin(train.image, chosen).nonzero().squeeze(1)
            rows, where = torch.unique(train.image[idx], return_inverse=True)
            image = train_feats[rows].to(device).float()
            if blind:
                image = torch.zeros_like(image)
            logits = head(train.ids[idx].to(device), train.mask[idx].to(device), image, where.to(device))
            loss = F.cross_entropy(logits, y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def predict(head: VQAHead, qa: QASet, feats: torch.Tensor, device: torch.device, batch_size: int,
            blind: bool = False) -> torch.Tensor:
    out = []
    for i in range(0, len(qa.answers), batch_size):
        sl = slice(i, i + batch_size)
        rows, where = torch.unique(qa.image[sl], return_inverse=True)
        image = feats[rows].to(device).float()
        if blind:
            image = torch.zeros_like(image)
        out.append(head(qa.ids[sl].to(device), qa.mask[sl].to(device), image, where.to(device)).argmax(1).cpu())
    return torch.cat(out)


def accuracy_by_type(correct: torch.Tensor, types: list[str]) -> dict[str, float]:
    by: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(types):
        by[t].append(i)
    return {t: correct[idx].float().mean().item() for t, idx in sorted(by.items())}


QA = tuple[list[int], list[str], list[str], list[str]]  # what collect_qa returns


def answer_priors(train_answers: list[str], train_types: list[str], test_answers: list[str],
                  test_types: list[str]) -> dict[str, Any]:
    """What answering without the image or the question's words scores: the most common training
    answer (``majority_baseline``), and the most common one of each question type."""
    majority = Counter(train_answers).most_common(1)[0][0]
    type_majority = {t: Counter(a for a, tt in zip(train_answers, train_types) if tt == t).most_common(1)[0][0]
                     for t in set(train_types)}
    prior = torch.tensor([type_majority.get(t) == a for a, t in zip(test_answers, test_types)])
    return {
        "majority_baseline": sum(a == majority for a in test_answers) / len(test_answers),
        "per_type_majority": accuracy_by_type(prior, test_types),
        "per_type_majority_overall": prior.float().mean().item(),
        "majority_answer": majority,
    }


def classifier_metrics(qtrain: QA, qtest: QA, ftrain: Features, ftest: Features, tokenizer: Any, cfg: VQAConfig,
                       device: torch.device, progress: bool) -> dict[str, Any]:
    """The classifier head over the train answers (and its blind twin), scored on the test QA pairs."""
    train, vocab = to_qaset(*qtrain, tokenizer=tokenizer, vocab=None)
    test, _ = to_qaset(*qtest, tokenizer=tokenizer, vocab=vocab)

    counts = Counter(train.answers)
    answer_ids = {a: i for i, (a, _) in enumerate(counts.most_common())}
    truth = torch.tensor([answer_ids.get(a, -1) for a in test.answers])  # -1: never seen in training: always wrong
    head = train_head(train, ftrain.patches, answer_ids, len(vocab) + 2, cfg, device, progress=progress)
    correct = predict(head, test, ftest.patches, device, cfg.batch_size) == truth

    priors = answer_priors(train.answers, train.types, test.answers, test.types)
    metrics: dict[str, Any] = {
        "accuracy": correct.float().mean().item(),
        "per_type": accuracy_by_type(correct, test.types),
        **priors,
        "num_train_questions": len(train.answers),
        "num_test_questions": len(test.answers),
        "num_train_images": len(ftrain.keys),
        "num_test_images": len(ftest.keys),
        "num_answers": len(answer_ids),
        "unseen_test_answers": int((truth < 0).sum()),
        "skipped": {"train": ftrain.skipped, "test": ftest.skipped},
    }
    if cfg.blind_baseline:
        blind = train_head(train, ftrain.patches, answer_ids, len(vocab) + 2, cfg, device, blind=True, progress=progress)
        blind_correct = predict(blind, test, ftest.patches, device, cfg.batch_size, blind=True) == truth
        metrics["blind_accuracy"] = blind_correct.float().mean().item()
        metrics["blind_per_type"] = accuracy_by_type(blind_correct, test.types)
    return metrics


# ----------------------------------------------------------------------------- the generative head

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # VQAv2's manualMap
ARTICLES = frozenset({"a", "an", "the"})
NUM_EXAMPLES = 8  # test questions whose generated answers go into the result


def normalize_answer(text: str) -> str:
    """VQAv2's answer normalisation without its contraction table: lower case; a comma between
    digits dropped ("1,000" -> "1000"), a period not followed by a digit dropped ("3.5" stays),
    other punctuation but the apostrophe a space; number words as digits ("two" -> "2", "none" ->
    "0"); the articles a, an, the dropped; words joined by single spaces."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())
    text = re.sub(r"\.(?!\d)", "", text)
    text = re.sub(r"[^\w\s'.]|_", " ", text)
    return " ".join(NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES)


def qa_sequences(image: list[int], questions: list[list[int]], answers: list[list[int]], vocab: Any) -> Any:
    """``[BOS] question [SEP] answer [EOS]`` per QA pair (decoder ids); the loss is on the answer
    and the end marker, after the separator."""
    from tcjepa.eval.caption import BOS, EOS, SEP, Sequences, pad_rows

    rows = [[BOS, *vocab.encode(q), SEP, *vocab.encode(a), EOS] for q, a in zip(questions, answers)]
    return Sequences(pad_rows(rows), torch.tensor(image, dtype=torch.long),
                     torch.tensor([len(q) + 1 for q in questions], dtype=torch.long))


def decoder_config(cfg: VQAConfig, context_length: int) -> Any:
    """The captioning decoder at the classifier head's size: ``vqa.text_depth + vqa.fusion_depth``
    blocks (each cross-attends to the image), ``vqa.width``, ``vqa.heads``, its training settings."""
    from tcjepa.eval.caption import CaptionConfig

    return CaptionConfig(depth=cfg.text_depth + cfg.fusion_depth, width=cfg.width, heads=cfg.heads,
                         context_length=context_length, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         batch_size=cfg.batch_size, encoder=cfg.encoder, seed=cfg.seed)


def decoder_metrics(qtrain: QA, qtest: QA, ftrain: Features, ftest: Features, tokenizer: Any, cfg: VQAConfig,
                    device: torch.device, progress: bool) -> dict[str, Any]:
    """The generative head: a decoder trained on ``question [SEP] answer`` sequences writes each
    test answer greedily after its question; exact match after :func:`normalize_answer` (the
    baselines compare normalised answers too)."""
    from tcjepa.eval.caption import BOS, SEP, Vocab, content_ids, decode_all, train_decoder

    (train_image, train_q, train_a, train_types), (test_image, test_q, test_a, test_types) = qtrain, qtest
    q_ids, a_ids = content_ids(tokenizer, train_q), content_ids(tokenizer, train_a)
    vocab = Vocab.of(q_ids + a_ids)
    train = qa_sequences(train_image, q_ids, a_ids, vocab)
    prefixes = [[BOS, *vocab.encode(q), SEP] for q in content_ids(tokenizer, test_q)]
    max_new = max(map(len, a_ids)) + 1  # the longest train answer and the end marker
    dcfg = decoder_config(cfg, max(train.ids.size(1), max(map(len, prefixes)) + max_new))

    def answers(blind: bool) -> list[str]:
        model = train_decoder(train, ftrain.patches, len(vocab), dcfg, device, blind, progress, desc="vqa decoder")
        tokens = decode_all(model, ftest.patches, prefixes, torch.tensor(test_image), max_new, 1, cfg.batch_size,
                            device, blind)
        return [tokenizer.decode(vocab.tokenizer_ids(t)) for t in tokens]

    truth, seen = [normalize_answer(a) for a in test_a], {normalize_answer(a) for a in train_a}
    generated = answers(blind=False)
    correct = torch.tensor([normalize_answer(g) == t for g, t in zip(generated, truth)])
    priors = answer_priors([normalize_answer(a) for a in train_a], train_types, truth, test_types)
    metrics: dict[str, Any] = {
        "head": "decoder",
        "accuracy": correct.float().mean().item(),
        "per_type": accuracy_by_type(correct, test_types),
        **priors,
        "num_train_questions": len(train_a),
        "num_test_questions": len(test_a),
        "num_train_images": len(ftrain.keys),
        "num_test_images": len(ftest.keys),
        "num_answers": len(seen),
        "unseen_test_answers": sum(t not in seen for t in truth),
        "skipped": {"train": ftrain.skipped, "test": ftest.skipped},
        "examples": [{"key": ftest.keys[test_image[i]], "question": test_q[i], "generated": generated[i],
                      "answer": test_a[i]} for i in range(min(NUM_EXAMPLES, len(test_q)))],
    }
    if cfg.blind_baseline:
        blind_correct = torch.tensor([normalize_answer(g) == t for g, t in zip(answers(blind=True), truth)])
        metrics["blind_accuracy"] = blind_correct.float().mean().item()
        metrics["blind_per_type"] = accuracy_by_type(blind_correct, test_types)
    return metrics


def run_vqa(checkpoint: str | Path, data: str, val_data: str, cfg: VQAConfig | None = None,
            json_out: str | Path | None = None, progress: bool = True, save_to_run: bool = True,
            encoder: nn.Module | None = None) -> dict[str, Any]:
    """Train the VQA head (``cfg.head``: classifier or decoder) on ``data``'s QA pairs, score it on
    ``val_data``'s (the test split). Writes ``RUN_DIR/eval/vqa.json`` and ``json_out``; returns the result."""
    from data_pipelines.tokenizers import build_tokenizer
    from tcjepa.checkpoint import load_encoder, load_run_config
    from tcjepa.config import resolved_tokenizer
    from tcjepa.eval.probe import extract

    cfg = cfg or VQAConfig()
    check_config(cfg)
    if not val_data:
        raise DataError("--val-data: VQA needs a test split (SHARDS) to score the head trained on --data")
    for shards, key in ((data, "--data"), (val_data, "--val-data")):  # before the encoder reads any image
        look = peek(shards, key)
        require(any(isinstance(m.get("qa"), list) and m["qa"] for m in look.metas), look, key,
                "no sample has question/answer pairs (json 'qa': [{\"question\", \"answer\"}, ...])")
    run_cfg = load_run_config(checkpoint)
    device = default_device()
    kind, path = resolved_tokenizer(run_cfg.conditioner)  # open_clip BPE for runs without a text tower
    tokenizer = build_tokenizer(kind, path, cfg.context_length)
    encoder = encoder if encoder is not None else load_encoder(checkpoint, cfg.encoder)
    size, skip = run_cfg.model.image_size, run_cfg.data.max_skip_rate
    splits = {}
    for name, shards, key in (("train", data, "--data"), ("test", val_data, "--val-data")):
        f = extract(encoder, shards, size, 128, device, data_key=key, progress=progress, max_skip_rate=skip,
                    patches=True, max_samples=cfg.max_samples)
        splits[name] = (f, collect_qa(f.metas, f.keys, key))
    (ftrain, qtrain), (ftest, qtest) = splits["train"], splits["test"]
    scored = decoder_metrics if cfg.head == "decoder" else classifier_metrics
    metrics = scored(qtrain, qtest, ftrain, ftest, tokenizer, cfg, device, progress)
    result = result_dict("vqa", checkpoint, data, metrics, val_data=val_data, config=to_dict(cfg))
    write_result(result, checkpoint if save_to_run else None, json_out)
    return result
