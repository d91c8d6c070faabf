"""Methods compared on the synthetic captioned scenes: same encoder, steps, masks and seeds,
then a linear probe of each frozen encoder on the scene attributes (and, with --zeroshot,
zero-shot shape classification where the method relates images and text); mean +- std over seeds.

Both recipes (``recipes/ijepa_quickstart.yaml``, ``recipes/tcjepa_quickstart.yaml``) share every
setting but the conditioner; a seed fixes initialisation, data order and masks alike for both
(the conditioner's own initialisation uses a separate RNG stream). Finished runs are reused, so
an interrupted comparison continues where it stopped.

    python benchmarks/compare_tcjepa.py --seeds 0,1,2 --out runs/compare
    python benchmarks/compare_tcjepa.py --variant "TC-JEPA every=2=recipes/tcjepa_quickstart.yaml:conditioner.every=2"

Every baseline (``--all-methods``: I-JEPA, TC-JEPA, SALT stage 1 -> stage 2, CLIP, SigLIP):

    python benchmarks/compare_tcjepa.py --all-methods --zeroshot --seeds 0,1,2 --steps 150 --out runs/methods

``{seed}`` and ``{out}`` in a variant's overrides are replaced (SALT stage 2 names its seed's
stage-1 run as ``teacher.checkpoint={out}/salt_stage_1_s{seed}``); variants train in the order
given, so a teacher comes before its student.

Dense evaluation and grounding (issue 21's table): ``--segment`` adds each run's linear
segmentation mIoU (``tcjepa eval segment``), ``--grounding`` the pointing game of each TC-JEPA
run's conditioner (``tcjepa eval grounding``), ``--random-init`` a row for the I-JEPA recipe's
encoder at initialisation (the seed's first draw), probed and segmented like the trained ones:

    python benchmarks/compare_tcjepa.py --all-methods --segment --grounding --random-init --shuffled-captions \
      --seeds 0,1,2 --steps 150 --out runs/dense

Does the predictor use what the captions say? ``--retrieval`` adds image->text and text->image
recall@1 (``tcjepa eval retrieval``, blocks of 32): a TC-JEPA run ranks captions by how much each
lowers its predictor's error, so a run trained on shuffled captions should sit at chance (0.031).

Vision-language evaluation (issue 22's table): ``--caption`` adds each run's captioning CIDEr
and BLEU-4 with the blind decoder's CIDEr (``tcjepa eval caption``), ``--vqa-decoder`` the
generative VQA accuracy (``tcjepa eval vqa --set vqa.head=decoder``); both also for
``--random-init``. ``--vqa-data DIR`` scores the VQA decoder on another data set's ``DIR/train`` and
``DIR/test`` splits instead of the scenes' own QA (``tcjepa data easy-vqa --out DIR``: easy-vqa),
with the encoders still trained on the scenes:

    python benchmarks/compare_tcjepa.py --seeds 0,1,2 --steps 150 --out runs/dense --random-init \
      --vqa-decoder --vqa-data data/easy_vqa --set vqa.epochs=8

Control for "is it the text?": ``--shuffled-captions`` writes ``OUT/data/train_shuffled`` (the
same images and labels, every caption moved to another image by a fixed permutation); a variant
can train on it with ``data.train=OUT/data/train_shuffled`` (the probe still uses the real data).
One fixed permutation leaves each image's wrong captions an identity of that image; the control
without it pairs images and captions afresh each step, within the batch:
``--variant "TC-JEPA shuffled each step=recipes/tcjepa_quickstart.yaml:conditioner.shuffle_captions=true"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tcjepa.config import load_config, project_root

DEFAULT_VARIANTS = {
    "I-JEPA": ("recipes/ijepa_quickstart.yaml", []),
    "TC-JEPA": ("recipes/tcjepa_quickstart.yaml", []),
}
ALL_METHODS = {
    "I-JEPA": ("recipes/ijepa_quickstart.yaml", []),
    "TC-JEPA": ("recipes/tcjepa_quickstart.yaml", []),
    "SALT stage 1": ("recipes/salt_stage1_quickstart.yaml", []),
    "SALT stage 2": ("recipes/salt_stage2_quickstart.yaml", ["teacher.checkpoint={out}/salt_stage_1_s{seed}"]),
    "CLIP": ("recipes/clip_quickstart.yaml", []),
    "SigLIP": ("recipes/siglip_quickstart.yaml", []),
}
TITLES = {"label": "shape", "labels.color": "colour", "labels.count": "count"}


def parse_variant(text: str) -> tuple[str, tuple[str, list[str]]]:
    """``NAME=RECIPE.yaml[:KEY=VALUE,KEY=VALUE]``; NAME may itself contain '='."""
    import re

    m = re.fullmatch(r"(?P<name>.+?)=(?P<recipe>[^=:]+\.ya?ml)(?::(?P<over>.*))?", text)
    if m is None:
        raise SystemExit(f"error: --variant {text!r}: expected NAME=RECIPE.yaml[:KEY=VALUE,...]")
    return m["name"], (m["recipe"], [o for o in (m["over"] or "").split(",") if o])


def slug(name: str) -> str:
    """A variant's run directory name: ``TC-JEPA shuffled captions`` -> ``tc-jepa_shuffled_captions``."""
    return name.lower().replace(" ", "_").replace("=", "").replace("/", "_")


def write_shuffled_captions(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy the shards in ``src`` to ``dst`` with captions permuted across samples: KEY.txt and,
    on multi-caption shards, KEY.json's ``"captions"`` move together (an image gets all of another
    image's captions); labels and every other field stay with their image."""
    import random
    import tarfile
    from collections import defaultdict

    from data_pipelines.shards import write_shards

    if any(dst.glob("*.tar")):
        return dst
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(src.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    samples[key][ext] = tar.extractfile(m).read()
    keys = sorted(samples)
    perm = keys[:]
    random.Random(seed).shuffle(perm)
    out = []
    for key, donor in zip(keys, perm):
        sample = {"__key__": key, **samples[key], "txt": samples[donor].get("txt", b"")}
        if "json" in sample:
            meta, donor_meta = json.loads(sample["json"]), json.loads(samples[donor].get("json", b"{}"))
            meta.pop("captions", None)
            if "captions" in donor_meta:
                meta["captions"] = donor_meta["captions"]
            sample["json"] = json.dumps(meta).encode()
        out.append(sample)
    write_shards(out, dst, shard_size=500)
    return dst


def run_one(recipe: str, overrides: list[str], seed: int, data: Path, run_dir: Path, steps: int | None,
            zeroshot: bool = False, segment: bool = False, grounding: bool = False, caption: bool = False,
            vqa_decoder: bool = False, vqa: VQAData | None = None, probe_kind: str = "",
            retrieval: bool = False) -> dict:
    from tcjepa.eval.probe import run_probe
    from tcjepa.train import train

    train_dir, val_dir = data / "train", data / "val"
    overrides = [o.replace("{seed}", str(seed)).replace("{out}", str(run_dir.parent)) for o in overrides]
    extra = [f"data.train={train_dir}", f"data.val={val_dir}", f"train.seed={seed}", *overrides]
    if steps:
        extra.append(f"train.steps={steps}")
    if probe_kind:
        extra.append(f"probe.kind={probe_kind}")
    if not (run_dir / "final" / "model.safetensors").is_file():
        cfg = load_config(project_root() / recipe, extra)
        t0 = time.time()
        train(cfg, run_dir, progress=False, resume=(run_dir / "checkpoints").is_dir())
        print(f"  trained {run_dir} in {time.time() - t0:.0f} s", flush=True)
    probe = run_dir / "eval" / "probe.json"
    if not probe.is_file():
        run_probe(run_dir, str(train_dir), str(val_dir), progress=False)
    metrics = json.loads(probe.read_text())["metrics"]
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    zs = zeroshot_top1(run_dir, val_dir) if zeroshot else None
    return {**probe_top1(metrics), "zeroshot": zs, "retrieval": retrieval_r1(run_dir, val_dir) if retrieval else None,
            "final_loss": recs[-1]["loss"], "img_per_s": statistics.median(r["img_per_s"] for r in recs if "img_per_s" in r),
            "cond_gate": recs[-1].get("cond_gate"), "cond_entropy": recs[-1].get("cond_entropy"),
            "cond_sparse": recs[-1].get("cond_sparse"), **target_health(recs),
            "miou": segment_miou(run_dir, train_dir, val_dir) if segment else None,
            "grounding": pointing_game(run_dir, val_dir) if grounding else None,
            **vision_language(run_dir, train_dir, val_dir, caption, vqa_decoder, vqa=vqa)}


def target_health(recs: list[dict]) -> dict:
    """The teacher targets' spread and effective rank at the last step that logged them
    (``target_std``, ``target_rankme``): falling while the loss falls means the targets got
    easier, not the prediction better (a step toward collapse)."""
    last = next((r for r in reversed(recs) if "target_std" in r), {})
    return {"target_std": last.get("target_std"), "target_rankme": last.get("target_rankme")}


@dataclass(frozen=True)
class VQAData:
    """Where the VQA decoder trains and is scored (default: the scenes' own splits), and its
    ``vqa.*`` settings; ``name`` tags the cached result of another data set."""

    train: Path | None = None
    test: Path | None = None
    name: str = ""
    overrides: tuple[str, ...] = ()


def vision_language(run_dir: Path, train_dir: Path, val_dir: Path, caption: bool, vqa_decoder: bool,
                    encoder=None, vqa: VQAData | None = None) -> dict:
    """Captioning (CIDEr, BLEU-4, blind CIDEr) and generative VQA accuracy of the frozen encoder
    (the run's, or ``encoder``), each cached in ``RUN_DIR/eval/`` under its own name (so the
    decoder's VQA never overwrites the classifier's ``vqa.json``)."""
    from tcjepa.eval.caption import run_caption
    from tcjepa.eval.tasks import task_config
    from tcjepa.eval.vqa import run_vqa

    vqa = vqa or VQAData()
    tag = "" if encoder is None else "_random_init"
    out: dict = {}
    if caption:
        path = run_dir / "eval" / f"caption_bench{tag}.json"
        m = cached_eval(path, lambda: run_caption(run_dir, str(train_dir), str(val_dir), json_out=path, progress=False,
                                                  save_to_run=False, encoder=encoder))
        out["caption"] = {k: m[k] for k in ("cider", "bleu4", "blind_cider")}
    if vqa_decoder:
        settings = "".join(f"_{o.split('.', 1)[-1].replace('=', '')}" for o in vqa.overrides)  # vqa.epochs=8: _epochs8
        path = run_dir / "eval" / f"vqa_decoder_bench{vqa.name and '_' + vqa.name}{settings}{tag}.json"
        cfg = task_config("vqa", run_dir, ["vqa.head=decoder", *vqa.overrides])
        m = cached_eval(path, lambda: run_vqa(run_dir, str(vqa.train or train_dir), str(vqa.test or val_dir), cfg,
                                              json_out=path, progress=False, save_to_run=False, encoder=encoder))
        out["vqa_decoder"] = m["accuracy"]
    return out


def probe_top1(metrics: dict) -> dict:
    """``top1`` (the linear probe's, or the only kind run) per label, and ``attentive`` per label
    when the attentive probe ran too."""
    per_label = metrics["per_label"]
    out = {"top1": {k: v["top1"] for k, v in per_label.items()}}
    if all("attentive" in v for v in per_label.values()):
        out["attentive"] = {k: v["attentive"]["top1"] for k, v in per_label.items()}
    return out


def cached_eval(path: Path, run) -> dict:
    """The metrics of an evaluation result at ``path``, run (``run()``) only if absent."""
    if not path.is_file():
        run()
    return json.loads(path.read_text())["metrics"]


def segment_miou(run_dir: Path, train_dir: Path, val_dir: Path) -> float:
    from tcjepa.eval.segment import run_segment

    return cached_eval(run_dir / "eval" / "segment.json",
                       lambda: run_segment(run_dir, str(train_dir), str(val_dir), progress=False))["miou"]


def pointing_game(run_dir: Path, val_dir: Path) -> dict | None:
    """Pointing accuracy and attention mass in the object, with their chance levels; None for a
    run without a text conditioner."""
    from tcjepa.checkpoint import load_run_config
    from tcjepa.eval.grounding import run_grounding

    cfg = load_run_config(run_dir)
    if cfg.train.method != "jepa" or not cfg.conditioner.enabled:
        return None
    m = cached_eval(run_dir / "eval" / "grounding.json", lambda: run_grounding(run_dir, str(val_dir), progress=False))
    keys = ("pointing_accuracy", "pointing_chance", "mass_in_object", "mass_chance", "words")
    return {k: m[k] for k in keys}


def random_init(recipe: str, seed: int, data: Path, out: Path, segment: bool, caption: bool = False,
                vqa_decoder: bool = False, vqa: VQAData | None = None) -> dict:
    """Probe (and segment) the recipe's encoder at initialisation: the seed's first draw, as
    ``tcjepa quickstart`` draws its random-init row. Needs a finished run of ``recipe`` at this
    seed for its settings (``out``: its run directory)."""
    from tcjepa.checkpoint import initial_encoder
    from tcjepa.eval.probe import run_probe
    from tcjepa.eval.segment import run_segment

    init = initial_encoder(load_config(project_root() / recipe, [f"train.seed={seed}"]))
    train_dir, val_dir = str(data / "train"), str(data / "val")
    probe_json, segment_json = out / "eval" / "probe_bench_random_init.json", out / "eval" / "segment_bench_random_init.json"
    probe = cached_eval(probe_json, lambda: run_probe(out, train_dir, val_dir, encoder=init, progress=False,
                                                      save_to_run=False, json_out=probe_json))
    miou = None
    if segment:
        miou = cached_eval(segment_json, lambda: run_segment(out, train_dir, val_dir, encoder=init, progress=False,
                                                             save_to_run=False, json_out=segment_json))["miou"]
    return {**probe_top1(probe), "miou": miou,
            **vision_language(out, data / "train", data / "val", caption, vqa_decoder, encoder=init, vqa=vqa)}


def scores_text(run_dir: Path) -> bool:
    """Whether a run relates images and text: contrastive embeddings or a text-conditioned predictor."""
    from tcjepa.checkpoint import load_run_config

    cfg = load_run_config(run_dir)
    return cfg.train.method == "contrastive" or cfg.conditioner.enabled


def zeroshot_top1(run_dir: Path, val_dir: Path) -> float | None:
    """Zero-shot shape top-1 on the val split, or None for a run that cannot score text."""
    from tcjepa.eval.zeroshot import run_zeroshot

    if not scores_text(run_dir):
        return None
    return cached_eval(run_dir / "eval" / "zeroshot.json",
                       lambda: run_zeroshot(run_dir, str(val_dir), progress=False))["top1"]


def retrieval_r1(run_dir: Path, val_dir: Path) -> dict | None:
    """Image->text and text->image recall@1 in blocks of 32 (``tcjepa eval retrieval``; a TC-JEPA
    run scores a caption by how much it lowers the predictor's error, so recall above chance
    means the predictor uses what the caption says), or None for a run that cannot score text."""
    from tcjepa.eval.retrieval import run_retrieval

    if not scores_text(run_dir):
        return None
    m = cached_eval(run_dir / "eval" / "retrieval.json", lambda: run_retrieval(run_dir, str(val_dir), progress=False))
    return {"image_to_text_r1": m["image_to_text_r1"], "text_to_image_r1": m["text_to_image_r1"]}


DIGITS = {"target RankMe": 1}  # decimals of a column, where not 3


def summarise(results: dict[str, dict[int, dict]]) -> str:
    labels = list(next(iter(next(iter(results.values())).values()))["top1"])
    every = [r for by_seed in results.values() for r in by_seed.values()]
    attentive = [(f"{TITLES.get(k, k)} (attentive)", lambda r, k=k: (r.get("attentive") or {}).get(k)) for k in labels]
    extra = [(title, get) for title, get in (
        *attentive,
        ("zero-shot shape", lambda r: r.get("zeroshot")),
        ("retrieval i->t R@1", lambda r: (r.get("retrieval") or {}).get("image_to_text_r1")),
        ("retrieval t->i R@1", lambda r: (r.get("retrieval") or {}).get("text_to_image_r1")),
        ("mIoU", lambda r: r.get("miou")),
        ("pointing (chance)", lambda r: (r.get("grounding") or {}).get("pointing_accuracy")),
        ("mass in object (chance)", lambda r: (r.get("grounding") or {}).get("mass_in_object")),
        ("CIDEr", lambda r: (r.get("caption") or {}).get("cider")),
        ("blind CIDEr", lambda r: (r.get("caption") or {}).get("blind_cider")),
        ("BLEU-4", lambda r: (r.get("caption") or {}).get("bleu4")),
        ("VQA (decoder)", lambda r: r.get("vqa_decoder")),
        ("cond_sparse", lambda r: r.get("cond_sparse")),
        ("cond_entropy", lambda r: r.get("cond_entropy")),
        ("target std", lambda r: r.get("target_std")),
        ("target RankMe", lambda r: r.get("target_rankme")),
    ) if any(get(r) is not None for r in every)]
    chance = {"pointing (chance)": "pointing_chance", "mass in object (chance)": "mass_chance"}
    head = ("| method | " + " | ".join(TITLES.get(k, k) for k in labels) + "".join(f" | {t}" for t, _ in extra)
            + " | final loss | img/s |")
    lines = [head, "|---" * (len(labels) + 3 + len(extra)) + "|"]

    def fmt(xs: list[float], digits: int = 3) -> str:
        if not xs:
            return "—"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"

    for name, by_seed in results.items():
        runs = list(by_seed.values())
        cells = [fmt([r["top1"][k] for r in runs]) for k in labels]
        for title, get in extra:
            values = [get(r) for r in runs if get(r) is not None]
            cells.append(fmt(values, DIGITS.get(title, 3)) + (f" ({statistics.mean(r['grounding'][chance[title]] for r in runs):.3f})"
                                        if title in chance and values else ""))
        losses = [r["final_loss"] for r in runs if r.get("final_loss") is not None]
        speeds = [r["img_per_s"] for r in runs if r.get("img_per_s") is not None]
        lines.append(f"| {name} (n={len(runs)}) | " + " | ".join(cells)
                     + f" | {fmt(losses, 4)} | {f'{statistics.median(speeds):.0f}' if speeds else '—'} |")
    # seeds pair the runs (same init, data order and masks): paired differences to the first method
    ref_name, ref = next(iter(results.items()))
    for name, by_seed in list(results.items())[1:]:
        seeds = [s for s in by_seed if s in ref]
        if not seeds:
            continue
        cells = [fmt([by_seed[s]["top1"][k] - ref[s]["top1"][k] for s in seeds]) for k in labels]
        wins = [sum(by_seed[s]["top1"][k] > ref[s]["top1"][k] for s in seeds) for k in labels]
        cells = [f"{c} ({w}/{len(seeds)} seeds up)" for c, w in zip(cells, wins)]
        for title, get in extra:
            pairs = [(get(by_seed[s]), get(ref[s])) for s in seeds]
            diffs = [a - b for a, b in pairs if a is not None and b is not None]
            cells.append(f"{fmt(diffs, DIGITS.get(title, 3))} ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds up)" if diffs else "")
        lines.append(f"| {name} − {ref_name}, paired | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (default: the recipes')")
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--val-samples", type=int, default=1000)
    p.add_argument("--captions-per-image", type=int, default=1,
                   help="captions per synthetic scene (KEY.json \"captions\"; the paper conditioner max-pools "
                   "up to conditioner.max_captions of them); OUT/data must not hold scenes written with another N")
    p.add_argument("--probe-kind", default="", choices=["", "linear", "attentive", "both"],
                   help="probe.kind of every run (default: the recipes'); both adds attentive-probe columns")
    p.add_argument("--shuffled-captions", action="store_true", help="also write OUT/data/train_shuffled (control)")
    p.add_argument("--variant", action="append", default=[], help="NAME=RECIPE[:KEY=VALUE,...]; repeatable; "
                   "replaces the default I-JEPA / TC-JEPA pair")
    p.add_argument("--all-methods", action="store_true", help="every baseline: I-JEPA, TC-JEPA, SALT, CLIP, SigLIP")
    p.add_argument("--zeroshot", action="store_true", help="also zero-shot shape top-1 where defined")
    p.add_argument("--retrieval", action="store_true", help="also image<->text recall@1 of runs that score text "
                   "(tcjepa eval retrieval, blocks of 32: chance 0.031); TC-JEPA through its predictor")
    p.add_argument("--segment", action="store_true", help="also linear segmentation mIoU (tcjepa eval segment)")
    p.add_argument("--grounding", action="store_true", help="also the pointing game of TC-JEPA runs (tcjepa eval grounding)")
    p.add_argument("--caption", action="store_true", help="also captioning CIDEr / BLEU-4 (tcjepa eval caption)")
    p.add_argument("--vqa-decoder", action="store_true", help="also generative VQA accuracy (eval vqa, vqa.head=decoder)")
    p.add_argument("--vqa-data", default="", help="with --vqa-decoder: score VQA on DIR/train and DIR/test "
                   "(e.g. `tcjepa data easy-vqa --out DIR`) instead of the scenes' own QA")
    p.add_argument("--set", nargs="+", default=[], metavar="vqa.KEY=VALUE", help="settings of the VQA decoder")
    p.add_argument("--random-init", action="store_true",
                   help="also a row for the first variant's encoder at initialisation (probe, and mIoU with --segment)")
    args = p.parse_args(argv)
    from data_pipelines.synthetic import write_synthetic_shards

    variants = dict(parse_variant(v) for v in args.variant) if args.variant else (
        ALL_METHODS if args.all_methods else DEFAULT_VARIANTS)
    out = Path(args.out)
    data = out / "data"
    for split, n, seed in (("train", args.train_samples, 0), ("val", args.val_samples, 1)):
        if not any((data / split).glob("*.tar")):
            write_synthetic_shards(data / split, samples=n, shard_size=500, seed=seed, progress=False,
                                   captions_per_image=args.captions_per_image)
    if args.shuffled_captions:
        write_shuffled_captions(data / "train", data / "train_shuffled")
    seeds = [int(s) for s in args.seeds.split(",")]
    vqa_dir = Path(args.vqa_data) if args.vqa_data else None
    vqa = VQAData(vqa_dir and vqa_dir / "train", vqa_dir and vqa_dir / "test", vqa_dir.name if vqa_dir else "",
                  tuple(args.set))
    results: dict[str, dict[int, dict]] = {name: {} for name in variants}
    for seed in seeds:  # seed-major: a partial comparison still pairs the methods
        for name, (recipe, overrides) in variants.items():
            print(f"{name} seed {seed}", flush=True)
            results[name][seed] = run_one(recipe, overrides, seed, data, out / f"{slug(name)}_s{seed}", args.steps,
                                          args.zeroshot, args.segment, args.grounding, args.caption,
                                          args.vqa_decoder, vqa, args.probe_kind, args.retrieval)
            print(f"  {json.dumps(results[name][seed])}", flush=True)
        if args.random_init:
            name, (recipe, _) = next(iter(variants.items()))
            results.setdefault("Random init", {})[seed] = random_init(recipe, seed, data, out / f"{slug(name)}_s{seed}",
                                                                      args.segment, args.caption, args.vqa_decoder,
                                                                      vqa)
            print(f"  random init: {json.dumps(results['Random init'][seed])}", flush=True)
    table = summarise(results)
    print(table)
    (out / "summary.json").write_text(json.dumps({"variants": {k: list(v) for k, v in variants.items()},
                                                   "seeds": seeds, "results": results}, indent=1))
    (out / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
