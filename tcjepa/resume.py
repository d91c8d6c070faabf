"""Resumable checkpoints: written atomically, read back with a fallback, holding everything a run
needs to continue exactly where it stopped.

Layout (``RUN_DIR/checkpoints/``): one DeepSpeed checkpoint directory per saved step
(``step_00001000/``: weights, optimiser state, and our client state), plus ``latest`` naming the
newest one. A checkpoint is written as ``step_X.partial/``, gets a ``manifest.json`` (every file
and its size) once all ranks finished, is renamed to ``step_X/`` and only then does ``latest``
move (written to a temporary file and renamed). A crash at any point leaves the previous
checkpoint and ``latest`` intact; on resume a checkpoint whose files do not match its manifest,
or that fails to load, is skipped with a warning for the one before it.

Loading never runs code from a checkpoint: every ``torch.load`` (DeepSpeed's, and the universal
conversion's) reads with ``weights_only=True`` and an allow-list of the few non-tensor types a
checkpoint holds (:func:`weights_only_loads`).

The client state holds the step, the teacher, skip counts, and per rank the RNG states and the
data-stream position of every loader worker (``data_pipelines.loader.TrainSource.state``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tcjepa.config import ConfigError
from tcjepa.distributed import barrier

CHECKPOINTS = "checkpoints"
TAG_PREFIX = "step_"
PARTIAL = ".partial"
MANIFEST = "manifest.json"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def checkpoint_globals() -> list[Any]:
    """The non-tensor types a tcjepa DeepSpeed checkpoint pickles: DeepSpeed's loss scaler, ZeRO
    stage enum and fragment addresses, and numpy's RNG state array (our client state; numpy 1
    pickles name ``numpy.core``, numpy 2 ``numpy._core``). Loading allows these and nothing else,
    so a tampered checkpoint cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 | 1
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype,
            type(np.dtype(np.uint32)), multiarray._reconstruct,
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside reads with ``weights_only=True``, DeepSpeed's too (it asks for
    ``weights_only=False``; ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that), allowing only
    :func:`checkpoint_globals` beyond tensors and builtins.

    The variables and torch's allow-list are process-wide, so this is not for concurrent threads;
    resume runs before the loader starts. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (which users set to
    get DeepSpeed loading on torch >= 2.6, and which torch refuses beside ours) is lifted inside,
    and types the user had already allowed stay allowed after."""
    saved = {k: os.environ.pop(k, None) for k in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    allowed = torch.serialization.get_safe_globals()
    added = [g for g in checkpoint_globals() if g not in allowed]
    try:
        with torch.serialization.safe_globals(added):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.partial`` ones are not checkpoints)."""
    ck = Path(run_dir) / CHECKPOINTS
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and not p.name.endswith(PARTIAL))


def rng_states() -> dict[str, Any]:
    """This process's global RNGs (python, numpy, torch CPU and CUDA)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (the checkpoint is written by rank 0)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def check_manifest(directory: Path) -> str | None:
    """None if every file of the manifest is there with its size; else what is wrong."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (written by an older tcjepa, or the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"manifest.json is unreadable ({e})"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine: Any, run_dir: Path, step: int, client: dict[str, Any], keep: int, is_main: bool) -> Path:
    """Write step ``step`` atomically (see the module docstring); keep the newest ``keep``."""
    ck = Path(run_dir) / CHECKPOINTS
    tag = tag_for(step)
    partial, final = ck / (tag + PARTIAL), ck / tag
    if is_main and partial.exists():
        shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(ck), tag=tag + PARTIAL, client_state=client, save_latest=False)
    barrier()
    if is_main:
        _write_manifest(partial)
        if final.exists():  # the same step saved again (e.g. resumed and stopped at once)
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write(ck / "latest", tag)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def saved_world_size(directory: Path) -> int:
    """How many data-parallel ranks wrote the ZeRO optimiser partitions of a checkpoint (0: ZeRO
    stage 0, whose optimiser state is not partitioned and loads under any world size)."""
    return len(list(directory.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def to_universal(directory: Path, rank: int) -> Path:
    """DeepSpeed's universal checkpoint of ``directory`` (``checkpoints/universal/TAG``, written
    once by rank 0 with ``deepspeed.checkpoint.ds_to_universal``): the form in which ZeRO
    partitions written by one world size load under another. Returns the folder to load from."""
    import subprocess
    import sys

    out = directory.parent / "universal"
    target = out / directory.name
    if rank == 0 and not (target / "zero").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "tcjepa.resume", "--input_folder", str(directory),  # see _convert_main
               "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        import tcjepa

        root = str(Path(tcjepa.__file__).resolve().parents[1])  # importable however tcjepa was found here
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {directory.name} to a universal checkpoint failed: {proc.stderr[-500:]}")
    barrier()
    return out


def _load_failure(e: Exception) -> str:
    """A short reason; for a refused pickle, torch's own sentence naming what was blocked (the
    paragraphs of its message that are not boilerplate)."""
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
        paragraphs = [p.strip() for p in str(e).split("\n\n") if p.strip()]
        reason = " ".join(p.split("WeightsUnpickler error:")[-1].strip() for p in paragraphs[1:]
                          if not p.startswith("Check the documentation"))
        return f"refused to unpickle a non-tensor object: {reason[:200]}"
    return f"loading failed: {e!r}"[:300]


def load_latest(engine: Any, run_dir: Path) -> dict[str, Any]:
    """Load the newest loadable checkpoint into ``engine``; returns its client state.

    Tries ``latest`` first, then older checkpoints; each one skipped is named in a warning with
    the one used instead. No loadable checkpoint is a :class:`ConfigError`.
    """
    ck = Path(run_dir) / CHECKPOINTS
    candidates = list_checkpoints(run_dir)[::-1]
    pointer = ck / "latest"
    if pointer.is_file():
        named = ck / pointer.read_text().strip()
        if named in candidates:  # the pointer first; normally it is the newest anyway
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        raise ConfigError(f"--resume: no checkpoint in {ck}")
    failures: list[str] = []
    for directory in candidates:
        problem = check_manifest(directory)
        if problem is None:
            try:
                load_dir = ck
                if saved_world_size(directory) not in (0, engine.dp_world_size):  # partitions of another world size
                    load_dir = to_universal(directory, engine.global_rank)
                    engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
                with weights_only_loads():
                    path, client = engine.load_checkpoint(str(load_dir), tag=directory.name)
                if load_dir != ck:  # the conversion served its purpose; new checkpoints use this world size
                    engine._config.load_universal_checkpoint = False
                    barrier()
                    if engine.global_rank == 0:
                        shutil.rmtree(load_dir, ignore_errors=True)
                if path is None or client is None:
                    problem = "DeepSpeed found nothing to load"
            except Exception as e:  # noqa: BLE001 - any failure means: use the previous checkpoint
                problem = _load_failure(e)
        if problem is None:
            if failures:
                warnings.warn(f"--resume: skipped {'; '.join(failures)}; resuming from {directory.name} instead",
                              stacklevel=2)
            return client
        failures.append(f"{directory.name} ({problem})")
    raise ConfigError(f"--resume: no checkpoint in {ck} could be loaded: {'; '.join(failures)}")


def _convert_main() -> None:
    """DeepSpeed's ``ds_to_universal`` command line, its loads under :func:`weights_only_loads`
    (``to_universal`` runs it in a subprocess: the conversion holds every partition in memory)."""
    from deepspeed.checkpoint import ds_to_universal

    with weights_only_loads():
        ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    _convert_main()
