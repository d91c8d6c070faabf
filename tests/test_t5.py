"""The TC-JEPA paper's text encoder: a frozen T5 (encoder stack only) read from a local directory
with its SentencePiece tokenizer; a tiny random one stands in for t5-base."""

import json

import pytest
import torch

from tcjepa.config import ConfigError, load_config, project_root
from tests.conftest import write_t5_model, write_text_tower_package

RECIPE = project_root() / "recipes/tcjepa_quickstart.yaml"
SMALL = ["model.encoder=vit_micro_8", "model.depth=1", "model.predictor_depth=2", "model.predictor_width=32",
         "model.predictor_heads=4", "conditioner.context_length=12"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_t5_model(tmp_path_factory.mktemp("t5"))


def t5_config(path, *extra):
    return load_config(RECIPE, [*SMALL, "conditioner.text_encoder=t5", f"conditioner.text_path={path}", *extra])


def test_a_t5_path_is_checked_before_training(t5_dir, tmp_path, monkeypatch):
    cfg = t5_config(t5_dir)
    assert cfg.conditioner.text_encoder == "t5"
    with pytest.raises(ConfigError, match="conditioner.text_path must be a local Hugging Face model directory"):
        t5_config(tmp_path / "missing")
    monkeypatch.syspath_prepend(str(tmp_path))
    bert = write_text_tower_package(tmp_path)
    with pytest.raises(ConfigError, match=r"must hold a T5 model for text_encoder t5 \(its config.json model_type is 'bert'\)"):
        t5_config(bert)
    # an hf path holding a T5 is read as T5 too (the encoder stack, not the whole seq2seq model)
    from tcjepa.methods.jepa import build_student

    student = build_student(load_config(RECIPE, [*SMALL, "conditioner.text_encoder=hf", f"conditioner.text_path={t5_dir}"]))
    assert type(student.text.encoder.model).__name__ == "T5EncoderModel"


def test_no_gradient_reaches_the_frozen_t5(t5_dir):
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA

    method = JEPA(t5_config(t5_dir))
    t5 = method.model.text.encoder
    assert t5.frozen and not any(p.requires_grad for p in t5.parameters())
    gen = torch.Generator().manual_seed(0)
    size = method.cfg.model.image_size
    images = torch.randn(2, 3, size, size, generator=gen)
    masks = sample_masks(2, method.model.encoder.grid, gen, **vars(method.cfg.mask))
    tokens = method.text_inputs([["a red circle", "a star"], ["two blue squares"]], gen)
    assert method.cfg.conditioner.max_captions > 2  # the slots no image fills are trimmed: 2, the most captions here
    assert tokens.ids.shape[:2] == (2, 2) and tokens.ids[0, 0, -1] == 0  # T5 pads with 0
    method.model(images, masks, method.targets(images, masks), tokens).backward()
    assert all(p.grad is None for p in t5.parameters())
    assert method.model.text.proj.weight.grad.abs().sum() > 0
    assert all(c.k.weight.grad.abs().sum() > 0 for c in method.model.predictor.conditioners.values())


@pytest.mark.slow
def test_train_through_a_frozen_t5_leaves_it_unchanged(t5_dir, tmp_path):
    from safetensors.torch import load_file

    from data_pipelines.synthetic import write_synthetic_shards
    from tcjepa.checkpoint import load_final_state
    from tcjepa.train import train

    write_synthetic_shards(tmp_path / "data", samples=16, captions_per_image=3)
    cfg = t5_config(t5_dir, f"data.train={tmp_path / 'data'}", "train.steps=2", "train.batch_size=8",
                    "data.workers=0", "data.shuffle_buffer=8", "checkpoint.every=0", "train.log_every=1")
    run = train(cfg, tmp_path / "run", progress=False)
    state = load_final_state(run)
    original = load_file(str(t5_dir / "model.safetensors"))
    mine = {k.removeprefix("text.encoder.model."): v for k, v in state.items() if k.startswith("text.encoder.model.")}
    shared = [k for k in original if k in mine]
    assert shared and all(torch.equal(mine[k], original[k]) for k in shared)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("cond_sparse" in r for r in recs)
