"""Finished-run weights (``RUN_DIR/final/``): saved as safetensors, loadable without DeepSpeed.

``final/model.safetensors`` holds one key prefix per module: every method has ``encoder.*`` (the
image encoder: JEPA's student / context encoder); JEPA runs add ``teacher.*`` (the EMA or frozen
target encoder), ``predictor.*`` and, for TC-JEPA, ``text.*``; MAE runs add ``decoder.*``;
contrastive runs ``text.*`` and ``head.*``. ``final/config.yaml`` is the resolved config that
rebuilds the architecture.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcjepa.config import Config, ConfigError, from_dict, save_config

FINAL = "final"
WEIGHTS = "model.safetensors"
IMPORT_RECORD = "import.json"  # beside final/ in a run written by `tcjepa import`: where its weights came from


def save_final(run_dir: str | Path, modules: dict[str, nn.Module], cfg: Config, step: int | None = None) -> Path:
    """Write ``final/model.safetensors`` with one key prefix per module, plus the config.

    The file's metadata holds a fresh ``weights_id`` (and the ``step``): evaluations record it, so
    a result is never shown beside weights it did not come from."""
    import uuid

    from safetensors.torch import save_file

    out = Path(run_dir) / FINAL
    out.mkdir(parents=True, exist_ok=True)
    tensors, storages = {}, set()
    for prefix, module in modules.items():
        for name, t in module.state_dict().items():
            t = t.detach().to("cpu", torch.float32).contiguous()
            if t.untyped_storage().data_ptr() in storages:  # tied weights (T5's shared embedding): safetensors
                t = t.clone()  # stores each tensor on its own; loading ties them again
            storages.add(t.untyped_storage().data_ptr())
            tensors[f"{prefix}.{name}"] = t
    tmp = out / (WEIGHTS + ".tmp")
    meta = {"format": "pt", "producer": "tcjepa", "weights_id": uuid.uuid4().hex}
    if step is not None:
        meta["step"] = str(step)
    save_file(tensors, str(tmp), metadata=meta)
    follow_umask(tmp)  # safetensors writes 0600; every other file the run writes follows the umask
    tmp.replace(out / WEIGHTS)
    save_config(cfg, out / "config.yaml")
    return out / WEIGHTS


def follow_umask(path: str | Path) -> None:
    """Give ``path`` the mode a newly created file gets (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def weights_id(run_dir: str | Path) -> str | None:
    """The ``weights_id`` of ``final/model.safetensors`` (None: no final weights, or written by an
    older tcjepa)."""
    from safetensors import safe_open

    path = Path(run_dir) / FINAL / WEIGHTS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("weights_id")
    except Exception:  # a damaged file is reported where the weights are loaded
        return None


def load_run_config(run_dir: str | Path) -> Config:
    import yaml

    path = Path(run_dir) / FINAL / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a finished run (missing {path}); train it to the end first")
    return from_dict(Config, yaml.safe_load(path.read_text()) or {}, str(path))


def load_final_state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(run_dir) / FINAL / WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{run_dir}: missing {path}; train the run to the end first")
    return load_file(str(path))


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_state_exactly(module: nn.Module, state: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """``module.load_state_dict(state, strict=True)``, but a mismatch is a :class:`ConfigError`
    naming ``where`` and listing every missing and unexpected key and wrong shape (torch's own
    error is a RuntimeError that the command line would print as a traceback). ``assign``: take
    the tensors as they are (for modules built on the meta device)."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k].shape)})"
              for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} {len(keys)}: {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise ConfigError(f"{where}: weights do not match the model its config builds; {'; '.join(parts)}")
    module.load_state_dict(state, strict=True, assign=assign)


def imported_run(run_dir: str | Path) -> bool:
    """A run directory written by ``tcjepa import`` (final weights and their provenance record)."""
    run = Path(run_dir)
    return (run / IMPORT_RECORD).is_file() and (run / FINAL / WEIGHTS).is_file()


def init_from_final(run_dir: str | Path, cfg: Config, method: Any) -> None:
    """Load an imported run's final weights into a JEPA method before training: ``--resume`` on a
    directory from ``tcjepa import`` has no DeepSpeed checkpoint, so training starts at step 0 from
    these weights with a fresh optimiser. The architecture must be the imported one."""
    theirs = load_run_config(run_dir)
    pairs = [("train.method", theirs.train.method, cfg.train.method)] + [
        (f"model.{f.name}", getattr(theirs.model, f.name), getattr(cfg.model, f.name))
        for f in dataclasses.fields(cfg.model) if f.name != "init_std"]
    diff = [f"{key} is {a!r} there, {b!r} here" for key, a, b in pairs if a != b]
    if diff:
        raise ConfigError(f"--resume {run_dir}: this config does not build the imported model ({'; '.join(diff)}); "
                          f"train with {Path(run_dir) / 'config.yaml'} as the recipe")
    state = load_final_state(run_dir)
    modules = {"encoder": method.model.encoder, "predictor": method.model.predictor, "teacher": method.teacher}
    for prefix, module in modules.items():
        load_state_exactly(module, _sub_state(state, prefix), f"{run_dir}: {FINAL}/{WEIGHTS} {prefix}.*")


def encoder_role(cfg: Config, which: str = "auto") -> str:
    """``which`` with ``auto`` resolved: ``teacher`` for EMA JEPA runs, ``student`` otherwise (a
    frozen teacher is just the previous stage's model)."""
    if which != "auto":
        return which
    return "teacher" if cfg.train.method == "jepa" and cfg.teacher.update == "ema" else "student"


def initial_encoder(cfg: Config) -> nn.Module:
    """The image encoder a run of ``cfg`` starts from: the first draw after ``train.seed``, the
    weights ``build_student`` gives it (reseeds the global RNG). The random-init baseline that
    trained encoders are compared with."""
    from tcjepa.models.vit import build_encoder

    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    return build_encoder(m.encoder, m.image_size, m.depth, m.init_std)


def load_encoder(run_dir: str | Path, which: str = "auto") -> nn.Module:
    """The trained image encoder of a finished run, in eval mode.

    ``which``: ``teacher`` (the EMA target encoder, what I-JEPA evaluates), ``student`` (the
    context encoder; the image tower of MAE and contrastive runs), ``auto`` (:func:`encoder_role`)
    or ``init``: the encoder the run started from (:func:`initial_encoder`), the baseline that
    says whether training added anything the random features did not already give.
    """
    from tcjepa.models.vit import build_encoder

    cfg = load_run_config(run_dir)
    if which == "init":
        return initial_encoder(cfg).eval()
    which = encoder_role(cfg, which)
    prefix = {"teacher": "teacher", "student": "encoder"}.get(which)
    if prefix is None:
        raise ValueError(f"which must be auto, teacher, student or init, got {which!r}")
    sub = _sub_state(load_final_state(run_dir), prefix)
    if not sub:
        raise ConfigError(f"{run_dir}: {FINAL}/{WEIGHTS} has no {prefix}.* weights")
    m = cfg.model
    encoder = build_encoder(m.encoder, m.image_size, m.depth, m.init_std)
    load_state_exactly(encoder, sub, f"{run_dir}: {FINAL}/{WEIGHTS} {prefix}.*")
    return encoder.eval()


def load_student(run_dir: str | Path) -> tuple[nn.Module, Config]:
    """The whole trained student of a finished JEPA run (encoder, predictor and, for TC-JEPA, the
    text tower and conditioners), in eval mode, with its config."""
    from tcjepa.methods.jepa import build_student

    cfg = load_run_config(run_dir)
    state = load_final_state(run_dir)
    if cfg.train.method != "jepa":
        raise ConfigError(f"{run_dir}: a {cfg.train.method} run has no JEPA predictor")
    proj = state.get("predictor.predictor_proj.weight")  # its rows: the teacher's width (a frozen teacher may differ)
    student = build_student(cfg, target_dim=None if proj is None else proj.shape[0])
    load_state_exactly(student, {k: v for k, v in state.items() if not k.startswith("teacher.")},
                       f"{run_dir}: {FINAL}/{WEIGHTS}")
    return student.eval(), cfg


def load_dual_encoder(run_dir: str | Path) -> tuple[nn.Module, Config]:
    """Image tower, text tower and head of a finished contrastive (CLIP/SigLIP) run, in eval mode."""
    from tcjepa.methods.contrastive import build_dual_encoder
    from tcjepa.methods.jepa import build_tokenizer_for

    cfg = load_run_config(run_dir)
    if cfg.train.method != "contrastive":
        raise ConfigError(f"{run_dir}: a {cfg.train.method} run, not a contrastive one")
    model = build_dual_encoder(cfg, build_tokenizer_for(cfg))
    load_state_exactly(model, load_final_state(run_dir), f"{run_dir}: {FINAL}/{WEIGHTS}")
    return model.eval(), cfg
