"""Jobs sharing one machine: does each keep its fair share of the CPU?

Runs ``tcjepa train`` (a quickstart recipe, short) alone, then ``--jobs`` identical copies
started together, and reports each copy's images/s as a share of the solo figure (a fair share
is 1 / jobs). With ``--probe``, also a training beside ``tcjepa eval probe`` (the solo run's
encoder, run back to back for as long as the training runs): the training's share, and the
probe's wall time alone over its median wall time beside the training.

Each arm runs the same commands under its own environment, so the toolkit's thread defaults can
be set against the OpenMP runtime's own: ``--arm NAME=VAR=VALUE,VAR=VALUE`` (repeatable; an empty
list is the environment as it is). ``GOMP_SPINCOUNT=300000`` is libgomp's default busy-wait, which
wins over the ``OMP_WAIT_POLICY`` the toolkit sets, i.e. the toolkit before it set one:

    python benchmarks/bench_sharing.py --steps 60 --probe \\
        --arm "libgomp default spin=GOMP_SPINCOUNT=300000" --arm "toolkit default="

Images/s are the median of the run's logged windows after the first (start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    name, _, assigns = text.partition("=")
    env = dict(a.split("=", 1) for a in assigns.split(",") if a)
    return name, env


def tcjepa(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "tcjepa", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})


def train_args(recipe: str, data: Path, steps: int, out: Path) -> list[str]:
    return ["train", recipe, "--data", str(data / "train"), "--steps", str(steps), "--out", str(out),
            "--set", "train.log_every=10", "checkpoint.every=0", "data.workers=0"]


def img_per_s(run: Path) -> float:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    speeds = [r["img_per_s"] for r in recs if "img_per_s" in r][1:]
    return statistics.median(speeds)


def wait_all(procs: list[subprocess.Popen], what: str) -> float:
    t0 = time.perf_counter()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"error: {what} failed (exit {p.returncode}); see its log under --out")
    return time.perf_counter() - t0


def trainings(recipe: str, data: Path, steps: int, out: Path, env: dict[str, str], jobs: int) -> list[float]:
    """``jobs`` trainings started together -> each one's images/s."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [out / f"train{i}" for i in range(jobs)]
    procs = [tcjepa(train_args(recipe, data, steps, r), env, out / f"train{i}.log") for i, r in enumerate(runs)]
    wait_all(procs, f"{jobs} trainings")
    return [img_per_s(r) for r in runs]


def probe(run: Path, data: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return tcjepa(["eval", "probe", "--checkpoint", str(run), "--data", str(data / "train"),
                   "--val-data", str(data / "val"), "--json", str(log.with_suffix(".json"))], env, log)


def one_arm(recipe: str, data: Path, steps: int, out: Path, env: dict[str, str], jobs: int, with_probe: bool) -> dict:
    solo = trainings(recipe, data, steps, out / "solo", env, 1)[0]
    result = {"env": env, "solo_img_per_s": solo}
    together = trainings(recipe, data, steps, out / "together", env, jobs)
    result["together_img_per_s"] = together
    result["together_share"] = [s / solo for s in together]
    if with_probe:
        solo_run = out / "solo" / "train0"
        probe_alone = wait_all([probe(solo_run, data, env, out / "probe_alone.log")], "probe alone")
        beside = out / "beside"
        beside.mkdir(parents=True, exist_ok=True)
        train = tcjepa(train_args(recipe, data, steps, beside / "train0"), env, beside / "train0.log")
        time.sleep(5)  # the training past start-up before the first probe
        walls = []
        while train.poll() is None:  # probes back to back for as long as the training runs
            wall = wait_all([probe(solo_run, data, env, beside / f"probe{len(walls)}.log")], "probe beside a training")
            if train.poll() is None:  # a probe that outlasted the training did not share all of its time
                walls.append(wall)
        wait_all([train], "training beside probes")
        if not walls:
            raise SystemExit("error: no probe finished while the training ran; raise --steps")
        result.update(probe_alone_s=probe_alone, probe_beside_s=statistics.median(walls),
                      probe_share=probe_alone / statistics.median(walls),
                      train_beside_probe_share=img_per_s(beside / "train0") / solo)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/ijepa_quickstart.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--samples", type=int, default=1000, help="synthetic training scenes (val: a quarter)")
    p.add_argument("--probe", action="store_true", help="also a training beside `tcjepa eval probe`")
    p.add_argument("--arm", action="append", default=[], help="NAME=VAR=VALUE,...; repeatable (default: one arm, "
                   "the environment as it is)")
    p.add_argument("--out", default="runs/bench_sharing")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "data"
    for split, n, seed in (("train", args.samples, 0), ("val", args.samples // 4, 1)):
        if not any((data / split).glob("*.tar")):
            subprocess.run([sys.executable, "-m", "tcjepa", "data", "synthetic", "--out", str(data / split),
                            "--samples", str(n), "--seed", str(seed)], cwd=ROOT, check=True, capture_output=True)
    arms = dict(parse_arm(a) for a in args.arm) or {"as is": {}}
    results = {}
    for name, env in arms.items():
        slug = "".join(c if c.isalnum() else "_" for c in name)
        shutil.rmtree(out / slug, ignore_errors=True)  # each arm trains afresh
        results[name] = one_arm(args.recipe, data, args.steps, out / slug, env, args.jobs, args.probe)
        print(name, json.dumps(results[name]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (out / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), "arms": results}, indent=1))
    print(f"| arm | solo img/s | {args.jobs} together, share of solo each |"
          + (" training beside a probe | probe beside a training |" if args.probe else ""))
    for name, r in results.items():
        row = f"| {name} | {r['solo_img_per_s']:.1f} | " + ", ".join(f"{s:.2f}" for s in r["together_share"]) + " |"
        if args.probe:
            row += f" {r['train_beside_probe_share']:.2f} | {r['probe_share']:.2f} ({r['probe_beside_s']:.0f} s vs {r['probe_alone_s']:.0f} s) |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
