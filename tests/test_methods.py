"""Baseline methods through the one loop: SALT two-stage (MAE teacher -> frozen-teacher JEPA),
CLIP and SigLIP (open_clip's losses), Matryoshka embeddings; and their evaluations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tcjepa.checkpoint import load_dual_encoder, load_encoder, load_final_state, load_run_config
from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.distributed import free_port
from tcjepa.methods.contrastive import MatryoshkaLoss, build_loss, pool_text
from tcjepa.methods.mae import patchify, pixel_targets, unpatchify
from tcjepa.train import train
from tests.eval_runs import write_colour_shards

ROOT = project_root()
SMALL = ["model.encoder=vit_micro_8", "model.depth=2", "model.predictor_depth=1", "model.predictor_width=48",
         "train.batch_size=16", "train.log_every=1", "data.workers=0", "data.shuffle_buffer=50",
         "optim.warmup_steps=2", "checkpoint.every=0"]
TEXT = ["conditioner.text_width=32", "conditioner.text_depth=1", "conditioner.context_length=16",
        "contrastive.embed_dim=32"]


def records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]


def recipe_cfg(name: str, shards: Path, *extra: str):
    return load_config(ROOT / f"recipes/{name}_quickstart.yaml", [f"data.train={shards}", *SMALL, *extra])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_colour_shards(tmp_path_factory.mktemp("colours") / "train", 96)


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory) -> Path:
    return train(recipe_cfg("salt_stage1", shards, "train.steps=6"), tmp_path_factory.mktemp("s1") / "run",
                 progress=False)


@pytest.fixture(scope="module")
def clip_run(shards, tmp_path_factory) -> Path:
    cfg = recipe_cfg("clip_matryoshka", shards, "train.steps=40", "contrastive.matryoshka_dims=[8,16]", *TEXT)
    return train(cfg, tmp_path_factory.mktemp("clip") / "run", progress=False)


# ----------------------------------------------------------------------------- SALT stage 1 (MAE)


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (2, 3)), x)
    # patch 4 (row 1, column 1) is the pixels x[:, :, 8:16, 8:16], channels last
    assert torch.equal(p[:, 4].view(2, 8, 8, 3), x[:, :, 8:16, 8:16].permute(0, 2, 3, 1))


def test_pixel_targets_are_normalised_per_patch():
    x = torch.rand(2, 3, 16, 16) * 5 + 3
    idx = torch.tensor([[[0, 3]], [[1, 2]]])  # [B, T=1, Nt=2]
    t = pixel_targets(x, idx, 8, norm_pix=True)
    assert t.shape == (2, 1, 2, 192)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 1, 2), atol=1e-5)
    assert torch.allclose(t.std(-1), torch.ones(2, 1, 2), atol=1e-3)
    raw = pixel_targets(x, idx, 8, norm_pix=False)
    assert torch.equal(raw[1, 0, 0], patchify(x, 8)[1, 1])


@pytest.mark.slow
def test_stage1_trains_pixel_reconstruction(stage1):
    recs = records(stage1)
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert "feature_rankme" in recs[-1] and "momentum" not in recs[-1]  # no teacher, no EMA
    state = load_final_state(stage1)
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
    assert state["decoder.predictor_proj.weight"].shape[0] == 8 * 8 * 3  # predicts patch pixels
    assert load_run_config(stage1).train.method == "mae"


# ----------------------------------------------------------------------------- SALT stage 2 (frozen teacher)


@pytest.mark.slow
def test_stage2_teacher_stays_frozen_and_may_be_smaller(stage1, shards, tmp_path):
    """A bigger student (ViT-tiny width 192) learns the frozen micro teacher's (width 96) latents:
    the teacher's weights end bit-identical to stage 1's encoder, and it never gets a gradient."""
    from tcjepa.methods import build_method

    cfg = recipe_cfg("salt_stage2", shards, "train.steps=4", f"teacher.checkpoint={stage1}",
                     "model.encoder=vit_tiny_8", "model.depth=1")
    run = train(cfg, tmp_path / "s2", progress=False)
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and "momentum" not in recs[-1]
    final, teacher = load_final_state(run), load_final_state(stage1)
    frozen = {k[len("teacher."):]: v for k, v in final.items() if k.startswith("teacher.")}
    assert frozen.keys() == {k[len("encoder."):] for k in teacher if k.startswith("encoder.")}
    assert all(torch.equal(v, teacher["encoder." + k]) for k, v in frozen.items())
    assert final["encoder.norm.weight"].shape == (192,) and final["predictor.predictor_proj.weight"].shape == (96, 48)
    # eval uses the student for a frozen-teacher run
    assert load_encoder(run).embed_dim == 192

    method = build_method(cfg)  # one step by hand: no gradient reaches the teacher
    images = torch.randn(4, 3, 64, 64)
    from tcjepa.masks import sample_masks

    masks = sample_masks(4, method.model.encoder.grid, torch.Generator().manual_seed(0),
                         **{k: getattr(cfg.mask, k) for k in cfg.mask.__dataclass_fields__})
    loss, _ = method.loss(method.model, images, masks)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.model.encoder.parameters())


@pytest.mark.slow
def test_stage2_pins_its_teacher(stage1, shards, tmp_path):
    """A frozen-teacher run records its teacher's sha256; checkpoints hold the teacher by that
    reference, not a copy; the resumed run's teacher is bit-identical; a teacher whose weights
    changed in place is an error naming both digests, before anything trains."""
    import hashlib
    import shutil

    from tcjepa.checkpoint import load_encoder
    from tcjepa.config import load_config as load
    from tcjepa.resume import list_checkpoints

    teacher_dir = shutil.copytree(stage1, tmp_path / "teacher")
    weights = teacher_dir / "final" / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = recipe_cfg("salt_stage2", shards, "train.steps=4", "checkpoint.every=2", f"teacher.checkpoint={teacher_dir}")
    run = train(cfg, tmp_path / "s2", progress=False, stop_at=2)
    assert load(run / "config.yaml").teacher.sha256 == digest
    states = torch.load(next(list_checkpoints(run)[-1].glob("*model_states.pt")), weights_only=False)
    assert states["step"] == 2 and states["teacher"] == {}  # our client state: the teacher by reference only
    train(cfg, run, resume=True, progress=False)  # the recipe's config has no digest: the run's own is used
    resumed = {k[len("teacher."):]: v for k, v in load_final_state(run).items() if k.startswith("teacher.")}
    original = load_encoder(stage1).state_dict()
    assert resumed.keys() == original.keys() and all(torch.equal(resumed[k], original[k]) for k in original)

    other = train(cfg, tmp_path / "s2b", progress=False, stop_at=2)
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    key = next(k for k in state if k.startswith("encoder."))
    state[key] = state[key] + 1e-3  # the teacher retrained in place
    save_file(state, str(weights))
    with pytest.raises(ConfigError, match=rf"weights in .*teacher/final/model.safetensors changed since this run "
                                          rf"pinned them \(sha256 {digest}, now [0-9a-f]{{64}}\)"):
        train(cfg, other, resume=True, progress=False)


def test_stage2_needs_a_finished_teacher_run(shards, tmp_path, capsys):
    from tcjepa.cli import main

    cfg = recipe_cfg("salt_stage2", shards, f"teacher.checkpoint={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="teacher.checkpoint: .*missing is not a finished run"):
        train(cfg, tmp_path / "s2", progress=False)
    assert not (tmp_path / "s2" / "metrics.jsonl").exists()
    rc = main(["train", str(ROOT / "recipes/salt_stage2_quickstart.yaml"), "--data", str(shards), "--out",
               str(tmp_path / "cli"), "--set", f"teacher.checkpoint={tmp_path / 'nope'}"])
    assert rc == 2 and "error: teacher.checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="teacher.checkpoint must name a run directory"):
        recipe_cfg("salt_stage2", shards, "teacher.checkpoint=")


@pytest.mark.slow
def test_stage2_rejects_a_teacher_with_another_patch_grid(stage1, shards, tmp_path):
    cfg = recipe_cfg("salt_stage2", shards, f"teacher.checkpoint={stage1}", "model.encoder=vit_micro_16")
    with pytest.raises(ConfigError, match="8 px patches.*16 px patches"):
        train(cfg, tmp_path / "s2", progress=False)


# ----------------------------------------------------------------------------- contrastive losses


def _manual_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _manual_siglip(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T + bias
    labels = 2 * torch.eye(len(img)) - 1
    return -F.logsigmoid(labels * logits).sum() / len(img)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_contrastive_loss_matches_open_clip_and_the_formula(loss):
    from open_clip.loss import ClipLoss, SigLipLoss

    cfg = load_config(ROOT / f"recipes/{loss}_quickstart.yaml", ["contrastive.embed_dim=24"])
    criterion = build_loss(cfg, rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 24, generator=g), torch.randn(6, 24, generator=g)
    scale, bias = torch.tensor([12.0]), torch.tensor([-3.0])
    ours, per_dim = criterion(img, txt, scale, bias if loss == "siglip" else None)
    a, b = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    if loss == "clip":
        ref = ClipLoss()(a, b, scale)
        manual = _manual_clip(img, txt, 12.0)
    else:
        ref = SigLipLoss()(a, b, scale, bias)
        manual = _manual_siglip(img, txt, 12.0, -3.0)
    assert list(per_dim) == [24]
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(ours, manual, atol=1e-5)


def test_matryoshka_loss_is_the_mean_over_every_prefix():
    cfg = load_config(ROOT / "recipes/clip_matryoshka_quickstart.yaml", [])
    criterion = build_loss(cfg, 0, 1)
    assert criterion.dims == [16, 32, 64, 128]
    img = torch.randn(8, 128, requires_grad=True)
    txt = torch.randn(8, 128)
    loss, per_dim = criterion(img, txt, torch.tensor([10.0]), None)
    for d in (16, 32, 64, 128):
        assert torch.allclose(per_dim[d], _manual_clip(img[:, :d].detach(), txt[:, :d], 10.0), atol=1e-5)
    assert torch.allclose(loss, torch.stack(list(per_dim.values())).mean())
    loss.backward()  # the first 16 channels get gradient from all four prefixes, the last 64 from one
    only_full = MatryoshkaLoss(criterion.loss, [128])
    img2 = img.detach().clone().requires_grad_(True)
    only_full(img2, txt, torch.tensor([10.0]), None)[0].backward()
    assert not torch.allclose(img.grad[:, :16], img2.grad[:, :16] / 4)
    assert torch.allclose(img.grad[:, 64:], img2.grad[:, 64:] / 4, atol=1e-6)


def test_text_pooling_mean_or_last_real_token():
    h = torch.arange(12.0).view(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    mean = pool_text(h, mask, causal=False)
    assert torch.equal(mean[0], h[0, :2].mean(0)) and torch.equal(mean[1], h[1].mean(0))
    last = pool_text(h, mask, causal=True)
    assert torch.equal(last[0], h[0, 1]) and torch.equal(last[1], h[1, 3])
    # a mask with holes: EOT is still the last real token, not the (sum - 1)-th
    holed = torch.tensor([[True, False, True, False], [True, True, False, True]])
    last = pool_text(h, holed, causal=True)
    assert torch.equal(last[0], h[0, 2]) and torch.equal(last[1], h[1, 3])


# ----------------------------------------------------------------------------- contrastive training


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_logit_scale_is_clamped_on_the_master_weights(stage, shards, tmp_path):
    """Initialised above ln(100), the scale is clamped after the first step: under ZeRO-2 the
    clamp must reach the optimiser's fp32 partition, or the next step would undo it; under ZeRO-3
    the partitioned working copy too."""
    cfg = recipe_cfg("clip", shards, "train.steps=3", f"deepspeed.zero_stage={stage}", "contrastive.init_logit_scale=6.0",
                     *TEXT)
    recs = records(train(cfg, tmp_path / "run", progress=False))
    assert recs[0]["logit_scale"] == pytest.approx(math.exp(6.0), rel=1e-5)
    assert recs[1]["logit_scale"] == pytest.approx(100.0, rel=1e-4)
    assert recs[2]["logit_scale"] <= 100.0 + 1e-3


@pytest.mark.slow
def test_clip_run_learns_and_writes_its_towers(clip_run):
    recs = records(clip_run)
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"]
    assert {"loss_d8", "loss_d16", "loss_d32", "logit_scale", "feature_rankme"} <= set(recs[-1])
    state = load_final_state(clip_run)
    assert {k.split(".")[0] for k in state} == {"encoder", "text", "head"}
    model, cfg = load_dual_encoder(clip_run)
    assert model.head.image_proj.out_features == 32
    assert load_encoder(clip_run).embed_dim == 96  # the image tower, for probes
    with pytest.raises(ConfigError, match="a contrastive run has no JEPA predictor"):
        from tcjepa.checkpoint import load_student

        load_student(clip_run)


@pytest.mark.slow
def test_zeroshot_of_a_contrastive_model_matches_a_manual_computation(clip_run, shards, tmp_path):
    from data_pipelines.loader import normalize
    from tcjepa.eval.common import read_split
    from tcjepa.eval.tasks import run_eval
    from tcjepa.methods.jepa import build_tokenizer_for

    result = run_eval("zeroshot", clip_run, str(shards), overrides=['zeroshot.templates=["a {} square."]'],
                      progress=False)
    m = result["metrics"]
    model, cfg = load_dual_encoder(clip_run)
    tok = build_tokenizer_for(cfg)
    split = read_split(str(shards), 64, "--data", 0, 0.05)
    labels = torch.tensor([meta["label"] for meta in split.metas])
    with torch.no_grad():
        img = model.encode_image(normalize(split.images))
        txt = model.encode_text(tok([f"a {n} square." for n in m["class_names"]]))

    def top1_at(d: int) -> float:
        s = F.normalize(img[:, :d], dim=-1) @ F.normalize(txt[:, :d], dim=-1).T
        return (s.argmax(1) == labels).float().mean().item()

    top1, per_dim = top1_at(32), {str(d): top1_at(d) for d in (8, 16)}
    assert m["scorer"] == "contrastive" and m["num_samples"] == 96
    assert m["top1"] == pytest.approx(top1, abs=1e-9)
    assert m["top1"] > 0.9  # the colour is the caption: a trained CLIP gets it
    assert set(m["per_dim"]) == {"8", "16", "32"} and m["per_dim"]["32"]["top1"] == m["top1"]
    for d, v in per_dim.items():
        assert m["per_dim"][d]["top1"] == pytest.approx(v, abs=1e-9)
    assert (clip_run / "eval" / "zeroshot.json").is_file()


@pytest.mark.slow
def test_retrieval_and_probe_of_a_contrastive_run(clip_run, shards, tmp_path):
    from tcjepa.eval.tasks import format_result, run_eval

    r = run_eval("retrieval", clip_run, str(shards), overrides=["retrieval.block_size=16", "retrieval.max_samples=48"],
                 progress=False)
    m = r["metrics"]
    assert m["scorer"] == "contrastive" and m["num_blocks"] == 3
    assert set(m["per_dim"]) == {"8", "16", "32"}
    assert 0 <= m["image_to_text_r1"] <= m["image_to_text_r5"] <= m["image_to_text_r10"] <= 1
    assert "first 8 dims" in format_result(r)
    val = write_colour_shards(tmp_path / "val", 48, start=1000)
    p = run_eval("probe", clip_run, str(shards), str(val), overrides=["probe.labels=[label]", "probe.epochs=20"],
                 progress=False)
    assert p["metrics"]["top1"] > 0.9
    assert set(p["metrics"]["per_dim"]) == {"8", "16", "32"}
    assert all(v["top1"] > 0.9 for v in p["metrics"]["per_dim"].values())


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("override, message", [
    (["train.method=byol"], "train.method must be one of: jepa, mae, contrastive"),
    (["contrastive.loss=infonce"], "contrastive.loss must be clip or siglip"),
    (["contrastive.matryoshka_dims=[64, 32]"], "contrastive.matryoshka_dims must be increasing"),
    (["contrastive.matryoshka_dims=[256]"], "contrastive.matryoshka_dims must be increasing"),
    (["conditioner.enabled=true"], "conditions the JEPA predictor"),
])
def test_bad_method_settings_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "recipes/clip_quickstart.yaml", override)


def test_every_quickstart_recipe_shares_encoder_batch_and_steps():
    names = ["ijepa", "tcjepa", "salt_stage1", "salt_stage2", "clip", "siglip", "clip_matryoshka"]
    cfgs = [load_config(ROOT / f"recipes/{n}_quickstart.yaml") for n in names]
    for c in cfgs:
        assert (c.model.encoder, c.model.image_size, c.model.depth, c.train.batch_size, c.train.steps, c.train.seed) == \
            (cfgs[0].model.encoder, 64, 6, 64, 300, 0)
    assert [c.train.method for c in cfgs] == ["jepa", "jepa", "mae", "jepa", "contrastive", "contrastive", "contrastive"]
    assert cfgs[3].teacher.update == "frozen" and cfgs[3].teacher.checkpoint == "runs/salt_stage1_quickstart"


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("salt_stage1", []),
    ("salt_stage2", ["teacher.checkpoint=STAGE1"]),
    ("clip", TEXT),
    ("siglip", TEXT),
])
def test_two_process_torchrun(name, extra, stage1, shards, tmp_path):
    run = tmp_path / name
    extra = [e.replace("STAGE1", str(stage1)) for e in extra]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "tcjepa", "train", str(ROOT / f"recipes/{name}_quickstart.yaml"), "--data", str(shards), "--steps", "3",
           "--out", str(run), "--set", *SMALL, *extra, "deepspeed.zero_stage=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert (run / "final" / "model.safetensors").is_file()


def test_report_names_every_method():
    from tcjepa.config import to_dict
    from tcjepa.eval.report import method_name

    names = {n: method_name(to_dict(load_config(ROOT / f"recipes/{n}_quickstart.yaml")))
             for n in ("ijepa", "tcjepa", "salt_stage1", "salt_stage2", "clip", "siglip", "clip_matryoshka")}
    assert names == {"ijepa": "I-JEPA", "tcjepa": "TC-JEPA", "salt_stage1": "MAE (SALT stage 1)",
                     "salt_stage2": "I-JEPA (frozen teacher, SALT stage 2)", "clip": "CLIP", "siglip": "SigLIP",
                     "clip_matryoshka": "CLIP (Matryoshka)"}


@pytest.mark.slow
def test_report_shows_matryoshka_widths(clip_run, shards):
    from tcjepa.eval.report import read_run, render_markdown
    from tcjepa.eval.tasks import run_eval

    run_eval("zeroshot", clip_run, str(shards), progress=False, overrides=["zeroshot.class_names=[red, green, blue]"])
    info = read_run(clip_run)
    info.name = "clip"
    md = render_markdown([info])
    assert "| clip | CLIP (Matryoshka) |" in md
    assert "zeroshot label top-1, first 8 dims" in md and "zeroshot label top-1, first 16 dims" in md


def test_paper_scale_baseline_recipes_load():
    stage1 = load_config(ROOT / "recipes/salt_stage1_vitb16_in1k.yaml")
    stage2 = load_config(ROOT / "recipes/salt_stage2_vitl16_in1k.yaml")
    assert stage1.train.method == "mae" and stage2.teacher.update == "frozen"
    assert stage2.teacher.checkpoint == "runs/salt_stage1_vitb16_in1k" and stage2.model.encoder == "vit_large_16"
    for name, loss in (("clip", "clip"), ("siglip", "siglip")):
        c = load_config(ROOT / f"recipes/{name}_vitb16_cc12m.yaml")
        assert (c.train.method, c.contrastive.loss, c.conditioner.text_encoder, c.contrastive.embed_dim) == \
            ("contrastive", loss, "open_clip", 512)
