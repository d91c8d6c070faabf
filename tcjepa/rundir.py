"""The run directory before and around training: checks that run before anything is written,
resume rules, the config history, and evaluation results set aside when the weights change.

A resumed run continues *the run*: its saved ``config.yaml`` is the reference. The recipe and
overrides given with ``--resume`` are compared with it key by key. Keys that only change how the
run is watched or saved (logging, checkpoints, evaluation, loader processes) may differ; any other
difference changes the run's math (steps, batch, optimiser, schedules, model, masks, seed, data)
and is refused unless named with ``--allow-change KEY``. Every accepted difference is printed and
appended to ``config_history.jsonl`` with the step it took effect.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tcjepa.config import Config, ConfigError, from_dict, to_dict
from tcjepa.resume import CHECKPOINTS, list_checkpoints

HISTORY = "config_history.jsonl"
SUPERSEDED = "superseded"  # eval/superseded/<when>/: results of weights that were replaced
# keys (or key prefixes ending in '.') that do not change what a run computes
WATCHING_KEYS = (
    "train.log_every", "train.eval_every", "train.nan_guard", "train.max_bad_steps", "train.collapse_rankme",
    "train.collapse_std", "train.compile", "train.log_to", "checkpoint.", "probe.", "data.val", "data.workers",
    "data.max_skip_rate", "data.skip_rate_min_samples", "model.activation_checkpointing",
)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def changes_math(self) -> bool:
        return not any(self.key == k or (k.endswith(".") and self.key.startswith(k)) for k in WATCHING_KEYS)

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not prefix + k == "deepspeed.config":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


PATH_KEYS = ("data.train", "data.val", "teacher.checkpoint", "conditioner.text_path", "conditioner.tokenizer_path")


def _same(key: str, a: Any, b: Any) -> bool:
    """Equal values; for paths, the same file however it is spelled (relative or absolute)."""
    if a == b:
        return True
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a and b:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def config_changes(saved: Config, given: Config) -> list[Change]:
    """Every leaf key whose value differs, in config order."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(given))
    return [Change(k, a.get(k), b.get(k)) for k in b if not _same(k, a.get(k), b.get(k))]


def read_saved_config(run_dir: Path) -> Config | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return from_dict(Config, yaml.safe_load(path.read_text()) or {}, str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}".splitlines()[0]) from e


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[-1])


@dataclass
class ResumePlan:
    """What a resume will do: where it starts and which accepted changes it carries."""
    start: int = 0
    changes: tuple[Change, ...] = ()


def check_resume(run_dir: Path, cfg: Config, allow: tuple[str, ...] = ()) -> ResumePlan:
    """Refuse a resume that would silently change the run; return the accepted changes.

    Compares with the run's ``config.yaml``; a finished run must be extended explicitly, and a
    checkpoint past the requested last step is an error (never a ``final/`` written from it)."""
    saved = read_saved_config(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if saved is None or not checkpoints:  # an imported run: nothing trained here yet
        return ResumePlan()
    unknown = [k for k in allow if k not in _flatten(to_dict(cfg))]
    if unknown:
        raise ConfigError(f"--allow-change: no config key {unknown[0]!r}")
    changes = config_changes(saved, cfg)
    refused = [c for c in changes if c.changes_math and c.key not in allow]
    last = checkpoint_step(checkpoints[-1])
    finished = (run_dir / "final").is_dir() and last >= saved.train.steps
    if finished and cfg.train.steps <= saved.train.steps:
        raise ConfigError(f"{run_dir} is finished (step {last} of train.steps {saved.train.steps}); to train it "
                          f"further, pass a larger --steps and --allow-change train.steps (the learning-rate and "
                          f"momentum schedules then span the new length)")
    if refused:
        listed = "; ".join(str(c) for c in refused)
        keys = " ".join(c.key for c in refused)
        raise ConfigError(f"--resume would change the run's settings: {listed}. Resume with the run's own settings "
                          f"(`tcjepa train {run_dir / 'config.yaml'} --out {run_dir} --resume`), or accept the "
                          f"change with --allow-change {keys}")
    if last > cfg.train.steps:
        raise ConfigError(f"{run_dir}: the latest checkpoint is at step {last}, past train.steps {cfg.train.steps}; "
                          f"a run cannot be shortened below a step it has trained")
    return ResumePlan(start=last, changes=tuple(changes))


def record_changes(run_dir: Path, plan: ResumePlan) -> None:
    """Append the accepted changes to ``config_history.jsonl`` and print them."""
    if not plan.changes:
        return
    entry = {"step": plan.start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changes": [{"key": c.key, "old": c.old, "new": c.new} for c in plan.changes]}
    with (run_dir / HISTORY).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"--resume from step {plan.start} with changed settings (recorded in {run_dir / HISTORY}): "
          + "; ".join(str(c) for c in plan.changes), flush=True)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Fail before anything is written if the directory cannot be used as asked (reads only)."""
    from tcjepa.checkpoint import imported_run

    existing = list_checkpoints(run_dir)
    if resume and not existing and (run_dir / "final").is_dir() and not imported_run(run_dir):
        raise ConfigError(f"--resume: {run_dir} is finished and kept no checkpoint (checkpoint.every: 0), so it "
                          "cannot train further; start a new run (the finished weights can seed it only as a teacher)")
    if resume and not existing and not imported_run(run_dir):
        raise ConfigError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS} (nor weights from `tcjepa import`)")
    if not resume and (existing or (run_dir / "final").exists()):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a directory")


def check_writable(run_dir: Path) -> None:
    """A real write in the run directory or its nearest existing parent, removed at once."""
    parent = existing_ancestor(run_dir)
    if not parent.is_dir():
        raise ConfigError(f"{run_dir}: not writable ({parent} is a file, not a directory)")
    probe = parent / ".write_test"  # a real write (os.access says yes to root on a read-only mount); removed at once
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{run_dir}: not writable ({e.strerror or e})") from e


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def create_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot create it ({e.strerror or e})") from e


def check_disk_space(run_dir: Path, method: Any, cfg: Config) -> None:
    """Fail before training when the run's checkpoints cannot fit: each holds the trained weights
    and two AdamW moments (fp32) plus the teacher, and ``checkpoint.keep + 1`` exist while a new
    one is written; ``final/`` holds the weights once more."""
    trained = sum(p.numel() for p in method.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in method.model.parameters() if not p.requires_grad)
    teacher = sum(p.numel() for p in method.teacher.parameters()) if method.teacher is not None else 0
    checkpoint = 4 * (3 * trained + frozen + teacher)
    copies = cfg.checkpoint.keep + 1 if cfg.checkpoint.every else 1  # a stop (SIGTERM) writes one anyway
    need = checkpoint * copies + 4 * (trained + frozen + teacher)
    free = shutil.disk_usage(existing_ancestor(run_dir)).free
    if free < need:
        raise ConfigError(
            f"{run_dir}: {free / 2**30:.2f} GiB free, but this run needs about {need / 2**30:.2f} GiB "
            f"({copies} checkpoint(s) of {checkpoint / 2**30:.2f} GiB and final weights); free space, lower "
            "checkpoint.keep or choose another --out")


def set_aside_evals(run_dir: Path, step: int) -> Path | None:
    """Move the results of the weights being replaced to ``eval/superseded/<time>_step<N>/``:
    kept, but no longer read as results of the run."""
    ev = run_dir / "eval"
    items = [p for p in ev.iterdir() if p.name != SUPERSEDED] if ev.is_dir() else []
    if not items:
        return None
    dest = ev / SUPERSEDED / f"{time.strftime('%Y%m%dT%H%M%S')}_before_step{step}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in items:
        p.replace(dest / p.name)
    return dest
