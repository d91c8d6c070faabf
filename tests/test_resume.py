"""Reliability: exact resume (stopped, SIGTERM'd or SIGKILL'd runs end bitwise where the
uninterrupted run ends, on CPU fp32 in one process), atomic checkpoints with a fallback,
non-finite-step guards and fail-fast checks."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tcjepa.checkpoint import load_final_state
from tcjepa.config import project_root
from tcjepa.distributed import free_port
from tcjepa.resume import list_checkpoints
from tcjepa.train import DivergenceError, train
from tests.test_train import SMALL, cfg_for, records


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(run)]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_final_state(a), load_final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def straight(shards64, tmp_path_factory):
    """The uninterrupted reference run (2 loader workers, 9 steps)."""
    return train(cfg_for(shards64, *RESUME), tmp_path_factory.mktemp("ref") / "run", progress=False)


RESUME = ["train.steps=9", "checkpoint.every=0", "data.workers=2", "data.shuffle_buffer=20"]


@pytest.fixture(scope="module")
def straight_cli(shards64, tmp_path_factory):
    """The uninterrupted reference run for the command-line tests, itself a command-line process:
    a run inside the test process can differ in the last bits from a fresh process, because
    libraries that earlier tests imported (transformers' LLaVA, tokenizers) may load their own
    threading runtime, and a resumed run is compared bit for bit."""
    out = tmp_path_factory.mktemp("ref_cli") / "run"
    done = subprocess.run(cli_train(shards64, out), env=clean_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_is_exact(shards64, tmp_path, workers, straight):
    over = [*RESUME[:-2], f"data.workers={workers}", "data.shuffle_buffer=20"]
    ref = straight if workers == 2 else train(cfg_for(shards64, *over), tmp_path / "ref", progress=False)
    cfg = cfg_for(shards64, *over)
    run = train(cfg, tmp_path / "stopped", progress=False, stop_at=3)  # odd: the worker roles rotate
    train(cfg, run, resume=True, progress=False)
    assert losses(run) == losses(ref)
    assert_same_weights(run, ref)


def cli_train(shards: Path, out: Path, *extra: str) -> list[str]:
    sets = [*SMALL, *RESUME, *extra]
    return [sys.executable, "-m", "tcjepa", "train", str(project_root() / "recipes/ijepa_quickstart.yaml"),
            "--data", str(shards), "--out", str(out), "--set", *sets]


def clean_env() -> dict[str, str]:
    """This process's environment without the single-process rendezvous that in-process training
    set up (a child must not reuse its port)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and len(records(run)) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {timeout} s")


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_exact(shards64, tmp_path, straight_cli):
    straight = straight_cli
    kill_after = random.Random().randint(3, 7)  # step 3's record is written after step 2's checkpoint
    run = tmp_path / "killed"
    env = clean_env()
    proc = subprocess.Popen(cli_train(shards64, run, "checkpoint.every=2"), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, kill_after, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader workers, as when a node dies
    proc.wait()
    assert not (run / "final").exists()
    assert list_checkpoints(run), f"killed after step {kill_after}: no complete checkpoint"
    done = subprocess.run(cli_train(shards64, run, "checkpoint.every=2") + ["--resume"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(run) == losses(straight), f"killed after step {kill_after}"
    assert_same_weights(run, straight)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_9_leaves_no_loader_worker_behind(shards64, tmp_path):
    """SIGKILL of the trainer alone (not its process group): its loader workers exit within seconds
    (without the parent-death signal they lived on for 15 minutes and more)."""
    proc = subprocess.Popen(cli_train(shards64, tmp_path / "run", "train.steps=500"), env=clean_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(tmp_path / "run", 2, proc)
        workers = children(proc.pid)
        assert len(workers) >= 2, workers  # data.workers=2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "loader workers outlived the killed trainer"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_and_exits_0(sig, shards64, tmp_path, straight_cli):
    """SIGTERM (Slurm's preemption) and SIGINT (Ctrl-C) both finish the step, write a checkpoint
    (checkpoint.every=0) and exit 0; the resumed run ends bitwise where the uninterrupted one ends."""
    straight = straight_cli
    run = tmp_path / "preempted"
    env = clean_env()
    proc = subprocess.Popen(cli_train(shards64, run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"signal {int(sig)}: finishing this step and writing a checkpoint; send it again to stop at once" in err
    assert f"stopped by signal {int(sig)} after step" in err and "finished" not in out
    stopped = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped < 9 and not (run / "final").exists()  # checkpoint.every=0: written for the stop
    done = subprocess.run(cli_train(shards64, run) + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(run) == losses(straight)
    assert_same_weights(run, straight)


@pytest.mark.slow
def test_a_second_signal_stops_at_once(shards64, tmp_path):
    """The first SIGTERM asks for a checkpoint; a second one, sent while that checkpoint is being
    written (held up by the driver for a minute), ends the process at once, by the signal."""
    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    driver = [sys.executable, str(Path(__file__).with_name("slow_checkpoint_driver.py")), *cli_train(shards64, run)[4:]]
    with open(log, "w") as err:
        proc = subprocess.Popen(driver, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
        wait_for_step(run, 3, proc)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "send it again to stop at once" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.05)
        while "checkpoint held up" not in log.read_text() and time.monotonic() < deadline:  # inside the slow save
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGTERM, log.read_text()[-2000:]
    assert time.monotonic() - t0 < 10  # not after the minute-long save
    assert not (run / "final").exists() and not (run / "checkpoints" / "latest").exists()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(shards64, tmp_path, straight):
    cfg = cfg_for(shards64, *RESUME[:1], "checkpoint.every=2", "checkpoint.keep=3", *RESUME[2:])
    run = train(cfg, tmp_path / "run", progress=False, stop_at=6)
    tags = [p.name for p in list_checkpoints(run)]
    assert tags == ["step_00000002", "step_00000004", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    states = next((run / "checkpoints" / "step_00000006").glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # truncated
    (run / "checkpoints" / "step_00000008.partial").mkdir()  # a save that never finished
    with pytest.warns(UserWarning, match=r"skipped step_00000006 \(.*truncated.*resuming from step_00000004"):
        train(cfg, run, resume=True, progress=False)
    assert losses(run) == losses(straight)  # from step 4 on, exactly the uninterrupted run
    assert_same_weights(run, straight)


class _RunsCode:
    """Unpickling this runs ``touch PATH``: what a tampered checkpoint could do to ``torch.load``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_that_would_run_code_is_refused(shards64, tmp_path, straight):
    """Resume loads with ``weights_only=True`` (DeepSpeed's loads too): a pickled payload in the
    newest checkpoint is not executed; that checkpoint is skipped for the previous one."""
    from tcjepa.resume import _write_manifest

    cfg = cfg_for(shards64, *RESUME[:1], "checkpoint.every=2", "checkpoint.keep=3", *RESUME[2:])
    run = train(cfg, tmp_path / "run", progress=False, stop_at=6)
    newest = run / "checkpoints" / "step_00000006"
    states = next(newest.glob("*model_states.pt"))
    payload = torch.load(states, weights_only=False)
    marker = tmp_path / "code_ran"
    payload["payload"] = _RunsCode(marker)
    torch.save(payload, states)
    (newest / "manifest.json").unlink()
    _write_manifest(newest)  # a consistent checkpoint on disk: only its content is hostile
    with pytest.warns(UserWarning, match=r"skipped step_00000006 \(refused to unpickle .*posix is blocked.*resuming from step_00000004"):
        train(cfg, run, resume=True, progress=False)
    assert not marker.exists()
    assert losses(run) == losses(straight)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after loading


def test_weights_only_loads_overrides_a_users_opt_out(tmp_path, monkeypatch):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (set by users for DeepSpeed on torch >= 2.6) is lifted
    while resuming, and restored after, as is the user's own allow-list."""
    import pickle

    import numpy as np

    from tcjepa.resume import weights_only_loads

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.serialization.add_safe_globals([np.ndarray])
    torch.save({"rng": np.random.get_state(), "x": _RunsCode(tmp_path / "code_ran")}, tmp_path / "bad.pt")
    torch.save({"rng": np.random.get_state()}, tmp_path / "good.pt")
    with weights_only_loads():
        assert torch.load(tmp_path / "good.pt", weights_only=False)["rng"][0] == "MT19937"
        with pytest.raises(pickle.UnpicklingError, match="blocked"):
            torch.load(tmp_path / "bad.pt", weights_only=False)
    assert not (tmp_path / "code_ran").exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert np.ndarray in torch.serialization.get_safe_globals()


def test_non_finite_losses_are_skipped_counted_then_stop(shards64, tmp_path, monkeypatch):
    from tcjepa.methods.jepa import JEPA

    real, calls = JEPA.loss, {"n": 0}
    bad_steps = {2, 3}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss, extra = real(self, *args, **kwargs)
        return (loss * float("nan") if calls["n"] in bad_steps else loss), extra

    monkeypatch.setattr(JEPA, "loss", poisoned)
    run = train(cfg_for(shards64, "train.steps=6", "train.log_every=1", "checkpoint.every=0"), tmp_path / "a",
                progress=False)
    recs = records(run)
    assert [r["bad_steps"] for r in recs] == [0, 1, 2, 2, 2, 2]
    assert recs[1]["loss"] is None and all(r["loss"] is not None for r in recs[3:])
    assert all(torch.isfinite(t).all() for t in load_final_state(run).values())

    bad_steps.clear()
    bad_steps.update(range(5, 100))  # diverged from step 5 on
    calls["n"] = 0
    cfg = cfg_for(shards64, "train.steps=20", "checkpoint.every=2", "train.max_bad_steps=3")
    with pytest.raises(DivergenceError, match=r"3 steps in a row .* last at step 7; the last good checkpoint is .*step_00000006"):
        train(cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_00000006"


class _NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward: a gradient that is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_non_finite_gradient_is_skipped_under_zero_0(shards64, tmp_path, monkeypatch):
    """A finite loss whose gradient is not: with ZeRO 0 the step is skipped and counted, as a
    non-finite loss is. The student after a skipped step 2 is the student after step 1 (the
    warm-up learning rate of step 1 does not depend on the number of steps)."""
    from tcjepa.methods.jepa import JEPA

    zero0 = ["train.log_every=1", "checkpoint.every=0", "deepspeed.zero_stage=0"]
    one = load_final_state(train(cfg_for(shards64, "train.steps=1", *zero0), tmp_path / "one", progress=False))
    real, calls = JEPA.loss, {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss, extra = real(self, *args, **kwargs)
        return (_NanGradient.apply(loss) if calls["n"] == 2 else loss), extra

    monkeypatch.setattr(JEPA, "loss", poisoned)
    with pytest.warns(UserWarning, match="step 2: non-finite loss or gradient; step skipped"):
        run = train(cfg_for(shards64, "train.steps=2", *zero0), tmp_path / "a", progress=False)
    recs = records(run)
    assert [r["bad_steps"] for r in recs] == [0, 1] and recs[1]["loss"] is None
    two = load_final_state(run)
    assert all(torch.isfinite(t).all() for t in two.values())
    student = [k for k in one if not k.startswith("teacher.")]
    assert student and all(torch.equal(one[k], two[k]) for k in student)


def test_without_the_nan_guard_a_non_finite_loss_is_trained_on_and_stops_the_run(shards64, tmp_path, monkeypatch):
    """``train.nan_guard: false``: no per-step check, so nothing is skipped or counted; the logged
    loss is then not finite and the run stops with an error at that logging step."""
    from tcjepa.methods.jepa import JEPA

    real, calls = JEPA.loss, {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss, extra = real(self, *args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), extra

    monkeypatch.setattr(JEPA, "loss", poisoned)
    cfg = cfg_for(shards64, "train.steps=4", "train.log_every=1", "checkpoint.every=0", "train.nan_guard=false")
    with pytest.raises(DivergenceError, match=r"loss is nan at step 2"):
        train(cfg, tmp_path / "a", progress=False)
    assert [r["bad_steps"] for r in records(tmp_path / "a")] == [0]  # step 1 logged; step 2 was not skipped


def test_resuming_with_other_loader_workers_warns_and_restarts_the_stream(shards64, tmp_path):
    cfg = cfg_for(shards64, "train.steps=4", "checkpoint.every=2", "data.workers=0")
    run = train(cfg, tmp_path / "run", progress=False, stop_at=2)
    with pytest.warns(UserWarning, match=r"--resume: data.workers changed \(1 -> 2 readers\): the data stream restarts"):
        train(cfg_for(shards64, "train.steps=4", "checkpoint.every=2", "data.workers=2"), run, resume=True,
              progress=False)
    assert [r["step"] for r in records(run)][-1] == 4 and (run / "final").is_dir()


@pytest.mark.slow
def test_bf16_trains_end_to_end_with_fp32_weights_and_teacher(shards64, tmp_path):
    """``train.precision=bf16`` on the CPU: autocast changes the losses (it is really on), they stay
    close to fp32's and fall as fp32's do, and the weights and EMA teacher stay fp32."""
    runs = {p: train(cfg_for(shards64, "train.steps=12", "train.log_every=1", "checkpoint.every=0",
                             f"train.precision={p}"), tmp_path / p, progress=False) for p in ("fp32", "bf16")}
    fp32, bf16 = ([r["loss"] for r in records(runs[p])] for p in ("fp32", "bf16"))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.1)
    assert sum(bf16[-3:]) < 0.8 * sum(bf16[:3])
    state = load_final_state(runs["bf16"])
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert {k.split(".")[0] for k in state} == {"encoder", "teacher", "predictor"}


def test_fail_fast_before_training(shards64, tmp_path, monkeypatch, capsys):
    from tcjepa import rundir
    from tcjepa import train as train_module
    from tcjepa.cli import main

    args = ["train", str(project_root() / "recipes/ijepa_quickstart.yaml"), "--data", str(shards64), "--set", *SMALL]
    # target blocks that cannot fit the grid
    assert main([*args, "mask.target_scale=[0.95,1.0]", "--out", str(tmp_path / "a")]) == 2
    assert "error: " in (err := capsys.readouterr().err) and "mask: " in err and "min_context" in err
    # an output directory that cannot be written: below a regular file, or refused by the OS
    (tmp_path / "file").write_text("not a directory")
    assert main([*args, "--out", str(tmp_path / "file" / "run")]) == 2
    assert "file/run: not writable" in capsys.readouterr().err
    real_write = Path.write_text

    def refuse(self, *a, **k):
        if self.name == ".write_test":
            raise PermissionError(13, "Permission denied")
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", refuse)
    assert main([*args, "--out", str(tmp_path / "ro")]) == 2
    assert "ro: not writable (Permission denied)" in capsys.readouterr().err
    monkeypatch.undo()
    # a nearly full disk
    import shutil

    full = shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: full)
    assert main([*args, "--out", str(tmp_path / "full")]) == 2
    assert "GiB free, but this run needs about" in capsys.readouterr().err
    monkeypatch.undo()
    # a batch that does not split over the ranks
    from tcjepa.distributed import DistInfo

    monkeypatch.setattr(train_module, "init_distributed", lambda: DistInfo(0, 3, 0, torch.device("cpu")))
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "not divisible by the world size 3" in capsys.readouterr().err
    monkeypatch.undo()
    # a missing text encoder
    assert main([*args, "conditioner.enabled=true", "conditioner.text_encoder=hf",
                 f"conditioner.text_path={tmp_path / 'no_such_model'}", "--out", str(tmp_path / "c")]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert not [n for n in ("a", "b", "c", "ro", "full") if (tmp_path / n).exists()]  # refused: nothing written


def test_collapse_is_logged_and_warned(shards64, tmp_path, monkeypatch):
    from tcjepa.methods.jepa import JEPA

    run = train(cfg_for(shards64, "train.steps=2", "train.log_every=1", "checkpoint.every=0"), tmp_path / "ok",
                progress=False)
    assert all(r["target_rankme"] > 5 for r in records(run))  # a random-init teacher spreads its features

    real = JEPA.targets

    def collapsed(self, images, masks):
        t = real(self, images, masks)
        return torch.ones_like(t) * torch.linspace(-1, 1, t.shape[-1])  # every token the same vector

    monkeypatch.setattr(JEPA, "targets", collapsed)
    with pytest.warns(UserWarning, match=r"representation collapse\? target RankMe 1\.00 < train.collapse_rankme 2.0; "
                                         r"target std 0\.0000 < train.collapse_std"):
        run = train(cfg_for(shards64, "train.steps=2", "train.log_every=1", "checkpoint.every=0"), tmp_path / "bad",
                    progress=False)
    assert [round(r["target_rankme"], 2) for r in records(run)] == [1.0, 1.0]


@pytest.mark.slow
def test_two_process_sigterm_then_resume_matches_the_uninterrupted_run(shards64, tmp_path):
    """SIGTERM to both ranks (as a scheduler signals every task): they agree on the step,
    checkpoint and exit 0; the resumed 2-process run then matches an uninterrupted one. (Signalling
    torchrun's agent instead makes it exit 1 after forwarding the signal, whatever the ranks do.)"""
    def torchrun(out: Path, port: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                *cli_train(shards64, out)[1:], "deepspeed.zero_stage=1", *extra]

    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(torchrun(tmp_path / "ref", free_port()), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "pre"
    proc = subprocess.Popen(torchrun(run, free_port()), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 3, proc, timeout=300)
    for pid in children(proc.pid):
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("stopped by signal 15 after step") == 1  # rank 0 reports
    resumed = subprocess.run(torchrun(run, free_port()) + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for (sa, la), (sb, lb) in zip(losses(run), losses(tmp_path / "ref"), strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)
    a, b = load_final_state(run), load_final_state(tmp_path / "ref")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_periodic_probe_is_logged(shards64, tmp_path):
    from tcjepa.config import ConfigError

    val = tmp_path / "val"
    val.mkdir()
    from tests.conftest import labelled_members, write_tar

    members = [(name, json.dumps({**json.loads(data), "labels": {"color": json.loads(data)["label"]}}).encode())
               if name.endswith(".json") else (name, data) for name, data in labelled_members(500, 40, size=64)]
    write_tar(val / "000000.tar", members)
    run = train(cfg_for(shards64, "train.steps=4", "train.log_every=1", "checkpoint.every=0", "train.eval_every=2",
                        f"data.val={val}", "probe.epochs=20", "probe.labels=[label,labels.color,labels.count]"),
                tmp_path / "run", progress=False)
    recs = records(run)
    assert [r["step"] for r in recs if "probe_top1" in r] == [0, 2, 4]  # step 0: the encoder at initialisation
    # every label data.val has gets its curve; labels.count is not in it and is left out
    assert set(recs[0]) == {"step", "probe_top1", "probe_top1/labels.color"}
    assert all(0.5 < r[k] <= 1 for r in recs for k in ("probe_top1", "probe_top1/labels.color") if k in r)
    with pytest.raises(ConfigError, match="train.eval_every.*needs data.val"):
        cfg_for(shards64, "train.eval_every=2")
