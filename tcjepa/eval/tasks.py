"""``tcjepa eval TASK``: one entry point for every evaluation, its ``--set`` overrides, and the
short summary the command line prints.

Each task reads its settings from one section, set with ``--set SECTION.KEY=VALUE``: ``probe.*``
(``ProbeConfig``, stored in the run's config, so a recipe can choose its probe), ``zeroshot.*``,
``retrieval.*``, ``vqa.*``, ``segment.*``, ``grounding.*`` and ``caption.*`` (dataclasses beside each task; defaults unless overridden). Keys
are checked as strictly as training configs: a typo is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tcjepa.config import ConfigError, apply_overrides, from_dict, parse_overrides, to_dict

TASKS = ("probe", "zeroshot", "retrieval", "vqa", "segment", "grounding", "caption")


def _task_config_class(task: str) -> type:
    if task == "zeroshot":
        from tcjepa.eval.zeroshot import ZeroShotConfig

        return ZeroShotConfig
    if task == "retrieval":
        from tcjepa.eval.retrieval import RetrievalConfig

        return RetrievalConfig
    if task == "vqa":
        from tcjepa.eval.vqa import VQAConfig

        return VQAConfig
    if task == "segment":
        from tcjepa.eval.segment import SegmentConfig

        return SegmentConfig
    if task == "grounding":
        from tcjepa.eval.grounding import GroundingConfig

        return GroundingConfig
    if task == "caption":
        from tcjepa.eval.caption import CaptionConfig

        return CaptionConfig
    raise ConfigError(f"unknown eval task {task!r}; choose one of {', '.join(TASKS)}")


def task_config(task: str, checkpoint: str | Path, overrides: list[str]) -> Any:
    """The task's settings: its section of ``--set`` overrides over the defaults (for ``probe``,
    over the run's saved ``probe`` section). Keys of other sections are an error."""
    over = parse_overrides(overrides)
    bad = [k for k in over if k != task]
    if bad:
        raise ConfigError(f"--set {bad[0]}.*: only {task}.* keys can be set for eval {task}")
    if task == "probe":
        from tcjepa.checkpoint import load_run_config

        return apply_overrides(load_run_config(checkpoint), overrides).probe
    cls = _task_config_class(task)
    section = over.get(task, {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {task}: expected {task}.KEY=VALUE")
    return from_dict(cls, {**to_dict(cls()), **section}, "--set", prefix=f"{task}.")


def run_eval(task: str, checkpoint: str | Path, data: str, val_data: str = "", overrides: list[str] | None = None,
             json_out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run evaluation ``task`` on a finished run; writes ``RUN_DIR/eval/TASK.json`` (and ``json_out``)
    and returns the result dict (DESIGN.md's shape)."""
    if task not in TASKS:
        raise ConfigError(f"unknown eval task {task!r}; choose one of {', '.join(TASKS)}")
    cfg = task_config(task, checkpoint, overrides or [])
    if task == "probe":
        from tcjepa.eval.probe import run_probe

        explicit = "labels" in (parse_overrides(overrides or []).get("probe") or {})
        return run_probe(checkpoint, data, val_data, cfg, json_out, progress=progress, explicit_labels=explicit)
    if task == "zeroshot":
        from tcjepa.eval.zeroshot import run_zeroshot

        return run_zeroshot(checkpoint, data, val_data, cfg, json_out, progress=progress)
    if task == "retrieval":
        from tcjepa.eval.retrieval import run_retrieval

        return run_retrieval(checkpoint, data, val_data, cfg, json_out, progress=progress)
    if task == "segment":
        from tcjepa.eval.segment import run_segment

        return run_segment(checkpoint, data, val_data, cfg, json_out, progress=progress)
    if task == "grounding":
        from tcjepa.eval.grounding import run_grounding

        return run_grounding(checkpoint, data, val_data, cfg, json_out, progress=progress)
    if task == "caption":
        from tcjepa.eval.caption import run_caption

        return run_caption(checkpoint, data, val_data, cfg, json_out, progress=progress)
    from tcjepa.eval.vqa import run_vqa

    return run_vqa(checkpoint, data, val_data, cfg, json_out, progress=progress)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def format_result(result: dict[str, Any]) -> str:
    """A few lines for the terminal: the task's headline numbers beside their chance levels."""
    task, m = result["task"], result["metrics"]
    f = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    if task == "probe":
        kinds = [k for k in ("linear", "attentive") if any(k in v for v in m["per_label"].values())]
        rows = [("label", *[f"{k} top-1" for k in kinds], "majority")]
        rows += [(label, *[f(v[k]["top1"]) for k in kinds], f(v["majority_class"])) for label, v in m["per_label"].items()]
        head = f"probe on {m['num_val']} val samples"
    elif task == "zeroshot":
        rows = [("", "top-1", "top-5"), ("zero-shot", f(m["top1"]), f(m["top5"]))]
        rows += [(f"  first {d} dims", f(v["top1"]), f(v["top5"])) for d, v in m.get("per_dim", {}).items()]
        rows.append(("chance", f(m["chance_top1"]), f(m["chance_top5"])))
        head = f"zero-shot over {m['num_classes']} classes, {m['num_samples']} samples ({m['scorer']} scorer)"
        if "error_no_text" in m:
            head += (f"; prediction error: true class {m['error_true_class']:.4f}, other classes "
                     f"{m['error_other_classes']:.4f}, no text {m['error_no_text']:.4f}")
    elif task == "retrieval":
        rows = [("", "R@1", "R@5", "R@10")]
        rows += [(name, *[f(m[f"{d}_r{k}"]) for k in (1, 5, 10)])
                 for name, d in (("image->text", "image_to_text"), ("text->image", "text_to_image"))]
        for dim, v in m.get("per_dim", {}).items():
            rows += [(f"  {name}, first {dim} dims", *[f(v[f"{d}_r{k}"]) for k in (1, 5, 10)])
                     for name, d in (("image->text", "image_to_text"), ("text->image", "text_to_image"))]
        rows.append(("chance", f(m["chance_r1"]), f(m["chance_r5"]), f(m["chance_r10"])))
        head = f"retrieval in {m['num_blocks']} blocks of {m['block_size']} ({m['scorer']} scorer)"
    elif task == "segment":
        rows = [("", "mIoU", "pixel acc."), ("linear head", f(m["miou"]), f(m["pixel_accuracy"])),
                (f"majority class ({m['majority_class']})", f(m["majority_miou"]), f(m["majority_pixel_accuracy"]))]
        rows += [(f"  IoU {name}", f(iou), "") for name, iou in m["per_class_iou"].items()]
        head = (f"segmentation: {m['num_classes']} classes, {m['num_val']} val images "
                f"(head trained on {m['num_train']}, lr {m['lr']:g})")
    elif task == "grounding":
        rows = [("", "pointing", "chance", "mass in object", "chance"),
                ("all words", f(m["pointing_accuracy"]), f(m["pointing_chance"]), f(m["mass_in_object"]), f(m["mass_chance"]))]
        rows += [(f"  {a} words", f(v["pointing_accuracy"]), f(v["pointing_chance"]), f(v["mass_in_object"]),
                  f(v["mass_chance"])) for a, v in m["per_attribute"].items()]
        if "overlap" in m:
            o = m["overlap"]
            rows.append(("overlaps O (paper)", f(o["pointing_accuracy"]), f(o["pointing_chance"]), f(o["mass_in_object"]),
                         f(o["mass_chance"])))
        head = (f"grounding ({m['variant']} conditioner): {m['words']} words naming one object in {m['num_samples']} "
                f"val images; skipped words: " + ", ".join(f"{k} {v}" for k, v in m["skipped_words"].items()))
    elif task == "caption":
        rows = [("", "CIDEr", "BLEU-4"), ("decoder", f(m["cider"]), f(m["bleu4"]))]
        if "blind_cider" in m:
            rows.append(("blind decoder (no image)", f(m["blind_cider"]), f(m["blind_bleu4"])))
        head = (f"captioning: {m['num_val']} val images, {m['num_val_references']} references (decoder trained on "
                f"{m['num_train']} images, {m['num_train_captions']} captions, {m['captions_cut']} cut; {m['decoding']})")
    else:
        decoder = m.get("head") == "decoder"
        types = list(m["per_type"])
        rows = [("", "all", *types), ("VQA decoder" if decoder else "VQA head", f(m["accuracy"]),
                                      *[f(m["per_type"][t]) for t in types])]
        if "blind_accuracy" in m:
            rows.append((f"blind {'decoder' if decoder else 'head'} (no image)", f(m["blind_accuracy"]),
                         *[f(m["blind_per_type"][t]) for t in types]))
        rows.append(("majority answer per type", f(m["per_type_majority_overall"]),
                     *[f(m["per_type_majority"][t]) for t in types]))
        rows.append(("majority answer", f(m["majority_baseline"]), *["" for _ in types]))
        head = (f"VQA: {m['num_test_questions']} test questions, {m['num_answers']} answers "
                f"({'decoder' if decoder else 'head'} trained on {m['num_train_questions']})")
    return head + "\n" + _table(rows)

