"""Short end-to-end training runs on hand-written shards (single process and 2-process ZeRO-2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcjepa.checkpoint import load_encoder, load_final_state
from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.train import deepspeed_config, train
from tcjepa.distributed import free_port
from tests.conftest import labelled_members, write_tar

RECIPE = project_root() / "recipes/ijepa_quickstart.yaml"
SMALL = ["model.encoder=vit_micro_8", "model.depth=2", "model.predictor_depth=1", "model.predictor_width=48",
         "train.batch_size=16", "train.log_every=1", "data.workers=0", "data.shuffle_buffer=50",
         "optim.warmup_steps=2"]


def records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]


def cfg_for(shards: Path, *extra: str):
    return load_config(RECIPE, [f"data.train={shards}", *SMALL, *extra])


@pytest.mark.slow
def test_short_run_learns_and_writes_run_dir(shards64, tmp_path):
    run = train(cfg_for(shards64, "train.steps=30", "checkpoint.every=10", "checkpoint.keep=2"), tmp_path / "run", progress=False)
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 31))
    for key in ("loss", "lr", "wd", "momentum", "img_per_s", "skipped", "target_std"):
        assert key in recs[0]
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert recs[-1]["momentum"] == pytest.approx(0.996 + 0.004 * 29 / 30)
    assert (run / "config.yaml").is_file()
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000020", "step_00000030"]  # keep=2 pruned step 10
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    state = load_final_state(run)
    assert {k.split(".")[0] for k in state} == {"encoder", "teacher", "predictor"}
    teacher = load_encoder(run)  # auto -> the EMA teacher for an ema run
    student = load_encoder(run, "student")
    assert not torch.equal(teacher.blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg_for(shards64, "train.steps=30"), run, progress=False)


@pytest.mark.slow
def test_resume_continues_where_it_stopped(shards64, tmp_path):
    cfg = cfg_for(shards64, "train.steps=8", "checkpoint.every=4")
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_at=4)
    assert not (part / "final").exists()
    assert [r["step"] for r in records(part)] == [1, 2, 3, 4]
    # same seed, same data order, same masks: identical until the interruption
    assert [r["loss"] for r in records(part)] == [r["loss"] for r in records(full)][:4]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, part, progress=False)
    train(cfg, part, resume=True, progress=False)
    recs = records(part)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[4]["lr"] == records(full)[4]["lr"] and recs[4]["momentum"] == records(full)[4]["momentum"]
    assert (part / "final" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(cfg, tmp_path / "never_started", resume=True, progress=False)


def test_deepspeed_config_from_recipe():
    cfg = load_config(RECIPE, ["train.batch_size=64", "deepspeed.zero_stage=2", "optim.grad_clip=1.0"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    bad = load_config(RECIPE, ["deepspeed.config={train_batch_size: 8}"])
    with pytest.raises(ConfigError, match="train_batch_size is set by tcjepa"):
        deepspeed_config(bad, 1)


@pytest.mark.slow
def test_two_process_zero2_with_torchrun(shards64, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tcjepa", "train", str(RECIPE), "--data", str(shards64), "--steps", "4", "--out", str(run),
           "--set", *SMALL, "deepspeed.zero_stage=2", "checkpoint.every=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    # ZeRO-2 partitions optimiser state: one shard per rank
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000004").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert (run / "final" / "model.safetensors").is_file()
    assert proc.stdout.count("finished:") == 1  # only rank 0 prints


@pytest.mark.slow
def test_two_process_with_the_deepspeed_launcher(shards64, tmp_path):
    """`deepspeed --module tcjepa ...` passes --local_rank=N before the subcommand."""
    run = tmp_path / "ds"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "tcjepa", "train", str(RECIPE), "--data", str(shards64), "--steps", "2", "--out", str(run),
           "--set", *SMALL, "deepspeed.zero_stage=1", "checkpoint.every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert [r["step"] for r in records(run)] == [1, 2]
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_official_mask_policy_trains(shards64, tmp_path):
    """The truncating policy (nothing padded: no packing, no attention masks) runs through the loop."""
    run = train(cfg_for(shards64, "train.steps=3", "checkpoint.every=0", "mask.policy=official"), tmp_path / "o",
                progress=False)
    assert [r["step"] for r in records(run)] == [1, 2, 3]
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_zero3_matches_zero0(shards64, tmp_path):
    """Partitioned parameters (ZeRO-3: EMA and final export gather them) train the same model."""
    finals = []
    for stage in (0, 3):
        run = train(cfg_for(shards64, "train.steps=3", "checkpoint.every=0", f"deepspeed.zero_stage={stage}"),
                    tmp_path / f"z{stage}", progress=False)
        finals.append(load_final_state(run))
    a, b = finals
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert not torch.equal(a["teacher.norm.weight"], torch.ones_like(a["teacher.norm.weight"]))  # EMA moved it


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_counted_in_metrics_and_survive_resume(workers, tmp_path):
    """Skip counts at every logged step equal an uninterrupted run's exactly, with one reader or
    two loader workers (whose counts are summed), across a resume."""
    d = tmp_path / "dirty"
    d.mkdir()
    for i in range(2):
        members = labelled_members(i * 30, 30, size=64)
        members += [(f"bad{i}{j}.png", b"\x89PNG broken") for j in range(5)]
        write_tar(d / f"{i:06d}.tar", members)
    cfg = cfg_for(d, "train.steps=12", "checkpoint.every=6", "train.log_every=3", "data.shuffle_buffer=10",
                  f"data.workers={workers}")
    counts = lambda recs: [(r["step"], {k: v for k, v in r.items() if k.startswith("skipped")}) for r in recs]
    full = counts(records(train(cfg, tmp_path / "full", progress=False)))
    run = train(cfg, tmp_path / "run", progress=False, stop_at=6)
    first = records(run)[-1]
    assert first["step"] == 6 and first["skipped"] > 0 and first["skipped"] == first["skipped_bad_image"]
    train(cfg, run, resume=True, progress=False)
    assert counts(records(run)) == full  # neither reset nor counted twice by the resume
    assert full[-1][1]["skipped"] > first["skipped"]


def test_skip_rate_over_the_limit_stops_training(tmp_path):
    from data_pipelines.loader import DataError

    d = tmp_path / "dirty"
    d.mkdir()
    write_tar(d / "000000.tar", labelled_members(0, 30, size=64) + [(f"bad{j}.png", b"junk") for j in range(10)])
    cfg = cfg_for(d, "train.steps=50", "data.skip_rate_min_samples=40", "data.shuffle_buffer=5")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"were skipped, over the limit of 5.0%.*bad_image"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_activation_checkpointing_trains_the_same_run(shards64, tmp_path):
    """``model.activation_checkpointing`` through the loop (ZeRO-2): the same losses as without."""
    runs = [train(cfg_for(shards64, "train.steps=3", "checkpoint.every=0", "deepspeed.zero_stage=2",
                          f"model.activation_checkpointing={on}"), tmp_path / str(on), progress=False)
            for on in ("false", "true")]
    a, b = (records(r) for r in runs)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)


@pytest.mark.slow
def test_compiled_run_trains_the_same_model(shards64, tmp_path):
    """``train.compile``: the compiled student and teacher follow the eager run's losses and
    weights (the context length changes every batch: dynamic sizes), and the final weights keep
    their names (compiled in place, no ``_orig_mod.`` prefix)."""
    from torch._dynamo.utils import counters

    graphs = []
    runs = []
    for on in ("false", "true"):
        before = counters["stats"]["unique_graphs"]
        runs.append(train(cfg_for(shards64, "train.steps=3", "checkpoint.every=0", f"train.compile={on}"),
                          tmp_path / on, progress=False))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] == 0 and graphs[1] > 0  # the compiled run did compile
    a, b = (records(r) for r in runs)
    assert len({r["loss"] for r in a}) == 3  # three different batches
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    sa, sb = (load_final_state(r) for r in runs)
    assert sa.keys() == sb.keys()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4
