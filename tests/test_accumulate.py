"""Gradient accumulation (``train.grad_accum_steps``) is exact: a step over 4 micro-batches of 4
is the step over one batch of 16 (same data, same masks) for every method and ZeRO stage, in one
process and in two; a non-finite micro-batch skips its whole step."""

from __future__ import annotations

import sys

import pytest
import torch

from data_pipelines.tokenizers import Tokens
from tcjepa.accumulate import split_micro_batches, step_count
from tcjepa.checkpoint import load_final_state
from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.distributed import free_port
from tcjepa.masks import sample_masks
from tcjepa.train import check_batch_split, deepspeed_config, train
from tests.test_distributed import DRIVER, SMALL as DRIVER_SMALL, _losses, _run
from tests.test_train import SMALL, records

ROOT = project_root()
RECIPES = {"ijepa": "ijepa_quickstart", "tcjepa": "tcjepa_quickstart", "mae": "salt_stage1_quickstart",
           "clip": "clip_quickstart"}


def _cfg(method: str, shards, *extra: str):
    return load_config(ROOT / f"recipes/{RECIPES[method]}.yaml",
                       [f"data.train={shards}", *SMALL, "train.steps=3", "checkpoint.every=0", "optim.lr=3e-3",
                        "optim.start_lr=3e-3", *extra])


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_micro_batches_are_slices_of_the_one_draw():
    g = torch.Generator().manual_seed(0)
    masks = sample_masks(8, (8, 8), g, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                         context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0), min_context=10, policy="pad")
    images = torch.randn(8, 3, 64, 64)
    tokens = Tokens(torch.arange(8 * 5).view(8, 5), torch.ones(8, 5, dtype=torch.bool), torch.arange(8) % 2 == 0)
    parts = split_micro_batches(images, masks, tokens, 4)
    assert len(parts) == 4
    for k, p in enumerate(parts):
        rows = slice(2 * k, 2 * k + 2)
        assert torch.equal(p.images, images[rows]) and torch.equal(p.tokens.ids, tokens.ids[rows])
        assert torch.equal(p.tokens.has_text, tokens.has_text[rows])
        nc, nt = p.masks.context_idx.size(1), p.masks.target_idx.size(2)
        assert nc == masks.context_valid[rows].sum(1).max() and nt == masks.target_valid[rows].sum(2).max()
        assert torch.equal(p.masks.context_idx, masks.context_idx[rows, :nc])  # only padding is cut off
        assert not masks.context_valid[rows, nc:].any() and not masks.target_valid[rows, :, nt:].any()
        assert torch.equal(p.masks.target_idx, masks.target_idx[rows, :, :nt])
        assert torch.equal(p.masks.target_valid, masks.target_valid[rows, :, :nt])
        assert p.masks.padded == masks.padded  # the batch's flag, even if a slice needs no padding
    assert any(p.masks.context_idx.size(1) < masks.context_idx.size(1) for p in parts)
    assert split_micro_batches(images, None, None, 1)[0].images is images
    with pytest.raises(ValueError, match="a batch of 8 does not split into 3 micro-batches"):
        split_micro_batches(images, masks, tokens, 3)
    valid = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    assert step_count(valid, 2).item() == 2.5  # 5 real entries over 2 micro-batches


def test_batch_split_and_deepspeed_settings():
    cfg = load_config(ROOT / "recipes/ijepa_quickstart.yaml", ["train.batch_size=64", "train.grad_accum_steps=4"])
    ds = deepspeed_config(cfg, 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    check_batch_split(cfg, 2)
    with pytest.raises(ConfigError, match=r"train.batch_size 64 is not divisible by the world size 3 x train.grad_accum_steps 4"):
        check_batch_split(cfg, 3)
    with pytest.raises(ConfigError, match="train.grad_accum_steps.*must be >= 1"):
        load_config(ROOT / "recipes/ijepa_quickstart.yaml", ["train.grad_accum_steps=0"])
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps.*must divide train.batch_size \(64\), got 3"):
        load_config(ROOT / "recipes/ijepa_quickstart.yaml", ["train.batch_size=64", "train.grad_accum_steps=3"])


@pytest.fixture(scope="module")
def one_step_refs(shards64, tmp_path_factory) -> dict[str, dict]:
    """Each method's 3 steps of batch 16 without accumulation (ZeRO 0): losses and weights."""
    out = {}
    for method in RECIPES:
        run = train(_cfg(method, shards64, "deepspeed.zero_stage=0"), tmp_path_factory.mktemp("ref") / method,
                    progress=False)
        out[method] = {"losses": [r["loss"] for r in records(run)], "weights": load_final_state(run)}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("method", list(RECIPES))
def test_four_micro_batches_of_four_are_one_batch_of_sixteen(method, stage, one_step_refs, shards64, tmp_path):
    """Padded masks give micro-batches different target counts, TC-JEPA's captions different pair
    counts, CLIP's loss needs the whole batch: each is exact (tcjepa.accumulate)."""
    run = train(_cfg(method, shards64, f"deepspeed.zero_stage={stage}", "train.grad_accum_steps=4"),
                tmp_path / "run", progress=False)
    ref = one_step_refs[method]
    assert [r["loss"] for r in records(run)] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert _worst(ref["weights"], load_final_state(run)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method, stage", [("ijepa", 3), ("tcjepa", 2), ("mae", 0), ("clip", 2)])
def test_two_processes_accumulating_reproduce_one_process(method, stage, tmp_path):
    """2 ranks x 2 micro-batches of 2 against one process's batch of 8, on the driver's global
    batches (tests/dist_driver.py; it draws masks for the global batch, not caption dropout, which
    is off here)."""
    recipe = str(ROOT / f"recipes/{RECIPES[method]}.yaml")
    ref, run = tmp_path / "ref", tmp_path / "run"
    settings = [*DRIVER_SMALL, "conditioner.caption_dropout=0"]
    _run([sys.executable, DRIVER, recipe, str(ref), *settings])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
          DRIVER, recipe, str(run), *settings, f"deepspeed.zero_stage={stage}", "train.grad_accum_steps=2"])
    assert _losses(run) == pytest.approx(_losses(ref), rel=1e-5, abs=1e-6)
    assert _worst(load_final_state(ref), load_final_state(run)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_non_finite_micro_batch_skips_its_whole_step(stage, shards64, tmp_path, monkeypatch):
    """Whether the second step's first or third micro-batch is poisoned, the step is skipped and
    the runs end with the same weights: gradients of micro-batches already accumulated are
    dropped, and DeepSpeed's next boundary is still the next step's last micro-batch."""
    from tcjepa.methods.jepa import JEPA

    real = JEPA.micro_losses
    finals = []
    for bad_micro in (0, 2):
        steps = {"n": 0}

        def poisoned(self, *args, **kwargs):
            steps["n"] += 1
            for i, (loss, extra) in enumerate(real(self, *args, **kwargs)):
                yield (loss * float("nan") if (steps["n"], i) == (2, bad_micro) else loss), extra

        monkeypatch.setattr(JEPA, "micro_losses", poisoned)
        with pytest.warns(UserWarning, match="step 2: non-finite loss or gradient; step skipped"):
            run = train(_cfg("ijepa", shards64, f"deepspeed.zero_stage={stage}", "train.grad_accum_steps=4"),
                        tmp_path / f"bad{bad_micro}", progress=False)
        recs = records(run)
        assert [r["bad_steps"] for r in recs] == [0, 1, 1] and recs[1]["loss"] is None
        finals.append(load_final_state(run))
    assert _worst(*finals) < 1e-6
