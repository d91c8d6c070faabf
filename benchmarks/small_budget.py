"""Does a small-budget run beat its own random initialisation? Train a recipe for N steps per
seed on the synthetic scenes, probe the trained encoder and the same encoder at initialisation
(the student's first draw after the seed, as ``tcjepa quickstart`` does), and print trained - init
per label with its mean and standard deviation over the seeds (RESULTS.md, "Small budgets").

    python benchmarks/small_budget.py --recipe recipes/ijepa_quickstart.yaml --steps 900 --seeds 0,1,2 \\
        --out runs/small_budget [--set train.eval_every=150 ...]

``--probe`` reads both encoders another way (``probe.last_blocks=4``: the last four blocks;
``probe.encoder=student``; ``probe.kind=both``: also the attentive probe). Runs already finished in
``--out`` are probed again, not retrained; every result is appended as one
JSON line to ``OUT/results.jsonl``. ``--train-data`` / ``--val-data`` take other shards (the probe reads
whichever of the recipe's ``probe.labels`` they hold), e.g. Fashion-MNIST as the README writes it:

    python benchmarks/small_budget.py --train-data fmnist/train --val-data fmnist/test --out runs/small_budget_fmnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probe_top1(run: Path, train: Path, val: Path, encoder: torch.nn.Module | None = None,
               probe_set: list[str] | None = None) -> dict[str, float]:
    """Top-1 per label (and ``LABEL (attentive)`` when both kinds run) with the run's probe settings
    and ``probe_set`` over them; the run's own eval/probe.json is written only with its own."""
    from tcjepa.eval.probe import run_probe
    from tcjepa.eval.tasks import task_config

    cfg = task_config("probe", run, probe_set or [])
    res = run_probe(run, str(train), str(val), cfg, encoder=encoder, progress=False,
                    save_to_run=encoder is None and not probe_set)
    out = {}
    for label, m in res["metrics"]["per_label"].items():
        out[label] = round(m["top1"], 3)
        if m["kind"] == "linear" and "attentive" in m:
            out[f"{label} (attentive)"] = round(m["attentive"]["top1"], 3)
    return out


def one_seed(recipe: Path, steps: int, seed: int, out: Path, train_data: Path, val_data: Path,
             overrides: list[str], probe_set: list[str] | None = None) -> dict:
    from tcjepa.checkpoint import initial_encoder
    from tcjepa.config import load_config
    from tcjepa.train import train

    run = out / f"{recipe.stem}_{steps}_s{seed}"
    cfg = load_config(recipe, [f"data.train={train_data}", f"data.val={val_data}", f"train.seed={seed}",
                               f"train.steps={steps}", "checkpoint.every=0", *overrides])
    t0 = time.time()
    if not (run / "final" / "model.safetensors").is_file():
        train(cfg, run, progress=False)
    wall = time.time() - t0
    init = initial_encoder(cfg)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    return {"recipe": str(recipe), "steps": steps, "seed": seed, "overrides": overrides, "train_seconds": round(wall),
            "data": [str(train_data), str(val_data)], "probe": probe_set or [],
            "trained": probe_top1(run, train_data, val_data, probe_set=probe_set),
            "init": probe_top1(run, train_data, val_data, init, probe_set),
            "probe_curve": [(r["step"], round(r["probe_top1"], 3)) for r in recs if "probe_top1" in r],
            "probe_curves": {k.split("/", 1)[1]: [(r["step"], round(r[k], 3)) for r in recs if k in r]
                             for k in sorted({k for r in recs for k in r if k.startswith("probe_top1/")})}}


def summary(results: list[dict]) -> str:
    """One line per label: trained - init per seed, then mean +- sd over the seeds."""
    lines = []
    for label in results[0]["trained"]:
        diffs = [r["trained"][label] - r["init"][label] for r in results]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        lines.append(f"{label:>16}: trained - init " + " ".join(f"{d:+.3f}" for d in diffs)
                     + f"   mean {statistics.mean(diffs):+.3f} +- {sd:.3f} (n={len(diffs)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from data_pipelines.synthetic import write_synthetic_shards

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", type=Path, default=Path("recipes/ijepa_quickstart.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("runs/small_budget"))
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--val-samples", type=int, default=1000)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--probe", dest="probe_set", nargs="*", default=[], metavar="probe.KEY=VALUE",
                   help="probe settings for both encoders, e.g. probe.last_blocks=4 probe.encoder=student "
                        "probe.kind=both (a finished run is probed again with them)")
    p.add_argument("--train-data", type=Path, help="shards to train and fit the probe on, instead of the synthetic "
                   "scenes (e.g. Fashion-MNIST or easy-vqa written by tcjepa data ...); needs --val-data")
    p.add_argument("--val-data", type=Path, help="shards the probe is scored on")
    args = p.parse_args(argv)
    if (args.train_data is None) != (args.val_data is None):
        p.error("--train-data and --val-data go together")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.train_data is not None:
        train_data, val_data = args.train_data, args.val_data
    else:
        data = args.out / "data"
        for split, n, seed in (("train", args.train_samples, 0), ("val", args.val_samples, 1)):
            if not any((data / split).glob("*.tar")):
                write_synthetic_shards(data / split, samples=n, shard_size=500, seed=seed, progress=False)
        train_data, val_data = data / "train", data / "val"
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = one_seed(args.recipe, args.steps, seed, args.out, train_data, val_data, args.overrides, args.probe_set)
        print(json.dumps(r), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        results.append(r)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
