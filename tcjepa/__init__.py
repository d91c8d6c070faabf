"""tcjepa: vision-language pretraining by feature prediction (I-JEPA, TC-JEPA and baselines).

Public API (imported lazily, so ``import tcjepa`` does no work):
``load_config``, ``train``, ``load_encoder``, ``run_probe``, ``run_eval``, ``quickstart``.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "load_config": "tcjepa.config",
    "train": "tcjepa.train",
    "load_encoder": "tcjepa.checkpoint",
    "run_probe": "tcjepa.eval.probe",
    "run_eval": "tcjepa.eval.tasks",
    "quickstart": "tcjepa.quickstart",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tcjepa' has no attribute {name!r}")


__all__ = list(_API)
