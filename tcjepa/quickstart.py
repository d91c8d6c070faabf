"""``tcjepa quickstart``: synthetic shards -> train the tiny quickstart recipe -> linear probe ->
a results table, in minutes on a laptop CPU. The probe of a randomly initialised encoder of the
same architecture is printed beside it, so the table shows what training bought."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tcjepa.config import ConfigError, load_config, project_root

QUICKSTART_RECIPE = "recipes/ijepa_quickstart.yaml"


def quickstart(out: str | Path = "tcjepa_quickstart", overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    from data_pipelines.synthetic import write_synthetic_shards
    from tcjepa.checkpoint import load_encoder
    from tcjepa.eval.probe import run_probe
    from tcjepa.methods.jepa import build_student
    from tcjepa.train import train

    out = Path(out)
    run_dir = out / "run"
    if (run_dir / "final").exists():
        raise ConfigError(f"{out} already holds a finished quickstart; pass --out NEW_DIR")
    recipe = project_root() / QUICKSTART_RECIPE
    train_dir, val_dir = out / "data" / "train", out / "data" / "val"
    for path, n, seed in ((train_dir, 3000, 0), (val_dir, 1000, 1)):
        if not any(path.glob("*.tar")):
            print(f"writing {n} synthetic scenes to {path}")
            write_synthetic_shards(path, samples=n, shard_size=500, seed=seed)
    cfg = load_config(recipe, [f"data.train={train_dir}", f"data.val={val_dir}", *(overrides or [])])
    train(cfg, run_dir, progress=progress)

    trained = run_probe(run_dir, str(train_dir), str(val_dir), progress=progress)["metrics"]
    torch.manual_seed(cfg.train.seed)
    random_init = build_student(cfg).encoder
    baseline = run_probe(run_dir, str(train_dir), str(val_dir), encoder=random_init, progress=progress,
                         save_to_run=False, json_out=run_dir / "eval" / "probe_random_init.json")["metrics"]
    last = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l][-1]
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    rows = [
        ("I-JEPA (trained, EMA teacher)", trained["top1"]),
        ("random-init encoder", baseline["top1"]),
        ("majority class", trained["chance"]),
    ]
    print()
    print(f"run: {run_dir}   steps: {cfg.train.steps}   loss {first['loss']:.4f} -> {last['loss']:.4f}   "
          f"{last['img_per_s']:.0f} img/s")
    print(f"linear probe on '{cfg.probe.label_key}' (shape of the largest object), val top-1:")
    width = max(len(r[0]) for r in rows)
    print(f"  {'encoder'.ljust(width)}  top-1")
    for name, acc in rows:
        print(f"  {name.ljust(width)}  {acc:.3f}")
    return {"run_dir": str(run_dir), "probe": trained, "probe_random_init": baseline,
            "loss_first": first["loss"], "loss_last": last["loss"]}
