"""``tcjepa viz attention``: where in the image each caption word is read by the conditioner.

For a few samples, the trained student encodes the whole image and the predictor is asked to
predict every patch (one target block covering the grid, context = all patches); the
conditioners keep their attention weights. For each caption word (its sub-word pieces joined),
the weight that each patch's prediction query puts on that word (averaged over heads and conditioner layers) is drawn as a
heat map over the image: with a working conditioner, "red" lights up the red object, "top" the
top of the image. For the paper variant a second set of maps shows the word overlaps
O = max(cos(q, k), 0) that its sparsity and consistency losses act on. Writes
``attention_NN.png`` per sample and ``attention.json`` with the numbers.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch

TILE = 128


def attention_maps(student: Any, images: torch.Tensor, tokens: Any) -> dict[str, torch.Tensor]:
    """Per-sample [L, N] maps of the N patch-prediction queries over the L caption tokens,
    averaged over heads and conditioner layers: ``attention`` (the softmax or top-k weights)
    and, for the paper variant, ``overlap`` (O = max(cos(q, k), 0), what its regularisers see)."""
    enc, pred = student.encoder, student.predictor
    B, N = images.size(0), enc.grid[0] * enc.grid[1]
    idx = torch.arange(N, device=images.device).expand(B, N)
    layers = list(pred.conditioners.values())
    for c in layers:
        c.keep_weights = True
    try:
        with torch.no_grad():
            z = enc(images)
            pred(z, idx, idx[:, None, :], text=student.text(tokens))
        # queries = N context tokens then N mask tokens: keep the mask tokens. gated_topk keeps
        # weights [B, H, Q, L]; the paper variant [B, captions, Q, L], already averaged over heads
        maps = {"attention": torch.stack([c.last_weights[:, :, N:, :].mean(1) for c in layers]).mean(0)}
        overlaps = [getattr(c, "last_overlap", None) for c in layers]
        if all(o is not None for o in overlaps):
            maps["overlap"] = torch.stack([o[:, 0, N:, :] for o in overlaps]).mean(0)
    finally:
        for c in layers:
            c.keep_weights, c.last_weights = False, None
    return {k: m.transpose(1, 2) for k, m in maps.items()}  # [B, L, N]


def word_maps(maps: torch.Tensor, pieces: list[list[int]], kind: str) -> torch.Tensor:
    """[L, N] per-token maps -> [W, N] per-word maps: a word's attention is the sum over its
    pieces (the share of attention the word gets); its overlap the largest of its pieces'."""
    if not pieces:
        return maps[:0]
    rows = [maps[idx].sum(0) if kind == "attention" else maps[idx].amax(0) for idx in pieces]
    return torch.stack(rows)


def _heat(image, weights: torch.Tensor, grid: tuple[int, int], vmax: float):
    from PIL import Image

    w = (weights.reshape(grid).float() / max(vmax, 1e-12)).clamp(0, 1)
    heat = Image.fromarray((w.numpy() * 255).astype("uint8"), "L").resize((TILE, TILE), Image.BILINEAR)
    red = Image.new("RGB", (TILE, TILE), (255, 40, 0))
    base = image.convert("L").convert("RGB").resize((TILE, TILE))
    return Image.composite(red, base, heat.point(lambda v: int(v * 0.75)))


def render_sample(image, caption: str, words: list[str], maps: torch.Tensor | dict[str, torch.Tensor],
                  grid: tuple[int, int], per_row: int = 6):
    """One PNG: the image, its caption, and one heat map per caption word and kind of map
    (attention, then overlap for the paper variant), each kind on one colour scale (the
    sample's largest value of that kind), so a word that no patch reads stays dark."""
    from PIL import Image, ImageDraw

    kinds = maps if isinstance(maps, dict) else {"attention": maps}
    tiles = [(image.resize((TILE, TILE)), "image")]
    for kind, m in kinds.items():
        vmax = float(m.max()) if m.numel() else 1.0
        prefix = "" if len(kinds) == 1 else f"{kind[:3]}: "
        tiles += [(_heat(image, w_map, grid, vmax), prefix + w) for w, w_map in zip(words, m)]
    rows = (len(tiles) + per_row - 1) // per_row
    lines = textwrap.wrap(caption or "(no caption)", width=per_row * TILE // 7)
    head, label = 14 * len(lines) + 8, 16
    canvas = Image.new("RGB", (per_row * TILE, head + rows * (TILE + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 14 * i), line, fill="black")
    for i, (tile, name) in enumerate(tiles):
        x, y = (i % per_row) * TILE, head + (i // per_row) * (TILE + label)
        canvas.paste(tile, (x, y))
        draw.text((x + 4, y + TILE + 2), name[:20], fill="black")
    return canvas


def visualize_attention(checkpoint: str | Path, data: str, out: str | Path, samples: int = 4,
                        max_words: int = 35) -> list[Path]:
    """Write attention overlays for the first ``samples`` samples of ``data``; returns the PNGs."""
    from PIL import Image

    from data_pipelines.loader import DataError, LoaderSpec, make_loader, normalize, resolve_shards
    from tcjepa.checkpoint import load_student
    from tcjepa.config import ConfigError
    from tcjepa.methods.jepa import build_tokenizer_for

    student, cfg = load_student(checkpoint)
    if student.text is None:
        raise ConfigError(f"{checkpoint}: not a TC-JEPA run (conditioner.enabled is false); nothing attends to text")
    tokenizer = build_tokenizer_for(cfg)
    loader = make_loader(LoaderSpec(resolve_shards(data, "--data"), samples, cfg.model.image_size, train=False))
    batch = next((b for b in loader if b["keys"]), None)
    if batch is None:
        raise DataError(f"--data: no readable sample in {data}")
    tokens = tokenizer(batch["captions"])
    maps = attention_maps(student, normalize(batch["images"]), tokens)  # kind -> [B, L, N]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, record = [], []
    for i, caption in enumerate(batch["captions"]):
        n = int(tokens.mask[i].sum())
        found = tokenizer.words(tokens.ids[i, :n].tolist())[:max_words]  # sub-word pieces joined, markers dropped
        words = [w for w, _ in found]
        image = Image.fromarray(batch["images"][i].permute(1, 2, 0).numpy())
        path = out / f"attention_{i:02d}.png"
        mine = {kind: word_maps(m[i], [idx for _, idx in found], kind) for kind, m in maps.items()}
        render_sample(image, caption, words, mine, student.encoder.grid).save(path)
        written.append(path)
        record.append({"key": batch["keys"][i], "caption": caption, "words": words,
                       **{kind: [[round(float(v), 5) for v in row] for row in m] for kind, m in mine.items()}})
    (out / "attention.json").write_text(json.dumps({"checkpoint": str(checkpoint), "grid": list(student.encoder.grid),
                                                    "samples": record}, indent=1))
    return written
