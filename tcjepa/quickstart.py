"""``tcjepa quickstart``: synthetic shards -> train the tiny TC-JEPA quickstart recipe -> linear
probe -> a results table, in minutes on a laptop CPU. The probe of a randomly initialised encoder
of the same architecture is printed beside it, so the table shows what training bought; the
conditioner's word-to-patch attention is drawn into ``OUT/viz``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tcjepa.config import ConfigError, captions_per_image, load_config, project_root

QUICKSTART_RECIPE = "recipes/tcjepa_quickstart.yaml"
LABEL_TITLES = {"label": "shape", "labels.color": "colour", "labels.count": "count", "labels.bg": "backgr."}


def quickstart(
    out: str | Path = "tcjepa_quickstart",
    overrides: list[str] | None = None,
    progress: bool = True,
    train_samples: int = 3000,
    val_samples: int = 1000,
) -> dict[str, Any]:
    from data_pipelines.synthetic import write_synthetic_shards
    from tcjepa.eval.probe import run_probe
    from tcjepa.checkpoint import initial_encoder
    from tcjepa.train import train

    out = Path(out)
    run_dir = out / "run"
    if (run_dir / "final").exists():
        raise ConfigError(f"{out} already holds a finished quickstart; pass --out NEW_DIR")
    recipe = project_root() / QUICKSTART_RECIPE
    train_dir, val_dir = out / "data" / "train", out / "data" / "val"
    cfg = load_config(recipe, [f"data.train={train_dir}", f"data.val={val_dir}", *(overrides or [])])
    captions = max(captions_per_image(cfg.conditioner), 1)  # the paper variant max-pools over several
    for path, n, seed in ((train_dir, train_samples, 0), (val_dir, val_samples, 1)):
        if not any(path.glob("*.tar")):
            write_synthetic_shards(path, samples=n, shard_size=500, seed=seed, progress=progress,
                                   captions_per_image=captions)
    train(cfg, run_dir, progress=progress)

    trained = run_probe(run_dir, str(train_dir), str(val_dir), progress=progress)["metrics"]
    random_init = initial_encoder(cfg)
    baseline = run_probe(run_dir, str(train_dir), str(val_dir), encoder=random_init, progress=progress,
                         save_to_run=False, json_out=run_dir / "eval" / "probe_random_init.json")["metrics"]
    viz = None
    if cfg.conditioner.enabled:
        from tcjepa.viz import visualize_attention

        viz = out / "viz"
        visualize_attention(run_dir, str(val_dir), viz, samples=4)
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    trained_recs = [r for r in recs if "loss" in r]  # with train.eval_every, step 0 holds only the init's probe
    first, last = trained_recs[0], trained_recs[-1]
    speeds = [r["img_per_s"] for r in recs if isinstance(r.get("img_per_s"), (int, float))]
    print()
    print(f"run: {run_dir}   steps: {cfg.train.steps}   loss {first['loss']:.4f} -> {last['loss']:.4f}   "
          f"{sum(speeds) / max(len(speeds), 1):.0f} img/s (mean over the run)")
    method = "TC-JEPA" if cfg.conditioner.enabled else "I-JEPA"
    print(format_table(trained["per_label"], baseline["per_label"], method))
    if viz is not None:
        print(f"caption-word attention maps: {viz}/attention_*.png")
    return {"run_dir": str(run_dir), "viz": str(viz) if viz else None, "probe": trained, "probe_random_init": baseline,
            "loss_first": first["loss"], "loss_last": last["loss"]}


def format_table(trained: dict[str, dict], baseline: dict[str, dict], method: str = "TC-JEPA") -> str:
    """Linear-probe val top-1 per label: trained encoder, random-init encoder, majority class."""
    keys = list(trained)
    names = [LABEL_TITLES.get(k, k) for k in keys]
    rows = [
        (f"{method}, trained (EMA teacher)", [trained[k]["top1"] for k in keys]),
        ("same encoder, random init", [baseline[k]["top1"] for k in keys]),
        ("majority class", [trained[k]["majority_class"] for k in keys]),
    ]
    width = max(len(r[0]) for r in rows)
    out = ["linear probe on frozen features, val top-1:", "  " + "encoder".ljust(width) + "".join(f"  {n:>8}" for n in names)]
    out += ["  " + name.ljust(width) + "".join(f"  {v:8.3f}" for v in vals) for name, vals in rows]
    return "\n".join(out)

