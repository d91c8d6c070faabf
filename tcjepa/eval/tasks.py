"""``tcjepa eval TASK``: one entry point for every evaluation, its ``--set`` overrides, and the
short summary the command line prints.

Each task reads its settings from one section, set with ``--set SECTION.KEY=VALUE``: ``probe.*``
(``ProbeConfig``, stored in the run's config, so a recipe can choose its probe), ``zeroshot.*``,
``retrieval.*``, ``vqa.*``, ``segment.*``, ``grounding.*`` and ``caption.*`` (dataclasses beside each task; defaults unless overridden). Keys
are checked as strictly as training configs: a typo is an error naming the key.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from tcjepa.config import ConfigError, apply_overrides, from_dict, parse_overrides, to_dict

# task -> (module, settings class): the module's ``run_TASK(checkpoint, data, val_data, cfg, json_out,
# progress=...)`` runs it. Imported only when asked, so ``tcjepa --help`` loads no evaluation code.
TASK_MODULES = {
    "probe": ("tcjepa.eval.probe", "ProbeConfig"),
    "zeroshot": ("tcjepa.eval.zeroshot", "ZeroShotConfig"),
    "retrieval": ("tcjepa.eval.retrieval", "RetrievalConfig"),
    "vqa": ("tcjepa.eval.vqa", "VQAConfig"),
    "segment": ("tcjepa.eval.segment", "SegmentConfig"),
    "grounding": ("tcjepa.eval.grounding", "GroundingConfig"),
    "caption": ("tcjepa.eval.caption", "CaptionConfig"),
}
TASKS = tuple(TASK_MODULES)


def _task_module(task: str) -> Any:
    if task not in TASK_MODULES:
        raise ConfigError(f"unknown eval task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASK_MODULES[task][0])


def task_config(task: str, checkpoint: str | Path, overrides: list[str]) -> Any:
    """The task's settings: its section of ``--set`` overrides over the defaults (for ``probe``,
    over the run's saved ``probe`` section). Keys of other sections are an error."""
    module = _task_module(task)
    over = parse_overrides(overrides)
    bad = [k for k in over if k != task]
    if bad:
        raise ConfigError(f"--set {bad[0]}.*: only {task}.* keys can be set for eval {task}")
    if task == "probe":
        from tcjepa.checkpoint import load_run_config

        return apply_overrides(load_run_config(checkpoint), overrides).probe
    cls = getattr(module, TASK_MODULES[task][1])
    section = over.get(task, {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {task}: expected {task}.KEY=VALUE")
    return from_dict(cls, {**to_dict(cls()), **section}, "--set", prefix=f"{task}.")


def run_eval(task: str, checkpoint: str | Path, data: str, val_data: str = "", overrides: list[str] | None = None,
             json_out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run evaluation ``task`` on a finished run; writes ``RUN_DIR/eval/TASK.json`` (and ``json_out``)
    and returns the result dict (DESIGN.md's shape)."""
    cfg = task_config(task, checkpoint, overrides or [])
    run = getattr(_task_module(task), f"run_{task}")
    if task == "probe":  # labels named on the command line must exist (the recipe's may be skipped)
        explicit = "labels" in (parse_overrides(overrides or []).get("probe") or {})
        return run(checkpoint, data, val_data, cfg, json_out, progress=progress, explicit_labels=explicit)
    return run(checkpoint, data, val_data, cfg, json_out, progress=progress)


Rows = list[tuple[str, ...]]


def _table(rows: Rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def _probe(m: dict[str, Any]) -> tuple[str, Rows]:
    kinds = [k for k in ("linear", "attentive") if any(k in v for v in m["per_label"].values())]
    rows = [("label", *[f"{k} top-1" for k in kinds], "majority")]
    rows += [(label, *[_f(v[k]["top1"]) for k in kinds], _f(v["majority_class"])) for label, v in m["per_label"].items()]
    return f"probe on {m['num_val']} val samples", rows


def _zeroshot(m: dict[str, Any]) -> tuple[str, Rows]:
    rows = [("", "top-1", "top-5"), ("zero-shot", _f(m["top1"]), _f(m["top5"]))]
    rows += [(f"  first {d} dims", _f(v["top1"]), _f(v["top5"])) for d, v in m.get("per_dim", {}).items()]
    rows.append(("chance", _f(m["chance_top1"]), _f(m["chance_top5"])))
    head = f"zero-shot over {m['num_classes']} classes, {m['num_samples']} samples ({m['scorer']} scorer)"
    if "error_no_text" in m:
        head += (f"; prediction error: true class {m['error_true_class']:.4f}, other classes "
                 f"{m['error_other_classes']:.4f}, no text {m['error_no_text']:.4f}")
    return head, rows


def _retrieval(m: dict[str, Any]) -> tuple[str, Rows]:
    directions = (("image->text", "image_to_text"), ("text->image", "text_to_image"))
    rows: Rows = [("", "R@1", "R@5", "R@10")]
    rows += [(name, *[_f(m[f"{d}_r{k}"]) for k in (1, 5, 10)]) for name, d in directions]
    for dim, v in m.get("per_dim", {}).items():
        rows += [(f"  {name}, first {dim} dims", *[_f(v[f"{d}_r{k}"]) for k in (1, 5, 10)]) for name, d in directions]
    rows.append(("chance", _f(m["chance_r1"]), _f(m["chance_r5"]), _f(m["chance_r10"])))
    return f"retrieval in {m['num_blocks']} blocks of {m['block_size']} ({m['scorer']} scorer)", rows


def _segment(m: dict[str, Any]) -> tuple[str, Rows]:
    rows = [("", "mIoU", "pixel acc."), ("linear head", _f(m["miou"]), _f(m["pixel_accuracy"])),
            (f"majority class ({m['majority_class']})", _f(m["majority_miou"]), _f(m["majority_pixel_accuracy"]))]
    rows += [(f"  IoU {name}", _f(iou), "") for name, iou in m["per_class_iou"].items()]
    return (f"segmentation: {m['num_classes']} classes, {m['num_val']} val images "
            f"(head trained on {m['num_train']}, lr {m['lr']:g})"), rows


def _grounding(m: dict[str, Any]) -> tuple[str, Rows]:
    def row(name: str, v: dict[str, Any]) -> tuple[str, ...]:
        return (name, _f(v["pointing_accuracy"]), _f(v["pointing_chance"]), _f(v["mass_in_object"]), _f(v["mass_chance"]))

    rows = [("", "pointing", "chance", "mass in object", "chance"), row("all words", m)]
    rows += [row(f"  {a} words", v) for a, v in m["per_attribute"].items()]
    if "overlap" in m:
        rows.append(row("overlaps O (paper)", m["overlap"]))
    return (f"grounding ({m['variant']} conditioner): {m['words']} words naming one object in {m['num_samples']} "
            f"val images; skipped words: " + ", ".join(f"{k} {v}" for k, v in m["skipped_words"].items())), rows


def _caption(m: dict[str, Any]) -> tuple[str, Rows]:
    rows = [("", "CIDEr", "BLEU-4"), ("decoder", _f(m["cider"]), _f(m["bleu4"]))]
    if "blind_cider" in m:
        rows.append(("blind decoder (no image)", _f(m["blind_cider"]), _f(m["blind_bleu4"])))
    return (f"captioning: {m['num_val']} val images, {m['num_val_references']} references (decoder trained on "
            f"{m['num_train']} images, {m['num_train_captions']} captions, {m['captions_cut']} cut; {m['decoding']})"), rows


def _vqa(m: dict[str, Any]) -> tuple[str, Rows]:
    head = "decoder" if m.get("head") == "decoder" else "head"
    types = list(m["per_type"])
    rows = [("", "all", *types), (f"VQA {head}", _f(m["accuracy"]), *[_f(m["per_type"][t]) for t in types])]
    if "blind_accuracy" in m:
        rows.append((f"blind {head} (no image)", _f(m["blind_accuracy"]), *[_f(m["blind_per_type"][t]) for t in types]))
    rows.append(("majority answer per type", _f(m["per_type_majority_overall"]),
                 *[_f(m["per_type_majority"][t]) for t in types]))
    rows.append(("majority answer", _f(m["majority_baseline"]), *["" for _ in types]))
    return (f"VQA: {m['num_test_questions']} test questions, {m['num_answers']} answers "
            f"({head} trained on {m['num_train_questions']})"), rows


FORMATS = {"probe": _probe, "zeroshot": _zeroshot, "retrieval": _retrieval, "segment": _segment,
           "grounding": _grounding, "caption": _caption, "vqa": _vqa}


def format_result(result: dict[str, Any]) -> str:
    """A few lines for the terminal: the task's headline numbers beside their chance levels."""
    head, rows = FORMATS[result["task"]](result["metrics"])
    return head + "\n" + _table(rows)
