"""The command-line contract: subcommands call library functions; errors exit 2 with one line."""

import json
from pathlib import Path

import pytest

from tcjepa.cli import main
from tcjepa.quickstart import quickstart


def test_data_synthetic(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path / "d"), "--samples", "10", "--shard-size", "4", "--seed", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["000000.tar", "000001.tar", "000002.tar"]
    assert "wrote 10 samples in 3 shards" in capsys.readouterr().out
    assert main(["data", "synthetic", "--out", str(tmp_path / "e"), "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data synthetic: samples must be >= 1") and "\n" not in err


@pytest.mark.slow
def test_quickstart_then_eval_probe(tmp_path, capsys):
    out = tmp_path / "qs"
    result = quickstart(out, ["train.steps=6", "train.log_every=2", "probe.epochs=40", "checkpoint.every=0"],
                        progress=False, train_samples=300, val_samples=100)
    printed = capsys.readouterr().out
    assert "TC-JEPA, trained (EMA teacher)" in printed and "random init" in printed and "colour" in printed
    assert "cond_sparse" in (Path(result["run_dir"]) / "metrics.jsonl").read_text()  # quickstart trains TC-JEPA (paper)
    assert len(list(Path(result["viz"]).glob("attention_*.png"))) == 4
    run = Path(result["run_dir"])
    saved = json.loads((run / "eval" / "probe.json").read_text())
    assert saved["task"] == "probe" and saved["checkpoint"] == str(run)
    assert saved["metrics"]["num_val"] == 100
    colour = saved["metrics"]["per_label"]["labels.color"]  # the easy label: any encoder's features carry colour
    assert colour["top1"] > colour["majority_class"] + 0.05, colour  # 0.31 against 0.20 when written
    assert set(saved["metrics"]["per_label"]) == {"label", "labels.color", "labels.count"}
    assert saved["metrics"]["top1"] == result["probe"]["top1"]
    assert (run / "eval" / "probe_random_init.json").is_file()

    # the same run through `tcjepa eval probe`, with a --set override and --json
    js = tmp_path / "probe.json"
    argv = ["eval", "probe", "--checkpoint", str(run), "--data", str(out / "data/train"),
            "--val-data", str(out / "data/val"), "--json", str(js), "--set", "probe.epochs=40"]
    assert main(argv) == 0
    again = json.loads(js.read_text())
    assert again["metrics"]["top1"] == pytest.approx(saved["metrics"]["top1"])  # deterministic
    assert main(argv[:-2] + ["--set", "train.steps=3"]) == 2
    assert "only probe.* keys" in capsys.readouterr().err
    with pytest.raises(Exception, match="already holds a finished quickstart"):
        quickstart(out, progress=False)


@pytest.mark.parametrize("argv", [
    ["--local_rank=1", "train", "r.yaml", "--steps", "3"],  # the deepspeed launcher's order
    ["train", "r.yaml", "--local-rank", "1", "--steps", "3"],  # torch.distributed.launch style
])
def test_launcher_local_rank_is_accepted(argv):
    from tcjepa.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.command == "train" and args.recipe == "r.yaml" and args.steps == 3 and args.local_rank == 1


@pytest.mark.parametrize("name, content, expect", [
    ("photo.jpg", b"\xff\xd8\xff\xe0 not really", r"photo.jpg is an image, not shards.*tcjepa data write --input FOLDER"),
    ("captions.csv", b"image,caption\na.jpg,a cat\n", r"captions.csv is a csv manifest, not shards.*"
                                                       r"tcjepa data write --input .*captions.csv"),
    ("data.parquet", b"PAR1\x00\x00", r"data.parquet is a parquet manifest, not shards"),
    ("blob.bin", b"\x00\x01\x02\xff", r"blob.bin is neither a .tar shard.*binary file"),
    ("rows.txt", b"image,caption\na.jpg,a cat\n", r"line 1 \('image,caption'\) is not a .tar file; if it is a "
                                                  r"caption manifest, convert it"),
])
def test_wrong_kind_of_data_is_named(tmp_path, capsys, name, content, expect):
    """--data at an image, a manifest or a binary file: one error line saying what it is and what to
    run instead; nothing is created."""
    import re

    (tmp_path / name).write_bytes(content)
    out = tmp_path / "run"
    from tcjepa.config import project_root

    recipe = str(project_root() / "recipes" / "ijepa_quickstart.yaml")
    assert main(["train", recipe, "--data", str(tmp_path / name), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(expect, err), err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_train_output_is_quiet_unless_verbose(tmp_path, verbose):
    """No library set-up lines on a CPU (DeepSpeed's accelerator guess and op-build line, torch's
    CUDA_HOME warning); a skipped sample is one 'warning:' line without an echoed source line.
    --verbose shows the libraries' lines again."""
    import subprocess
    import sys

    from tcjepa.config import project_root
    from tests.conftest import labelled_members, write_tar
    from tests.test_resume import clean_env

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "000000.tar", labelled_members(0, 40, size=64) + [("000099.png", b"not a png"),
                                                                      ("000099.txt", b"broken")])
    argv = [sys.executable, "-m", "tcjepa", "train", str(project_root() / "recipes/ijepa_quickstart.yaml"),
            "--data", str(shards), "--out", str(tmp_path / "run"), "--steps", "2", "--set", "train.batch_size=8",
            "model.depth=1", "model.predictor_depth=1", "data.shuffle_buffer=10", "data.max_skip_rate=1",
            "checkpoint.every=0"] + (["--verbose"] if verbose else [])
    done = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    noise = ("Setting accelerator to CPU", "No CUDA runtime is found", "built successfully")
    if verbose:
        assert "built successfully" in out
    else:
        assert not [n for n in noise if n in out], out[-2000:]
        assert done.stderr.count("skipped sample (") == done.stderr.count("warning: skipped sample (bad_image)") == 1
        assert "warnings.warn(" not in done.stderr


def test_first_time_op_build_is_detected(tmp_path, monkeypatch):
    from tcjepa.distributed import shm_op_is_built

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not shm_op_is_built()  # the first start on this machine: a minute's build, announced
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)  # torch makes the build directory when asked
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert shm_op_is_built()



@pytest.mark.parametrize("user_env, expect", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                              ({"GOMP_SPINCOUNT": "300000"}, None)])
def test_passive_openmp_wait_unless_the_user_chose(monkeypatch, user_env, expect):
    """Spinning OpenMP threads starve a job sharing the machine (benchmarks/bench_sharing.py)."""
    import os

    from tcjepa.cli import share_cpus

    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in user_env.items():
        monkeypatch.setenv(var, value)
    share_cpus()
    assert os.environ.get("OMP_WAIT_POLICY") == expect


def test_wait_policy_is_set_before_torch_loads(tmp_path):
    """The policy is read once, when torch loads its OpenMP runtime: main() must set it before
    anything imports torch (checked in a fresh process, where nothing has yet)."""
    import subprocess
    import sys

    probe = ("import sys, tcjepa.cli as c; "
             "c.share_cpus = lambda: print('torch loaded' if 'torch' in sys.modules else 'before torch'); "
             "c.main(['data', 'synthetic', '--out', sys.argv[1], '--samples', '1'])")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "data")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "before torch"
