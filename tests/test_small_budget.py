"""benchmarks/small_budget.py on shards of the user's own (issue 29's Fashion-MNIST and easy-vqa rows):
the trained and the initial encoder are probed on the same given splits, and the script says when
only one split is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_benchmark


def test_small_budget_trains_and_probes_on_given_shards(shards64: Path, tmp_path: Path, capsys, monkeypatch):
    script = load_benchmark("small_budget")
    out = tmp_path / "out"
    assert script.main(["--steps", "2", "--seeds", "0", "--out", str(out), "--train-data", str(shards64),
                        "--val-data", str(shards64), "--set", "train.batch_size=8", "probe.epochs=2",
                        "train.log_every=1", "train.eval_every=1"]) == 0
    (result,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert result["data"] == [str(shards64), str(shards64)]
    assert set(result["trained"]) == set(result["init"]) == {"label"}  # the only recipe label these shards hold
    assert [step for step, _ in result["probe_curve"]] == [0, 1, 2]  # train.eval_every: the init, then each step
    assert result["probe_curves"] == {}  # per further label: these shards hold no labels.color / labels.count
    assert (out / "ijepa_quickstart_2_s0" / "final" / "model.safetensors").is_file()
    assert not (out / "data").exists()  # no synthetic scenes written
    assert "label: trained - init" in capsys.readouterr().out

    import tcjepa.eval.probe

    seen, run_probe = [], tcjepa.eval.probe.run_probe
    monkeypatch.setattr(tcjepa.eval.probe, "run_probe", lambda *a, **k: seen.append(a[3]) or run_probe(*a, **k))
    assert script.main(["--steps", "2", "--seeds", "0", "--out", str(out), "--train-data", str(shards64),
                        "--val-data", str(shards64), "--probe", "probe.last_blocks=2", "probe.kind=both",
                        "probe.epochs=2", "probe.attentive_epochs=1"]) == 0  # the finished run, probed again
    again = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert again["probe"] == ["probe.last_blocks=2", "probe.kind=both", "probe.epochs=2", "probe.attentive_epochs=1"]
    assert set(again["trained"]) == set(again["init"]) == {"label", "label (attentive)"}
    assert [(c.last_blocks, c.kind) for c in seen] == [(2, "both")] * 2  # the trained encoder and the init alike
    with pytest.raises(SystemExit):
        script.main(["--train-data", str(shards64)])
