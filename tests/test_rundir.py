"""Run integrity: a resume continues the run it names or says why not; only finished runs say
"finished"; nothing is written by a refused command; results stay with the weights they came from."""

import json
import os
import signal
import stat
from pathlib import Path

import pytest

import tcjepa.train as train_module
from tcjepa.checkpoint import weights_id
from tcjepa.cli import main
from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.eval.report import read_run
from tcjepa.rundir import Change, config_changes
from tcjepa.train import run_training, train
from tests.test_train import SMALL, cfg_for, records

RECIPE = project_root() / "recipes/ijepa_quickstart.yaml"


def test_config_changes_tell_math_from_watching():
    a = load_config(RECIPE, ["train.steps=20"])
    b = load_config(RECIPE, ["train.steps=30", "train.log_every=5", "checkpoint.keep=7", "optim.lr=0.5"])
    changes = {c.key: c for c in config_changes(a, b)}
    assert set(changes) == {"train.steps", "train.log_every", "checkpoint.keep", "optim.lr"}
    assert changes["train.steps"] == Change("train.steps", 20, 30)
    assert {k for k, c in changes.items() if c.changes_math} == {"train.steps", "optim.lr"}
    import os

    here = load_config(RECIPE, ["data.train=shards"])
    there = load_config(RECIPE, [f"data.train={os.path.abspath('shards')}"])
    assert config_changes(here, there) == []  # one directory, spelled two ways
    assert [c.key for c in config_changes(here, load_config(RECIPE, ["data.train=other"]))] == ["data.train"]


@pytest.fixture(scope="module")
def finished(shards64, tmp_path_factory):
    """A finished 6-step run with a checkpoint every 3 steps."""
    return train(cfg_for(shards64, "train.steps=6", "checkpoint.every=3"), tmp_path_factory.mktemp("f") / "run",
                 progress=False)


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


@pytest.mark.slow
def test_resume_refuses_silent_changes(finished, shards64, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"is finished \(step 6 of train.steps 6\).*--allow-change train.steps"):
        train(cfg_for(shards64, "train.steps=6", "checkpoint.every=3"), run, resume=True, progress=False)
    more = cfg_for(shards64, "train.steps=9", "checkpoint.every=3", "optim.lr=0.002")
    with pytest.raises(ConfigError, match=r"would change the run's settings: optim.lr: 0.001 -> 0.002; "
                                          r"train.steps: 6 -> 9\. .*--allow-change optim.lr train.steps$"):
        train(more, run, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"settings: optim.lr: 0.001 -> 0.002\. .*--allow-change optim.lr$"):
        train(more, run, resume=True, progress=False, allow_change=("train.steps",))
    with pytest.raises(ConfigError, match="no config key 'train.stepz'"):
        train(cfg_for(shards64, "train.steps=9", "checkpoint.every=3"), run, resume=True, progress=False,
              allow_change=("train.stepz",))
    assert (run / "final" / "model.safetensors").read_bytes() == before  # nothing was touched
    assert not (run / "config_history.jsonl").exists()


@pytest.mark.slow
def test_extending_a_finished_run_is_recorded_and_sets_old_results_aside(finished, shards64, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    old_id = weights_id(run)
    assert old_id and len(old_id) == 32
    (run / "eval").mkdir()
    (run / "eval" / "probe.json").write_text(json.dumps({"task": "probe", "checkpoint": str(run), "data": "x",
                                                         "metrics": {"top1": 0.5}, "weights_id": old_id}))
    # checkpoint.every differs too: a watching key, listed and recorded but needing no permission
    outcome = run_training(cfg_for(shards64, "train.steps=9", "checkpoint.every=9"), run, resume=True,
                           progress=False, allow_change=("train.steps",))
    assert outcome.finished and outcome.step == 9
    out = capsys.readouterr().out
    assert "--resume from step 6 with changed settings" in out and "train.steps: 6 -> 9" in out
    history = [json.loads(l) for l in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 6
    assert {c["key"]: (c["old"], c["new"]) for c in history[0]["changes"]} == {
        "train.steps": (6, 9), "checkpoint.every": (3, 9)}
    assert [r["step"] for r in records(run)] == list(range(1, 10))
    assert weights_id(run) not in (None, old_id)
    assert not (run / "eval" / "probe.json").exists()  # the old weights' result is kept apart
    aside = list((run / "eval" / "superseded").glob("*_before_step9/probe.json"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["weights_id"] == old_id
    assert read_run(run).evals == {}  # the report shows no result beside weights it did not come from


@pytest.mark.slow
def test_a_checkpoint_past_the_last_step_is_refused(shards64, tmp_path):
    run = train(cfg_for(shards64, "train.steps=8", "checkpoint.every=4"), tmp_path / "run", progress=False, stop_at=4)
    with pytest.raises(ConfigError, match=r"latest checkpoint is at step 4, past train.steps 3"):
        train(cfg_for(shards64, "train.steps=3", "checkpoint.every=4"), run, resume=True, progress=False,
              allow_change=("train.steps",))
    assert not (run / "final").exists()


def test_the_report_skips_results_of_other_weights(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "eval").mkdir()
    result = {"task": "probe", "checkpoint": str(run), "data": "x", "metrics": {"top1": 0.5}}
    (run / "eval" / "probe.json").write_text(json.dumps({**result, "weights_id": "0" * 32}))
    (run / "eval" / "vqa.json").write_text(json.dumps({**result, "task": "vqa", "weights_id": weights_id(run)}))
    info = read_run(run)
    assert set(info.evals) == {"vqa"} and info.stale == ["probe"]


@pytest.mark.slow
def test_sigterm_with_an_old_final_does_not_say_finished(finished, shards64, tmp_path, monkeypatch, capsys):
    """A stop by signal while an earlier final/ is on disk: the CLI must not print "finished"."""
    run = copy_run(finished, tmp_path / "run")
    real_lr_at, calls = train_module.lr_at, []

    def lr_at_then_sigterm(*a, **k):  # inside the loop, after the stop handler is installed
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(*a, **k)

    monkeypatch.setattr(train_module, "lr_at", lr_at_then_sigterm)
    argv = ["train", str(RECIPE), "--out", str(run), "--resume", "--steps", "9", "--allow-change", "train.steps",
            "--data", str(shards64), "--set", *SMALL, "checkpoint.every=3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "stopped by signal 15 after step 7" in captured.err
    assert "finished" not in captured.out
    assert (run / "final").is_dir()  # the old final is still there: the message must not trust it


@pytest.mark.slow
def test_a_refused_stage_2_leaves_no_run_directory(shards64, tmp_path):
    cfg = load_config(project_root() / "recipes/salt_stage2_quickstart.yaml",
                      [f"data.train={shards64}", f"teacher.checkpoint={tmp_path / 'no_such_run'}"])
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        train(cfg, tmp_path / "s2", progress=False)
    assert not (tmp_path / "s2").exists()


@pytest.mark.parametrize("umask, expect", [(0o022, 0o644), (0o027, 0o640)])
def test_final_weights_follow_the_umask(tmp_path, umask, expect):
    import torch

    from tcjepa.checkpoint import save_final

    old = os.umask(umask)
    try:
        save_final(tmp_path, {"encoder": torch.nn.Linear(2, 2)}, load_config(RECIPE))
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.yaml"):  # safetensors alone would write 0600
        assert stat.S_IMODE((tmp_path / "final" / name).stat().st_mode) == expect, name


def test_evaluations_on_other_data_are_kept(finished, tmp_path):
    from tcjepa.eval.common import result_dict, write_result

    run = copy_run(finished, tmp_path / "run")
    for data, top1 in (("a/{0..1}.tar", 0.4), ("b/{0..1}.tar", 0.6), ("a/{0..1}.tar", 0.5)):
        write_result(result_dict("probe", run, data, {"top1": top1}, val_data="v"), run, None)
    latest = json.loads((run / "eval" / "probe.json").read_text())
    assert latest["metrics"]["top1"] == 0.5 and latest["weights_id"] == weights_id(run)
    kept = {json.loads(p.read_text())["data"]: json.loads(p.read_text())["metrics"]["top1"]
            for p in (run / "eval" / "history").glob("probe.*.json")}
    assert kept == {"a/{0..1}.tar": 0.5, "b/{0..1}.tar": 0.6}  # one per data and settings, the latest of each
