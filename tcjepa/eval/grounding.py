"""``tcjepa eval grounding``: does the text conditioner read each word where its object is?

TC-JEPA's mechanism claim is implicit grounding: the sparse cross-attention makes each patch's
prediction read the few caption words that describe what is there. This task scores that claim
with the pointing game on val images whose objects are known (``KEY.inst.png`` instance maps and
``KEY.json`` ``objects``, as ``tcjepa data synthetic`` writes them).

Which attention is read, and why: the student encodes the whole image and its predictor is asked
to predict every patch (context = all patches, one target block = all patches), the setting in
which nothing but the position tells a query where it is; ``tcjepa viz attention`` draws the same
maps. The queries read are the mask tokens (one per patch: the predictions the loss trains), the
weights are the conditioner's attention weights (softmax, or the top-k weights of
``gated_topk``), averaged over heads and over every conditioned predictor layer. A word's map over
the patches is the weight each patch's query puts on the word, its sub-word pieces summed. For the
``paper`` variant the overlaps O = max(cos(q, k), 0) that its regularisers act on are scored the
same way (``overlap``).

Which words: a caption word that equals one object attribute (``grounding.attributes``, by
default colour and shape) of exactly one object in the scene; a word that several objects share
("red" with two red objects) has no single answer and is left out (``skipped_words.ambiguous``),
as are words of hidden objects and words the tokenizer's context cut off.

Scores, each next to what a map with no information scores:

- ``pointing_accuracy``: the most-attended patch touches the object (ties shared evenly, so a flat
  map scores exactly its chance); chance ``pointing_chance`` = the share of patches the object
  touches, averaged over the words.
- ``mass_in_object``: the share of the word's attention on the object's pixels (each patch
  weighted by the fraction of its pixels the object covers); chance ``mass_chance`` = the object's
  share of the image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from data_pipelines.labels import IGNORE
from data_pipelines.loader import DataError, SkipTracker
from tcjepa.config import ConfigError, to_dict
from tcjepa.eval.common import default_device, iter_eval_batches, result_dict, run_description, write_result


@dataclass
class GroundingConfig:
    attributes: tuple[str, ...] = ("color", "shape")  # keys of KEY.json objects[i] whose words are scored
    batch_size: int = 64
    max_samples: int = 0  # val images read (0: all)


def check_config(cfg: GroundingConfig) -> None:
    if not cfg.attributes:
        raise ConfigError("grounding.attributes must name at least one key of the objects in KEY.json")
    if cfg.batch_size < 1 or cfg.max_samples < 0:
        raise ConfigError("grounding.batch_size must be >= 1 and grounding.max_samples >= 0")


# ----------------------------------------------------------------------------- scores


def normalise_word(word: str) -> str:
    """Lower case, letters and digits only: "Red," and "red" are one word."""
    return re.sub(r"[^a-z0-9]", "", word.lower())


def patch_fractions(instances: torch.Tensor, instance: int, grid: tuple[int, int]) -> torch.Tensor:
    """[N] the fraction of each patch's pixels that belong to ``instance`` in the map [H, W]."""
    on = (instances == instance).float()[None, None]
    return F.adaptive_avg_pool2d(on, grid).flatten()


def pointing(word_map: torch.Tensor, fractions: torch.Tensor) -> tuple[float, float]:
    """(hit, mass in object) of one word's map [N] over patches, given the object's per-patch
    pixel fractions [N]. ``hit``: the share of the top-scoring patches (ties shared evenly) that
    the object touches. ``mass``: the map's mass on the object's pixels; a map with no mass counts
    as flat (its mass is then the object's share of the image)."""
    top = word_map == word_map.max()
    hit = float((fractions[top] > 0).float().mean())
    total = float(word_map.sum())
    mass = float((word_map * fractions).sum()) / total if total > 0 else float(fractions.mean())
    return hit, mass


@dataclass
class Tally:
    """Sums of the scores of one group of words, and of their chance levels."""

    words: int = 0
    hits: float = 0.0
    hit_chance: float = 0.0
    mass: float = 0.0
    mass_chance: float = 0.0

    def add(self, hit: float, mass: float, fractions: torch.Tensor) -> None:
        self.words += 1
        self.hits += hit
        self.mass += mass
        self.hit_chance += float((fractions > 0).float().mean())
        self.mass_chance += float(fractions.mean())

    def summary(self) -> dict[str, Any]:
        n = max(self.words, 1)
        acc = self.hits / n
        return {"pointing_accuracy": acc, "pointing_accuracy_se": math.sqrt(acc * (1 - acc) / n),
                "pointing_chance": self.hit_chance / n, "mass_in_object": self.mass / n,
                "mass_chance": self.mass_chance / n, "words": self.words}


def named_objects(meta: dict[str, Any], attributes: tuple[str, ...]) -> dict[str, tuple[str, int | None]]:
    """word -> (attribute, instance id) for every attribute value in the scene's objects;
    the instance id is None when several objects share the value (an ambiguous word)."""
    found: dict[str, tuple[str, int | None]] = {}
    objects = meta.get("objects") if isinstance(meta, dict) else None
    for i, obj in enumerate(objects if isinstance(objects, list) else []):
        for attr in attributes:
            value = obj.get(attr) if isinstance(obj, dict) else None
            if isinstance(value, str) and normalise_word(value):
                word = normalise_word(value)
                found[word] = (attr, None) if word in found else (attr, i + 1)
    return found


# ----------------------------------------------------------------------------- the task


def require_instances(shards: str, data_key: str, attributes: tuple[str, ...]) -> None:
    """Before any model: the first samples hold instance maps and objects with the attributes."""
    from tcjepa.eval.peek import peek, require

    look = peek(shards, data_key)
    require(look.inst_maps > 0, look, data_key, f"none of the first {len(look.metas)} samples of {shards} has an "
            "instance map (KEY.inst.png); `tcjepa data synthetic` writes them")
    require(any(named_objects(m, attributes) for m in look.metas), look, data_key,
            f"no sample lists objects with {' or '.join(attributes)} in its json (objects: [{{...}}]); "
            "set grounding.attributes to the object keys the data has")


@dataclass
class WordCounts:
    scored: Tally
    per_attribute: dict[str, Tally]
    skipped: dict[str, int]


def score_batch(maps: dict[str, torch.Tensor], words: list[list[tuple[str, list[int]]]], captions: list[str],
                metas: list[dict[str, Any]], instances: torch.Tensor | None, grid: tuple[int, int],
                attributes: tuple[str, ...], counts: dict[str, WordCounts]) -> None:
    """Add one batch's words to ``counts`` (one per kind of map: attention, overlap).
    ``maps``: kind -> [B, L, N]; ``words``: per sample, the tokenizer's (word, token positions)."""
    first = counts["attention"]
    for i, meta in enumerate(metas):
        names = named_objects(meta, attributes)
        if not names:
            continue
        if instances is None or bool((instances[i] == IGNORE).all()):
            first.skipped["no_instance_map"] += 1
            continue
        found = {normalise_word(w) for w, _ in words[i]}
        in_text = {normalise_word(w) for w in captions[i].split()}
        first.skipped["cut"] += len((in_text - found) & set(names))
        for word, pieces in words[i]:
            key = normalise_word(word)
            if key not in names:
                continue
            attr, instance = names[key]
            if instance is None:
                first.skipped["ambiguous"] += 1
                continue
            fractions = patch_fractions(instances[i], instance, grid)
            if not bool((fractions > 0).any()):
                first.skipped["hidden"] += 1
                continue
            for kind, m in maps.items():
                word_map = m[i, pieces].sum(0) if kind == "attention" else m[i, pieces].amax(0)
                hit, mass = pointing(word_map.float(), fractions)
                counts[kind].scored.add(hit, mass, fractions)
                counts[kind].per_attribute.setdefault(attr, Tally()).add(hit, mass, fractions)


def first_samples(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The batch cut to its first ``n`` samples (per-sample tensors and lists; the rest as is)."""
    size = len(batch["keys"])
    return {k: v[:n] if isinstance(v, (list, torch.Tensor)) and len(v) == size else v for k, v in batch.items()}


def run_grounding(checkpoint: str | Path, data: str, val_data: str = "", cfg: GroundingConfig | None = None,
                  json_out: str | Path | None = None, progress: bool = True, save_to_run: bool = True
                  ) -> dict[str, Any]:
    """Score the run's conditioner attention with the pointing game on ``val_data`` (else
    ``data``); writes ``RUN_DIR/eval/grounding.json`` (unless ``save_to_run`` is False) and
    ``json_out`` if given; returns the result."""
    from tqdm.auto import tqdm

    from data_pipelines.loader import normalize
    from tcjepa.checkpoint import load_student
    from tcjepa.eval.peek import scored_split_key
    from tcjepa.methods.jepa import build_tokenizer_for
    from tcjepa.viz import attention_maps

    cfg = cfg or GroundingConfig()
    check_config(cfg)
    shards, key = scored_split_key(data, val_data)
    require_instances(shards, key, cfg.attributes)
    student, run_cfg = load_student(checkpoint)
    if student.text is None:
        raise ConfigError(f"{checkpoint}: not a TC-JEPA run (conditioner.enabled is false); no attention to text to score")
    tokenizer, device, grid = build_tokenizer_for(run_cfg), default_device(), student.encoder.grid
    student.to(device)
    tracker, samples = SkipTracker(), 0
    counts: dict[str, WordCounts] = {}
    batches = iter_eval_batches(shards, run_cfg.model.image_size, cfg.batch_size, key, tracker, labels=True)
    for batch in tqdm(batches, desc="grounding", unit="batch", disable=not progress):
        if cfg.max_samples and samples + len(batch["keys"]) > cfg.max_samples:
            batch = first_samples(batch, cfg.max_samples - samples)
        tokens = tokenizer(batch["captions"])
        maps = attention_maps(student, normalize(batch["images"]).to(device), tokens.to(device))
        for kind in maps:
            counts.setdefault(kind, WordCounts(Tally(), {}, {"ambiguous": 0, "hidden": 0, "cut": 0, "no_instance_map": 0}))
        words = [tokenizer.words(tokens.ids[i, : int(tokens.mask[i].sum())].tolist()) for i in range(len(batch["keys"]))]
        score_batch({k: m.cpu() for k, m in maps.items()}, words, batch["captions"], batch["meta"], batch.get("inst"),
                    grid, cfg.attributes, counts)
        samples += len(batch["keys"])
        if cfg.max_samples and samples >= cfg.max_samples:
            break
    tracker.check_rate(run_cfg.data.max_skip_rate, 1, f"{key} {shards}")
    main = counts["attention"]
    if not main.scored.words:
        raise DataError(f"{key} {shards}: no caption word names an attribute ({', '.join(cfg.attributes)}) of exactly "
                        f"one visible object in {samples} samples; skipped words: {main.skipped}")
    metrics = {
        **main.scored.summary(),
        "per_attribute": {a: t.summary() for a, t in sorted(main.per_attribute.items())},
        "skipped_words": main.skipped,
        "num_samples": samples,
        "variant": run_cfg.conditioner.variant,
        **run_description(run_cfg),
        "skipped": tracker.counts,
    }
    if "overlap" in counts:
        metrics["overlap"] = {k: v for k, v in counts["overlap"].scored.summary().items() if k != "words"}
    result = result_dict("grounding", checkpoint, data, metrics, val_data=val_data, config=to_dict(cfg))
    write_result(result, checkpoint if save_to_run else None, json_out)
    return result
