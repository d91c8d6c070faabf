"""``tcjepa report RUN_DIR ...``: compare runs across all their evaluations in one markdown page.

For each run it reads ``final/config.yaml`` (or ``config.yaml`` of a run still training),
``metrics.jsonl`` and every ``eval/*.json``, and renders

- a table of the runs (method, encoder, steps, last loss, speed, last RankMe when logged);
- a table with one row per evaluation metric and one column per run, plus a reference column
  (majority class, chance, majority answer, the blind caption decoder) so that each number can be
  read: probes, segmentation mIoU, grounding and captioning first, as the headline results of a
  pretraining comparison;
- with ``--out FILE.md``, PNG plots beside it: loss curves, RankMe over steps (when
  ``metrics.jsonl`` has ``target_rankme`` or another ``*rankme`` key), and bars of the
  headline accuracies.

It reads the files as plain data, not through the strict config classes, so that runs written by
older versions of tcjepa still compare.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcjepa.config import ConfigError

TASK_ORDER = ("probe", "segment", "grounding", "caption", "zeroshot", "retrieval", "vqa")


@dataclass
class RunInfo:
    path: Path
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval file stem -> result
    stale: list[str] = field(default_factory=list)  # eval file stems of results from other weights

    @property
    def method(self) -> str:
        return method_name(self.config)


def method_name(cfg: dict[str, Any]) -> str:
    """A readable method name from a resolved config dict."""
    method = (cfg.get("train") or {}).get("method", "jepa")
    if method == "contrastive":
        c = cfg.get("contrastive") or {}
        name = "SigLIP" if c.get("loss") == "siglip" else "CLIP"
        return f"{name} (Matryoshka)" if c.get("matryoshka_dims") else name
    if method == "mae":
        return "MAE (SALT stage 1)"
    if method != "jepa":
        return str(method)
    tc = bool((cfg.get("conditioner") or {}).get("enabled"))
    frozen = (cfg.get("teacher") or {}).get("update") == "frozen"
    name = "TC-JEPA" if tc else "I-JEPA"
    return f"{name} (frozen teacher, SALT stage 2)" if frozen else name


def read_run(path: str | Path) -> RunInfo:
    import yaml

    path = Path(path)
    cfg_path = next((p for p in (path / "final" / "config.yaml", path / "config.yaml") if p.is_file()), None)
    metrics = path / "metrics.jsonl"
    if cfg_path is None and not metrics.is_file():
        raise ConfigError(f"{path}: not a run directory (no config.yaml, final/config.yaml or metrics.jsonl)")
    info = RunInfo(path)
    if cfg_path is not None:
        try:
            info.config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{cfg_path}: invalid YAML: {e}".splitlines()[0]) from e
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            info.records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break  # a run killed mid-write leaves a partial last line
            raise ConfigError(f"{metrics}:{n}: not JSON ({e})") from e
    from tcjepa.checkpoint import weights_id

    current = weights_id(path)
    for p in sorted((path / "eval").glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not JSON ({e})") from e
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict) and "task" in data:
            if data.get("weights_id") and current and data["weights_id"] != current:
                info.stale.append(p.stem)  # evaluated on weights since replaced: never shown beside these
            else:
                info.evals[p.stem] = data
    return info


def unique_names(paths: list[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``s0/run`` and ``s1/run``)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ----------------------------------------------------------------------------- metrics -> rows


def _order(stem: str, task: str) -> tuple[int, str]:
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), stem)


def eval_metrics(result: dict[str, Any], stem: str) -> list[tuple[str, float, float | None]]:
    """(row label, value, reference) for the headline metrics of one evaluation result."""
    task, m = result["task"], result["metrics"]
    rows: list[tuple[str, float, float | None]] = []

    def add(label: str, value: Any, ref: Any = None) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            rows.append((label, float(value), float(ref) if isinstance(ref, (int, float)) else None))

    if task == "probe":
        per_label = m.get("per_label") or {m.get("label", "label"): m}
        for label, v in per_label.items():
            kinds = [k for k in ("linear", "attentive") if isinstance(v.get(k), dict)] or [v.get("kind", "linear")]
            for kind in kinds:
                value = v[kind]["top1"] if isinstance(v.get(kind), dict) else v.get("top1")
                add(f"{stem} {label} top-1 ({kind})", value, v.get("majority_class"))
        for d, v in (m.get("per_dim") or {}).items():
            add(f"{stem} {m.get('label', 'label')} top-1 (linear, first {d} embedding dims)", v.get("top1"),
                m.get("majority_class"))
    elif task == "zeroshot":
        label = f" {m['label']}" if m.get("label") else ""
        add(f"{stem}{label} top-1", m.get("top1"), m.get("chance_top1"))
        add(f"{stem}{label} top-5", m.get("top5"), m.get("chance_top5"))
        for d, v in (m.get("per_dim") or {}).items():
            add(f"{stem}{label} top-1, first {d} dims", v.get("top1"), m.get("chance_top1"))
    elif task == "retrieval":
        for d, title in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            for k in (1, 5, 10):
                add(f"{stem} {title} R@{k}", m.get(f"{d}_r{k}"), m.get(f"chance_r{k}"))
        for dim, v in (m.get("per_dim") or {}).items():
            for d, title in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
                add(f"{stem} {title} R@1, first {dim} dims", v.get(f"{d}_r1"), m.get("chance_r1"))
    elif task == "vqa":
        decoder = m.get("head") == "decoder"  # generated answers: rows apart from the classifier's
        tag = " (decoder)" if decoder else ""
        add(f"{stem} accuracy{tag}", m.get("accuracy"), m.get("majority_baseline"))
        for t, v in (m.get("per_type") or {}).items():
            add(f"{stem} {t}{tag}", v, (m.get("per_type_majority") or {}).get(t))
        add(f"{stem} blind {'decoder' if decoder else 'head'} (no image)", m.get("blind_accuracy"),
            m.get("majority_baseline"))
    elif task == "caption":
        add(f"{stem} CIDEr", m.get("cider"), m.get("blind_cider"))
        add(f"{stem} BLEU-4", m.get("bleu4"), m.get("blind_bleu4"))
    elif task == "segment":
        add(f"{stem} mIoU", m.get("miou"), m.get("majority_miou"))
        add(f"{stem} pixel accuracy", m.get("pixel_accuracy"), m.get("majority_pixel_accuracy"))
    elif task == "grounding":
        add(f"{stem} pointing accuracy", m.get("pointing_accuracy"), m.get("pointing_chance"))
        add(f"{stem} attention mass in object", m.get("mass_in_object"), m.get("mass_chance"))
        for attr, v in (m.get("per_attribute") or {}).items():
            add(f"{stem} pointing accuracy, {attr} words", v.get("pointing_accuracy"), v.get("pointing_chance"))
    else:
        for k, v in m.items():
            add(f"{stem} {k}", v)
    return rows


def headline(result: dict[str, Any], stem: str) -> tuple[str, float, float | None] | None:
    """The one number per evaluation drawn in the accuracy bars (none for captioning: CIDEr is
    not a fraction)."""
    if result["task"] == "caption":
        return None
    rows = eval_metrics(result, stem)
    return rows[0] if rows else None


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def render_markdown(runs: list[RunInfo], plots: dict[str, str] | None = None) -> str:
    show_rank = bool(rankme_keys(runs))
    lines = ["# tcjepa report", "", "## Runs", "",
             "| run | method | encoder | steps | last loss | img/s |" + (" RankMe |" if show_rank else ""),
             "|---|---|---|---|---|---|" + ("---|" if show_rank else "")]
    for r in runs:
        model = r.config.get("model") or {}
        last = r.records[-1] if r.records else {}
        steps = last.get("step", (r.config.get("train") or {}).get("steps", ""))
        speed = [x["img_per_s"] for x in r.records[-20:] if isinstance(x.get("img_per_s"), (int, float))]
        row = (f"| {r.name} | {r.method} | {model.get('encoder', '')} @ {model.get('image_size', '')} px "
               f"| {steps} | {_fmt(last.get('loss'), 4)} | {_fmt(sorted(speed)[len(speed) // 2] if speed else None, 0)} |")
        if show_rank:
            rank = next((x[k] for x in reversed(r.records) for k in rankme_keys([r])
                         if isinstance(x.get(k), (int, float))), None)
            row += f" {_fmt(rank, 1)} |"
        lines.append(row)
    stems = sorted({(s, res["task"]) for r in runs for s, res in r.evals.items()}, key=lambda st: _order(*st))
    if stems:
        table: dict[str, dict[str, float]] = {}
        refs: dict[str, float | None] = {}
        for stem, _ in stems:
            for r in runs:
                if stem not in r.evals:
                    continue
                for label, value, ref in eval_metrics(r.evals[stem], stem):
                    table.setdefault(label, {})[r.name] = value
                    if refs.get(label) is None:
                        refs[label] = ref
        lines += ["", "## Evaluations", "",
                  "Rows are metrics (fractions in [0, 1]; CIDEr on its 0-10 scale); the reference column is the "
                  "majority class (probe, segmentation), chance (zero-shot, retrieval, grounding), the majority "
                  "answer (VQA; per question type on type rows) or the decoder trained without the image "
                  "(captioning).", "",
                  "| metric | " + " | ".join(r.name for r in runs) + " | reference |",
                  "|---|" + "---|" * (len(runs) + 1)]
        for label, values in table.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(values.get(r.name)) for r in runs) + f" | {_fmt(refs[label])} |")
        lines += ["", "Data (train -> evaluated split):", ""]
        for stem, _ in stems:
            used: dict[str, list[str]] = {}
            for r in runs:
                if stem in r.evals:
                    res = r.evals[stem]
                    text = f"`{res['data']}`" + (f" -> `{res['val_data']}`" if res.get("val_data") else "")
                    used.setdefault(text, []).append(r.name)
            for text, names in used.items():
                who = "" if len(used) == 1 else f" ({', '.join(names)})"
                lines.append(f"- {stem}{who}: {text}")
    else:
        lines += ["", "No evaluations yet: run `tcjepa eval {probe,zeroshot,retrieval,vqa} --checkpoint RUN ...`."]
    for r in runs:
        if r.stale:
            lines += ["", f"Left out for {r.name}: {', '.join(f'eval/{s}.json' for s in r.stale)} (evaluated on "
                          "earlier weights of the run; evaluate again)"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def rankme_keys(runs: list[RunInfo]) -> list[str]:
    """The ``metrics.jsonl`` keys holding a RankMe (``target_rankme``, ``rankme``, ...)."""
    return sorted({k for r in runs for x in r.records for k, v in x.items()
                   if k.endswith("rankme") and isinstance(v, (int, float))})


def probe_keys(runs: list[RunInfo]) -> list[str]:
    """The periodic probe's keys: ``probe_top1`` (the first of ``probe.labels``), then
    ``probe_top1/KEY`` for the others."""
    found = {k for r in runs for x in r.records for k, v in x.items()
             if (k == "probe_top1" or k.startswith("probe_top1/")) and isinstance(v, (int, float))}
    return sorted(found, key=lambda k: (k != "probe_top1", k))


def probe_label(run: RunInfo, key: str) -> str:
    """The label a periodic-probe key scores: ``probe_top1/KEY`` names it, ``probe_top1`` is the
    run's first ``probe.labels`` entry."""
    if key != "probe_top1":
        return key.split("/", 1)[1]
    labels = run.config.get("probe", {}).get("labels") or ["label"]
    return str(labels[0])


def draw_plots(runs: list[RunInfo], out: Path) -> dict[str, str]:
    """The report's PNGs, named after ``out`` (``FILE_loss.png`` ...); returns name -> file name."""
    from tcjepa.eval.plots import bar_plot, line_plot

    stem, written = out.with_suffix(""), {}

    def curve(key: str) -> dict[str, tuple[list[float], list[float]]]:
        return {r.name: ([x["step"] for x in r.records if isinstance(x.get(key), (int, float))],
                         [x[key] for x in r.records if isinstance(x.get(key), (int, float))])
                for r in runs if any(isinstance(x.get(key), (int, float)) for x in r.records)}

    loss = curve("loss")
    if loss:
        p = line_plot(loss, f"{stem}_loss.png", "training loss", "step", "loss", log_y=True)
        written["loss curves"] = p.name
    rank = {}
    keys = rankme_keys(runs)
    for key in keys:
        rank.update({(name if len(keys) == 1 else f"{name} {key}"): xy for name, xy in curve(key).items()})
    if rank:
        p = line_plot(rank, f"{stem}_rankme.png", "RankMe (effective rank) over training", "step", "RankMe")
        written["RankMe over steps"] = p.name
    for key, title in (("target_std", "target std over training (collapse: towards 0)"),
                       ("cond_sparse", "TC-JEPA overlap sparsity (cond_sparse)"),
                       ("cond_gate", "TC-JEPA gate (cond_gate, gated_topk)")):
        xy = curve(key)
        if xy:
            p = line_plot(xy, f"{stem}_{key}.png", title, "step", key)
            written[f"{key} over steps"] = p.name
    probe, by_name, keys = {}, {r.name: r for r in runs}, probe_keys(runs)
    for key in keys:
        probe.update({(name if len(keys) == 1 else f"{name} {probe_label(by_name[name], key)}"): xy
                      for name, xy in curve(key).items()})
    if probe:
        p = line_plot(probe, f"{stem}_probe.png", "linear probe top-1 over training (train.eval_every; step 0: init)",
                      "step", "top-1")
        written["probe top-1 over steps"] = p.name
    heads: dict[str, dict[str, float]] = {}
    refs: dict[str, float | None] = {}
    stems = sorted({(s, res["task"]) for r in runs for s, res in r.evals.items()}, key=lambda st: _order(*st))
    for s, _ in stems:
        for r in runs:
            h = headline(r.evals[s], s) if s in r.evals else None
            if h is not None:
                heads.setdefault(h[0], {})[r.name] = h[1]
                refs.setdefault(h[0], h[2])
    if heads:
        cats = list(heads)
        p = bar_plot(cats, {r.name: [heads[c].get(r.name) for c in cats] for r in runs}, f"{stem}_accuracy.png",
                     "headline accuracies", markers=[refs[c] for c in cats], marker_name="majority / chance")
        written["accuracies"] = p.name
    return written


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> str:
    """Render the report of ``run_dirs``; with ``out``, write it there with its PNGs beside it.
    Returns the markdown."""
    if not run_dirs:
        raise ConfigError("report: name at least one RUN_DIR")
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(p) for p in paths]
    for r, name in zip(runs, unique_names(paths)):
        r.name = name
    plots = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plots = draw_plots(runs, out)
    text = render_markdown(runs, plots)
    if out is not None:
        out.write_text(text)
    return text
