"""Check the run planner's activation estimate (``tcjepa plan``) against measured memory on CPU.

For small I-JEPA / TC-JEPA students (vit_micro / vit_tiny, I-JEPA multi-block masks, batch 8-32)
one training step runs for real (``tcjepa.plan.probe_step``: teacher targets, student forward
and loss as ``JEPA.loss`` runs them), with and without per-block activation checkpointing, and
two measurements are set beside the planner's analytic figures for the *same* masks:

* **saved**: the bytes autograd keeps for backward at the end of the forward, counted through
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages; parameters and buffers left
  out): ``tcjepa.plan.measure_activations``. Compared with ``Activations.saved``.
* **peak**: the highest memory, over the whole step (teacher forward, student forward, backward),
  held by tensors that are not model states: torch.profiler's memory timeline
  (``profile_memory=True``; its categories tell parameters and parameter gradients apart from
  activations, temporaries and autograd buffers). Compared with ``Activations.peak``, which adds
  the one block re-run at a time under checkpointing. The timeline is a private torch API
  (``torch.profiler._memory_profiler``), hence a benchmark and not a test.

fp32 is what the planner's figures are for on any device; ``bf16 (CPU)`` runs CPU autocast,
which keeps LayerNorm and softmax in bf16, where CUDA autocast keeps them in fp32 (the planner's
``act_bytes(precision, device)``): it checks the bf16 structure of the estimate, not CUDA's dtypes.

``--gpu-json`` checks CUDA instead, without a GPU: it reads the JSON of a ``bench_gpu.py`` run
(plain PyTorch, bf16 autocast, AdamW, one GPU; peak = ``torch.cuda.max_memory_allocated`` over
steady steps) and sets the planner's ZeRO-0, one-GPU total (weights, gradients, AdamW, teacher,
activations) for the same encoder, predictor, batch and mask policy beside each measured peak,
over several mask draws (the measured peak is the largest of its timed steps).

    python benchmarks/bench_plan_memory.py                 # all cases (~1 min on 2 CPU cores)
    python benchmarks/bench_plan_memory.py --quick         # one case
    python benchmarks/bench_plan_memory.py --json out.json --no-peak
    python benchmarks/bench_plan_memory.py --gpu-json benchmarks/results/gpu_h200_2026-11-26_flash.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcjepa.config import load_config  # noqa: E402
from tcjepa.plan import StepProbe, estimate_for_masks, probe_step, saved_tensor_bytes  # noqa: E402

MIB = 2**20
QUICK = str(ROOT / "recipes" / "ijepa_quickstart.yaml")
TCJEPA = str(ROOT / "recipes" / "tcjepa_quickstart.yaml")
AT_224 = ["model.image_size=224", "model.depth=null"]


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    batch: int


CASES = [
    Case("I-JEPA vit_micro_16 @224, pred 6x192", QUICK,
         ("model.encoder=vit_micro_16", *AT_224, "model.predictor_depth=6", "model.predictor_width=192"), 16),
    Case("I-JEPA vit_tiny_16 @224, pred 6x192", QUICK,
         ("model.encoder=vit_tiny_16", *AT_224, "model.predictor_depth=6", "model.predictor_width=192"), 8),
    Case("I-JEPA quickstart (vit_tiny_8 @64, depth 6)", QUICK, (), 32),
    Case("I-JEPA quickstart, mask.policy=official", QUICK, ("mask.policy=official",), 32),
    Case("I-JEPA quickstart, bf16 (CPU autocast)", QUICK, ("train.precision=bf16",), 32),
    Case("TC-JEPA quickstart (scratch text, top-k)", TCJEPA, (), 16),
]


def profiler_peak(probe: StepProbe) -> int:
    """Peak bytes of non-model-state tensors over one step of ``probe`` (targets, forward,
    backward)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, Category

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        images = probe.images.clone()  # allocated inside the profile, like every activation
        probe.run(images).backward()
    mp = prof._memory_profile()
    states = {Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE}
    live: dict[object, tuple[int, object]] = {}
    current = peak = 0
    for _, action, (key, version), size in mp.timeline:
        if key.device.type != "cpu" or action == Action.PREEXISTING:
            continue
        if action == Action.CREATE:
            live[key] = (size, mp._categories.get(key, version))
        elif action == Action.INCREMENT_VERSION and key in live:
            live[key] = (live[key][0], mp._categories.get(key, version))
        elif action == Action.DESTROY:
            live.pop(key, None)
        current = sum(s for s, cat in live.values() if cat not in states)
        peak = max(peak, current)
    return peak


def run_case(case: Case, checkpointing: bool, seed: int, peak: bool) -> dict:
    cfg = load_config(case.recipe, list(case.overrides))
    t0 = time.perf_counter()
    probe = probe_step(cfg, case.batch, seed, checkpointing)
    _, saved = saved_tensor_bytes(probe.run, probe.model_tensors())
    est = estimate_for_masks(cfg, probe.token_stats, checkpointing=checkpointing)
    row = {
        "case": case.name, "recipe": Path(case.recipe).name, "overrides": list(case.overrides), "batch": case.batch,
        "precision": cfg.train.precision, "checkpointing": checkpointing, "seed": seed,
        "padded": probe.token_stats.padded, "measured_saved_bytes": saved, "estimated_saved_bytes": est.saved,
        "saved_ratio": est.saved / saved,
    }
    if peak:
        measured_peak = profiler_peak(probe)  # the same model and micro-batch: the forward above changed nothing
        row.update(measured_peak_bytes=measured_peak, estimated_peak_bytes=est.peak,
                   peak_ratio=est.peak / measured_peak)
    row["seconds"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    peak = "measured_peak_bytes" in rows[0]
    head = "| case | batch | ckpt | saved, measured MiB | saved, estimated MiB | est/meas |"
    rule = "|---|---:|:---:|---:|---:|---:|"
    if peak:
        head += " peak, measured MiB | peak, estimated MiB | est/meas |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['case']} | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
                f"{r['measured_saved_bytes'] / MIB:.2f} | {r['estimated_saved_bytes'] / MIB:.2f} | {r['saved_ratio']:.3f} |")
        if peak:
            line += (f" {r['measured_peak_bytes'] / MIB:.2f} | {r['estimated_peak_bytes'] / MIB:.2f} |"
                     f" {r['peak_ratio']:.3f} |")
        lines.append(line)
    return "\n".join(lines)


def gpu_rows(path: str, draws: int = 8) -> list[dict]:
    """Planned vs measured peak memory for each tcjepa variant of a bench_gpu.py JSON."""
    from tcjepa.plan import GIB, activation_memory, draw_mask_counts, inventory, model_states

    run = json.loads(Path(path).read_text())
    st, env = run["settings"], run["environment"]
    rows = []
    for r in run["results"]:
        if not r["variant"].startswith("ours/") or "compile" in r["variant"] or r.get("peak_mem_gib") is None:
            continue
        policy = r["variant"].split("/")[1]
        cfg = load_config(QUICK, [f"model.encoder={r['encoder']}", f"model.image_size={st['image_size']}",
                                  "model.depth=null", f"model.predictor_depth={st['pred_depth']}",
                                  f"model.predictor_width={st['pred_width']}", f"mask.policy={policy}",
                                  f"train.precision={st['precision']}", f"train.batch_size={st['batch_size']}"])
        inv = inventory(cfg)
        states = model_states(inv, 0, 1).total
        planned = [(states + activation_memory(inv, draw_mask_counts(cfg, st["batch_size"], seed).batch(st["batch_size"]),
                                               st["precision"]).peak) / GIB for seed in range(draws)]
        rows.append({"device": env.get("device_name"), "torch": env.get("torch"), "encoder": r["encoder"],
                     "variant": r["variant"], "batch": st["batch_size"], "measured_gib": r["peak_mem_gib"],
                     "planned_gib_min": min(planned), "planned_gib_max": max(planned),
                     "planned_gib_mean": sum(planned) / draws, "ratio": sum(planned) / draws / r["peak_mem_gib"]})
    return rows


def gpu_table(rows: list[dict]) -> str:
    lines = ["| device | encoder | variant | batch | measured peak GiB | planned GiB (mean; min-max over mask draws) | planned/measured |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['encoder']} | {r['variant']} | {r['batch']} | {r['measured_gib']:.1f} | "
                     f"{r['planned_gib_mean']:.1f} ({r['planned_gib_min']:.1f}-{r['planned_gib_max']:.1f}) | {r['ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the first case")
    ap.add_argument("--no-peak", action="store_true", help="skip the profiler peak (the slow half)")
    ap.add_argument("--seed", type=int, default=1, help="masks, images and captions")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (memory does not depend on it)")
    ap.add_argument("--tolerance", type=float, default=0.25, help="exit 1 if any ratio is further from 1")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--gpu-json", nargs="+", metavar="FILE", help="instead: planner vs bench_gpu.py's measured peaks")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu_json:
        rows = [r for path in args.gpu_json for r in gpu_rows(path)]
        print(gpu_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
        return 0 if all(abs(r["ratio"] - 1) <= args.tolerance for r in rows) else 1
    rows = []
    for case in CASES[:1] if args.quick else CASES:
        for ckpt in (False, True):
            rows.append(run_case(case, ckpt, args.seed, not args.no_peak))
            r = rows[-1]
            print(f"{r['case']}, checkpointing {ckpt}: saved {r['saved_ratio']:.3f}"
                  + (f", peak {r['peak_ratio']:.3f}" if "peak_ratio" in r else "") + f" ({r['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"{datetime.date.today().isoformat()}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    ratios = [r[k] for r in rows for k in ("saved_ratio", "peak_ratio") if k in r]
    return 0 if all(abs(x - 1) <= args.tolerance for x in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
