"""``tcjepa eval zeroshot``: classify images by matching them against class-name prompts, with no
training on the labels.

Each class ``c`` gets one prompt per template (``zeroshot.templates``, open_clip's convention:
``"a {}."`` -> ``"a circle."``); an image's score for ``c`` is the scorer's image-text score
averaged over those prompts, and the predicted class is the highest-scoring one. Top-1 and top-5
are tie-aware (:func:`tcjepa.eval.common.topk_hits`), so a scorer that cannot tell classes apart
scores chance, not a lucky 100 %.

The scorer comes from :func:`tcjepa.eval.scoring.build_scorer`. For contrastive runs (CLIP,
SigLIP) it is the cosine similarity of the image embedding with each class embedding (the
renormalised mean of its prompts' embeddings, open_clip's convention); a Matryoshka run also
reports top-1/top-5 at every trained embedding width (``per_dim``). For TC-JEPA runs it is the
text-conditioned predictor (``PredictorScorer``): the class whose prompt most reduces the error
of predicting the teacher's features of masked target blocks wins, averaged over
``zeroshot.num_masks`` fixed-seed masks. Besides top-1/top-5 the result reports the mean error
with the true class's prompts, with the other classes' prompts and with no text, which tells
whether the text path carries class information at all.

Class names come from the json's ``label_name`` beside ``label`` (generally ``KEY_name`` beside
``zeroshot.label``), or from ``zeroshot.class_names`` (index = label value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipelines.loader import DataError, normalize
from tcjepa.config import ConfigError, to_dict
from tcjepa.eval.common import is_label, lookup, result_dict, topk_hits, write_result
from tcjepa.eval.peek import peek, require, scored_split_key


@dataclass
class ZeroShotConfig:
    label: str = "label"  # json key (dotted path) holding the class index
    class_names: tuple[str, ...] = ()  # index -> name; default: the json's LABEL_name (e.g. label_name)
    templates: tuple[str, ...] = ("a {}.", "an image of a {}.")  # "{}" is replaced by the class name
    num_masks: int = 2  # predictor scoring: fixed-seed masks averaged per image
    seed: int = 0
    batch_size: int = 16  # images scored at once
    max_samples: int = 0  # 0: every sample of the split


def check_config(cfg: ZeroShotConfig) -> None:
    if not cfg.templates or any("{}" not in t for t in cfg.templates):
        raise ConfigError(f"zeroshot.templates: every template needs a {{}} for the class name, got {list(cfg.templates)}")
    if cfg.num_masks < 1 or cfg.batch_size < 1 or cfg.max_samples < 0:
        raise ConfigError("zeroshot.num_masks and zeroshot.batch_size must be >= 1, zeroshot.max_samples >= 0")


def check_data(cfg: ZeroShotConfig, shards: str, data_key: str) -> None:
    """Before any model or image: the scored split has the label and, unless
    ``zeroshot.class_names`` gives them, the class names."""
    look = peek(shards, data_key)
    require(look.has_label(cfg.label), look, data_key, f"no sample has an integer {cfg.label!r} in its json "
            f"(zeroshot.label; --set zeroshot.label=KEY names another)")
    require(bool(cfg.class_names) or look.has_string(cfg.label + "_name"), look, data_key,
            f"no sample has a {cfg.label + '_name'!r} in its json; zero-shot needs class names: add them to the "
            f"json or pass --set zeroshot.class_names=[...]")


def resolve_classes(metas: list[dict[str, Any]], keys: list[str], cfg: ZeroShotConfig, data_key: str
                    ) -> tuple[list[str], torch.Tensor]:
    """Class names (index = label) and each sample's label; errors name the sample at fault."""
    labels = []
    for meta, key in zip(metas, keys):
        y = lookup(meta, cfg.label)
        if not is_label(y) or y < 0:
            raise DataError(f"{data_key}: sample {key} has no integer {cfg.label!r} in its json (zeroshot.label)")
        labels.append(y)
    if cfg.class_names:
        names = list(cfg.class_names)
        bad = next((k for k, y in zip(keys, labels) if y >= len(names)), None)
        if bad is not None:
            raise DataError(f"{data_key}: sample {bad} has {cfg.label}={labels[keys.index(bad)]}, but "
                            f"zeroshot.class_names lists only {len(names)} classes")
        return names, torch.tensor(labels)
    name_key = cfg.label + "_name"
    found: dict[int, tuple[str, str]] = {}
    for meta, key, y in zip(metas, keys, labels):
        name = lookup(meta, name_key)
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{data_key}: sample {key} has no {name_key!r} in its json; zero-shot needs class names: "
                            f"add them to the json or pass --set zeroshot.class_names=[...]")
        if y in found and found[y][0] != name:
            raise DataError(f"{data_key}: {cfg.label}={y} is named {found[y][0]!r} in sample {found[y][1]} "
                            f"but {name!r} in sample {key}")
        found.setdefault(y, (name, key))
    missing = [c for c in range(max(found) + 1) if c not in found]
    if missing:  # classes absent from the split still compete, but need a name
        raise DataError(f"{data_key}: classes {missing[:5]} of {cfg.label} never appear, so they have no name; "
                        "pass --set zeroshot.class_names=[...] to name every class")
    return [found[c][0] for c in range(len(found))], torch.tensor(labels)


def run_zeroshot(checkpoint: str | Path, data: str, val_data: str = "", cfg: ZeroShotConfig | None = None,
                 json_out: str | Path | None = None, progress: bool = True, save_to_run: bool = True) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of a run on ``val_data`` (or ``data`` when no val split is given:
    nothing is trained, so any split works). Writes ``RUN_DIR/eval/zeroshot.json`` and ``json_out``."""
    from tqdm.auto import tqdm

    from tcjepa.eval.scoring import PredictorScorer, scored_split

    cfg = cfg or ZeroShotConfig()
    check_config(cfg)
    check_data(cfg, *scored_split_key(data, val_data))
    scorer, split, shards, data_key = scored_split("zeroshot", checkpoint, data, val_data, cfg.num_masks, cfg.seed,
                                                   cfg.max_samples)
    names, labels = resolve_classes(split.metas, split.keys, cfg, data_key)
    prompts = [[t.format(n) for t in cfg.templates] for n in names]

    scores, errors = [], []
    widths = list(getattr(scorer, "dims", []))  # a contrastive run's embedding widths, the full one last
    width_scores: dict[int, list[torch.Tensor]] = {d: [] for d in widths}
    for i in tqdm(range(0, len(split), cfg.batch_size), desc="zero-shot", unit="batch", disable=not progress):
        images = normalize(split.images[i : i + cfg.batch_size])
        if isinstance(scorer, PredictorScorer):  # keep the raw errors too: they say whether text helps at all
            err = scorer.errors(images, [""] + [p for ps in prompts for p in ps])
            errors.append(err)
            per_prompt = err[:, :1] - err[:, 1:]
            scores.append(per_prompt.view(len(images), len(names), len(cfg.templates)).mean(-1))
        elif widths:  # one forward serves every width
            by_width = scorer.score_classes_by_width(images, prompts)
            scores.append(by_width[widths[-1]])
            for d in widths:
                width_scores[d].append(by_width[d])
        else:
            scores.append(scorer.score_classes(images, prompts))
    scores = torch.cat(scores)
    k5 = min(5, len(names))
    pred = scores.argmax(1)
    metrics: dict[str, Any] = {
        "top1": topk_hits(scores, labels, 1).mean().item(),
        "top5": topk_hits(scores, labels, 5).mean().item(),
        "label": cfg.label,
        "chance_top1": 1 / len(names),
        "chance_top5": k5 / len(names),
        "num_samples": len(split),
        "num_classes": len(names),
        "class_names": names,
        "per_class": {names[c]: (pred[labels == c] == c).float().mean().item()
                      for c in range(len(names)) if (labels == c).any()},
        "scorer": scorer.name,
        "skipped": split.skipped,
    }
    if len(widths) > 1:  # Matryoshka: the headline is the full width; every width as well
        metrics["per_dim"] = {str(d): {"top1": topk_hits(s, labels, 1).mean().item(),
                                       "top5": topk_hits(s, labels, 5).mean().item()}
                              for d, s in ((d, torch.cat(v)) for d, v in width_scores.items())}
    if errors:
        err = torch.cat(errors)
        per_class_err = err[:, 1:].view(len(split), len(names), len(cfg.templates)).mean(-1)
        correct = per_class_err.gather(1, labels.view(-1, 1)).squeeze(1)
        others = (per_class_err.sum(1) - correct) / max(1, len(names) - 1)
        metrics.update(error_no_text=err[:, 0].mean().item(), error_true_class=correct.mean().item(),
                       error_other_classes=others.mean().item())
    result = result_dict("zeroshot", checkpoint, shards, metrics, config=to_dict(cfg))
    write_result(result, checkpoint if save_to_run else None, json_out)
    return result
