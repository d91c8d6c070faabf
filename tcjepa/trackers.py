"""Experiment trackers beside ``metrics.jsonl`` (``train.log_to``): every logged record also goes
to TensorBoard event files (``RUN_DIR/tb/``) and/or a Weights & Biases run. ``metrics.jsonl`` stays
the source of truth; the trackers are views of it.

W&B runs offline unless ``WANDB_MODE`` says otherwise (no network is needed; ``wandb sync
RUN_DIR/wandb/offline-run-*`` uploads later), and a resumed run continues the same W&B run (its
id is kept in ``RUN_DIR/wandb_id``). A resumed TensorBoard log drops events past the resumed step,
as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from tcjepa.config import Config, ConfigError, to_dict

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs (and the extra)


def check_trackers(names: tuple[str, ...]) -> None:
    """Before training: every tracker is known and its package importable."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.log_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"train.log_to: {name} needs the {TRACKERS[name]} package: "
                              f"pip install 'tcjepa[{name}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, without its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """Forwards each ``metrics.jsonl`` record to the configured trackers (rank 0 only)."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, cfg: Config, enabled: bool, resume_step: int = 0):
        self.tb = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step or None)
        if "wandb" in names:
            import wandb

            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "tcjepa"), name=run_dir.name, id=run_id,
                                    dir=str(run_dir), config=to_dict(cfg), resume="allow",
                                    mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), int(record["step"])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
