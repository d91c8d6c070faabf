"""train.log_to: TensorBoard event files and W&B runs carry the same numbers as metrics.jsonl."""

import sys
import types

import pytest

from tcjepa.config import ConfigError
from tcjepa.train import train
from tests.test_train import cfg_for, records


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_events_equal_metrics_jsonl(shards64, tmp_path):
    run = train(cfg_for(shards64, "train.steps=4", "train.log_every=2", "checkpoint.every=0",
                        "train.log_to=[tensorboard]"), tmp_path / "run", progress=False)
    events = tensorboard_scalars(run / "tb")
    recs = records(run)
    assert {"loss", "lr", "momentum", "img_per_s", "target_rankme"} <= set(events)
    for r in recs:
        for key in ("loss", "lr", "target_std"):
            assert events[key][r["step"]] == pytest.approx(r[key], rel=1e-6), (key, r["step"])
    assert sorted(events["loss"]) == [r["step"] for r in recs] == [2, 4]


class FakeRun:
    def __init__(self, **kw):
        self.kw, self.logged, self.finished = kw, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.mark.slow
def test_wandb_runs_offline_and_resumes_the_same_run(shards64, tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1],
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("tcjepa.trackers.importlib.util.find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_MODE", raising=False)
    over = ["train.steps=4", "train.log_every=1", "checkpoint.every=2", "train.log_to=[wandb]"]
    run = train(cfg_for(shards64, *over), tmp_path / "run", progress=False, stop_at=2)
    train(cfg_for(shards64, *over), run, resume=True, progress=False)
    first, second = runs
    assert first.kw["mode"] == "offline" and first.kw["id"] == second.kw["id"] == "abc123"
    assert second.kw["resume"] == "allow" and first.kw["config"]["train"]["steps"] == 4
    assert first.finished and second.finished
    logged = {step: values for r in runs for step, values in r.logged}
    for rec in records(run):
        assert logged[rec["step"]]["loss"] == pytest.approx(rec["loss"])
    assert (run / "wandb_id").read_text().strip() == "abc123"


def test_trackers_are_checked_before_training(shards64, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.log_to must list trackers from tensorboard, wandb; got \['mlflow'\]"):
        cfg_for(shards64, "train.log_to=[mlflow]")
    monkeypatch.setattr("tcjepa.trackers.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.log_to: wandb needs the wandb package: pip install 'tcjepa\[wandb\]'"):
        train(cfg_for(shards64, "train.log_to=[wandb]"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
