"""Checkpoints in and out: Hugging Face IJepaModel and LLaVA exports, official I-JEPA imports,
strict key checks and ZeRO-3 consolidation of the final weights. Tiny models throughout.

The official model is restated below from facebookresearch/ijepa ``src/models/vision_transformer.py``
and ``src/masks/utils.py`` (commit 52c1ae95): same module and parameter names, the same explicit
attention and numpy sin-cos embedding, wrapped as DistributedDataParallel wraps it (``module.``),
so the test does not need the official code base.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_pipelines.loader import normalize
from tcjepa.checkpoint import load_encoder, load_final_state, load_student, save_final
from tcjepa.cli import main
from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.export.hf import export_hf, export_llava
from tcjepa.export.ijepa_import import build_modules, convert, import_ijepa
from tcjepa.methods.jepa import build_student
from tcjepa.models.vit import build_encoder
from tests.eval_runs import write_colour_shards

RECIPE = project_root() / "recipes/ijepa_quickstart.yaml"
TINY = ["model.encoder=vit_micro_8", "model.depth=2", "model.image_size=32", "model.predictor_depth=1",
        "model.predictor_width=48", "mask.num_targets=2", "mask.min_context=4", "train.batch_size=4"]


# ----------------------------------------------------------------------------- fixtures


def perturb(module: nn.Module, seed: int) -> nn.Module:
    """Noise on every parameter: LayerNorms and biases leave their 1/0 initialisation, so a
    wrongly mapped norm or bias changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # not the official model's frozen pos_embed
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def write_run(run: Path, *extra: str) -> Path:
    """A finished run directory with random (perturbed) weights; the teacher differs from the student."""
    cfg = load_config(RECIPE, [*TINY, *extra])
    torch.manual_seed(0)
    student = perturb(build_student(cfg), 1)
    teacher = perturb(build_encoder(cfg.model.encoder, cfg.model.image_size, cfg.model.depth), 2)
    save_final(run, {"encoder": student.encoder, "predictor": student.predictor, "teacher": teacher}, cfg)
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run") / "run")


def images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Hugging Face IJepaModel


def test_hf_export_loads_without_key_warnings_and_matches_our_encoder(run_dir, tmp_path):
    from transformers import AutoImageProcessor, IJepaModel

    assert main(["export", "hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    model, info = IJepaModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.layer_norm_eps == 1e-6 and model.config.image_size == 32 and model.config.patch_size == 8
    ours = load_encoder(run_dir)  # auto: the EMA teacher
    x = images()
    with torch.no_grad():
        diff = (model.eval()(pixel_values=x).last_hidden_state - ours(x)).abs().max().item()
        assert diff <= 1e-4, diff
        assert (load_encoder(run_dir, "student")(x) - ours(x)).abs().max() > 1e-3  # it is the teacher that came out

    export_hf(run_dir, tmp_path / "student", which="student")
    student = IJepaModel.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        assert (student(pixel_values=x).last_hidden_state - load_encoder(run_dir, "student")(x)).abs().max() <= 1e-4

    # the image processor is our evaluation preprocessing: on an image of the model's size, bit for bit
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    got = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
    want = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    assert (got - want).abs().max() <= 1e-5
    assert processor(images=Image.fromarray(pixels[:, :20]), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_export_of_a_missing_run_is_an_error_line(tmp_path, capsys):
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_key_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import save_file

    run = write_run(tmp_path / "run")
    state = load_final_state(run)
    state.pop("teacher.blocks.1.mlp.fc2.bias")
    state["teacher.blocks.7.attn.qkv.weight"] = torch.zeros(1)
    state["teacher.norm.weight"] = torch.ones(5)
    save_file(state, str(run / "final" / "model.safetensors"))
    with pytest.raises(ConfigError) as e:
        load_encoder(run, "teacher")
    msg = str(e.value)
    assert "missing 1: blocks.1.mlp.fc2.bias" in msg and "unexpected 1: blocks.7.attn.qkv.weight" in msg
    assert "norm.weight (5,) (expected (96,))" in msg and str(run) in msg


# ----------------------------------------------------------------------------- LLaVA


def tiny_language_model(directory: Path) -> Path:
    """A one-layer Llama with a word-level tokenizer, saved as a local Hugging Face model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "a", "photo", "of", "red", "green", "square", "what", "is", "this", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_llava_export_builds_saves_reloads_and_generates(run_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    lm = tiny_language_model(tmp_path / "lm")
    out = tmp_path / "llava"
    assert main(["export", "llava", "--checkpoint", str(run_dir), "--out", str(out), "--language-model", str(lm)]) == 0
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.vision_config.model_type == "ijepa" and model.config.vision_feature_select_strategy == "full"
    assert model.config.vision_feature_layer == -1  # the default: the final, layer-normed output
    processor = LlavaProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    inputs = processor(images=image, text="<image> what is this ?", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 16  # every patch of the 4x4 grid
    generated = model.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4

    with torch.no_grad():  # the features LLaVA selects are our encoder's output, final LayerNorm included
        x = inputs["pixel_values"]
        selected = model.model.vision_tower(x, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        assert (selected - load_encoder(run_dir)(x)).abs().max() <= 1e-4
        assert model.model.get_image_features(x).pooler_output[0].shape == (16, 32)


def test_llava_export_feature_layer_selects_that_blocks_output(run_dir, tmp_path, capsys):
    """--feature-layer -2: LLaVA's projector reads the output of the block before the last (no
    norm), and the config and the image features say so; out of range is an error."""
    from transformers import LlavaForConditionalGeneration

    lm = tiny_language_model(tmp_path / "lm")
    out = tmp_path / "llava"
    argv = ["export", "llava", "--checkpoint", str(run_dir), "--out", str(out), "--language-model", str(lm)]
    assert main(argv + ["--feature-layer", "-2"]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.vision_feature_layer == -2
    encoder = load_encoder(run_dir)
    outputs = []
    hook = encoder.blocks[-2].register_forward_hook(lambda m, a, o: outputs.append(o))
    x = torch.randn(2, 3, encoder.image_size, encoder.image_size)
    with torch.no_grad():
        final = encoder(x)
        hook.remove()
        selected = model.model.vision_tower(x, output_hidden_states=True).hidden_states[-2]
        projected = model.model.get_image_features(x).pooler_output
    assert (selected - outputs[0]).abs().max() <= 1e-4 and (selected - final).abs().max() > 1e-2
    assert torch.allclose(projected[0], model.model.multi_modal_projector(outputs[0])[0], atol=1e-4)
    depth = len(encoder.blocks)
    assert main(argv + ["--feature-layer", str(-depth - 2)]) == 2
    assert f"the encoder has {depth} blocks, so its hidden states are -{depth + 1} .. {depth}" in capsys.readouterr().err


def test_llava_export_needs_a_tokenizer(run_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match="tokenizer"):
        export_llava(run_dir, tmp_path / "llava", tmp_path / "lm")
    with pytest.raises(ConfigError, match="no config.json"):
        export_llava(run_dir, tmp_path / "llava", tmp_path / "missing")


# ----------------------------------------------------------------------------- the official I-JEPA model, restated


def official_sincos(dim: int, grid: int) -> torch.Tensor:
    """get_2d_sincos_pos_embed: numpy, float64, (w, h) meshgrid, the first half of channels from grid[0]."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=float), np.arange(grid, dtype=float)), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], dim=0)


def repeat_interleave_batch(x: torch.Tensor, B: int, repeat: int) -> torch.Tensor:
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B:(i + 1) * B] for _ in range(repeat)], dim=0) for i in range(N)], dim=0)


class OMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class OBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1, self.attn = norm(dim), OAttention(dim, num_heads)
        self.norm2, self.mlp = norm(dim), OMLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class OViT(nn.Module):
    """VisionTransformer: pos_embed is a stored, frozen parameter."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = OPatchEmbed(patch, dim)
        self.pos_embed = nn.Parameter(official_sincos(dim, img // patch), requires_grad=False)
        self.blocks = nn.ModuleList(OBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, masks=None):
        x = self.patch_embed(x) + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class OPredictor(nn.Module):
    """VisionTransformerPredictor (vit_predictor: mlp_ratio 4 whatever the encoder's)."""

    def __init__(self, num_patches: int, embed_dim: int, width: int, depth: int, heads: int):
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, width, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.predictor_pos_embed = nn.Parameter(official_sincos(width, int(num_patches ** 0.5)), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(OBlock(width, heads, 4.0) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(width, eps=1e-6)
        self.predictor_proj = nn.Linear(width, embed_dim, bias=True)

    def forward(self, x, masks_x, masks):
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x = x + apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_x)
        _, N_ctxt, D = x.shape
        pos_embs = repeat_interleave_batch(apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks), B, len(masks_x))
        pred_tokens = self.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1) + pos_embs
        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x)[:, N_ctxt:])


class DDP(nn.Module):
    """State-dict naming of torch's DistributedDataParallel: ``module.`` + the wrapped names."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def official_checkpoint(path: Path, img: int = 32, patch: int = 8, dim: int = 192, depth: int = 2, heads: int = 3,
                        pred_width: int = 48, pred_depth: int = 2) -> dict:
    """What the official src/train.py saves, written with torch.save; returns the unwrapped modules."""
    torch.manual_seed(3)
    encoder = perturb(OViT(img, patch, dim, depth, heads), 4)
    target = perturb(OViT(img, patch, dim, depth, heads), 5)
    predictor = perturb(OPredictor((img // patch) ** 2, dim, pred_width, pred_depth, heads), 6)
    params = [p for m in (encoder, predictor) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    torch.save({
        "encoder": DDP(encoder).state_dict(), "predictor": DDP(predictor).state_dict(),
        "target_encoder": DDP(target).state_dict(), "opt": opt.state_dict(), "scaler": None,
        "epoch": 7, "loss": 0.25, "batch_size": 16, "world_size": 4, "lr": 0.002,
    }, path)
    return {"encoder": encoder.eval(), "target": target.eval(), "predictor": predictor.eval()}


def test_official_checkpoint_imports_with_equal_outputs(tmp_path):
    ckpt = tmp_path / "jepa-ep7.pth.tar"
    official = official_checkpoint(ckpt)
    run = tmp_path / "imported"
    assert main(["import", "ijepa", str(ckpt), "--out", str(run)]) == 0

    cfg = load_config(run / "config.yaml")
    assert (cfg.model.encoder, cfg.model.image_size, cfg.model.depth) == ("vit_tiny_8", 32, 2)
    assert (cfg.model.predictor_width, cfg.model.predictor_depth, cfg.train.batch_size, cfg.optim.lr) == (48, 2, 64, 0.002)
    record = json.loads((run / "import.json").read_text())
    assert record["epoch"] == 7 and record["not_imported"] == ["opt", "scaler"]

    x = images(4)
    g = torch.Generator().manual_seed(0)
    context = torch.stack([torch.randperm(16, generator=g)[:10].sort().values for _ in range(4)])
    targets = [torch.stack([torch.randperm(16, generator=g)[:3] for _ in range(4)]) for _ in range(2)]
    student, _ = load_student(run)
    with torch.no_grad():
        diffs = {
            "teacher": (load_encoder(run, "teacher")(x) - official["target"](x)).abs().max(),
            "student": (load_encoder(run, "student")(x) - official["encoder"](x)).abs().max(),
            "context": (student.encoder(x, context) - official["encoder"](x, [context])).abs().max(),
        }
        z = official["encoder"](x, [context])
        theirs = official["predictor"](z, [context], targets)  # [T * B, Nt, D], target-major
        ours = student.predictor(z, context, torch.stack(targets, 1))  # [B, T, Nt, D]
        diffs["predictor"] = (ours.transpose(0, 1).reshape(theirs.shape) - theirs).abs().max()
    assert all(d <= 1e-4 for d in diffs.values()), diffs


def test_imported_run_evaluates_and_continues_training(tmp_path):
    ckpt = tmp_path / "latest.pth.tar"
    official_checkpoint(ckpt, img=64, pred_width=48, pred_depth=1)
    run = import_ijepa(ckpt, tmp_path / "run")
    shards = write_colour_shards(tmp_path / "shards", 24, per_shard=12)
    val = write_colour_shards(tmp_path / "val", 12, start=100, per_shard=12)
    assert main(["eval", "probe", "--checkpoint", str(run), "--data", str(shards), "--val-data", str(val),
                 "--set", "probe.epochs=3"]) == 0
    probed = json.loads((run / "eval" / "probe.json").read_text())["metrics"]
    assert probed["top1"] > probed["majority_class"] + 0.2, probed  # solid colours: any encoder separates them

    from tcjepa.train import train

    imported = load_final_state(run)
    # lr 0 at step 0 (warmup from start_lr 0) and a momentum-1 teacher: one step must leave the imported weights
    cfg = load_config(run / "config.yaml", [
        f"data.train={shards}", "train.steps=1", "train.batch_size=4", "data.workers=0", "data.shuffle_buffer=10",
        "checkpoint.every=0", "train.log_every=1", "optim.start_lr=0", "optim.warmup_steps=5",
        "teacher.momentum=1.0", "teacher.final_momentum=1.0"])
    train(cfg, run, resume=True, progress=False)
    after = load_final_state(run)
    assert after.keys() == imported.keys()
    assert max((after[k] - imported[k]).abs().max().item() for k in after) <= 1e-6
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1

    other = load_config(run / "config.yaml", [f"data.train={shards}", "model.predictor_depth=2", "data.workers=0"])
    with pytest.raises(ConfigError, match="model.predictor_depth is 1 there, 2 here"):
        train(other, tmp_path / "run", resume=True, progress=False)


OFFICIAL_ARCHS = [  # name, width, depth, heads, mlp_ratio (facebookresearch/ijepa vit_tiny ... vit_giant)
    ("tiny", 192, 12, 3, 4.0), ("small", 384, 12, 6, 4.0), ("base", 768, 12, 12, 4.0),
    ("large", 1024, 24, 16, 4.0), ("huge", 1280, 32, 16, 4.0), ("giant", 1408, 40, 16, 48 / 11),
]


@pytest.mark.parametrize("name,width,depth,heads,mlp_ratio,patch,img",
                         [(*a, p, 224) for a in OFFICIAL_ARCHS for p in (14, 16)] + [(*OFFICIAL_ARCHS[4], 16, 448)])
def test_every_official_architecture_is_recognised_and_loads(name, width, depth, heads, mlp_ratio, patch, img):
    """Shapes only (meta tensors): each official architecture maps onto ours, key for key and shape
    for shape, including vit_giant's predictor, whose MLP ratio is 4 and not the encoder's 48/11."""
    grid = img // patch
    with torch.device("meta"):
        encoder = OViT(img, patch, width, depth, heads, mlp_ratio)
        predictor = OPredictor(grid * grid, width, 384, 12, heads)
    states = {k: DDP(m).state_dict() for k, m in (("encoder", encoder), ("target_encoder", encoder), ("predictor", predictor))}
    for key, dim in (("encoder", width), ("target_encoder", width)):
        states[key] = {**states[key], "module.pos_embed": official_sincos(dim, grid)}
    states["predictor"] = {**states["predictor"], "module.predictor_pos_embed": official_sincos(384, grid)}
    for arch in (None, f"vit_{name}" if patch == 14 else f"vit_{name}_{patch}"):
        cfg, ours = convert(states, arch, "ckpt")
        assert (cfg.model.encoder, cfg.model.image_size, cfg.model.depth) == (f"vit_{name}_{patch}", img, None)
        assert cfg.model.predictor_mlp_ratio == (4.0 if name == "giant" else None)
    modules = build_modules(cfg, ours, "ckpt")
    assert modules["predictor"].predictor_blocks[0].mlp.fc1.out_features == 1536
    wrong = "vit_small" if name != "small" else "vit_base"
    with pytest.raises(ConfigError, match=f"--arch {wrong}: width"):
        convert(states, wrong, "ckpt")


def test_import_refuses_pickled_objects_and_foreign_files(tmp_path, capsys):
    ckpt = tmp_path / "evil.pth.tar"
    torch.save({"encoder": {}, "predictor": {}, "target_encoder": {}, "note": Path("x")}, ckpt)
    with pytest.raises(ConfigError, match="refused to unpickle"):
        import_ijepa(ckpt, tmp_path / "run")
    torch.save({"model": {}}, tmp_path / "other.pt")
    assert main(["import", "ijepa", str(tmp_path / "other.pt"), "--out", str(tmp_path / "run")]) == 2
    assert "not a facebookresearch/ijepa training checkpoint: no encoder, predictor, target_encoder" in capsys.readouterr().err
    official_checkpoint(tmp_path / "ok.pth.tar")
    with pytest.raises(ConfigError, match="--arch vit_tiny_16: patch size 16"):
        import_ijepa(tmp_path / "ok.pth.tar", tmp_path / "run2", arch="vit_tiny_16")


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3


def test_zero3_final_weights_are_consolidated(tmp_path):
    """Under ZeRO-3 each rank holds a shard of every parameter (here: one process, the parameters
    themselves are empty placeholders); final/model.safetensors must hold the whole tensors."""
    import deepspeed

    from tcjepa.distributed import init_distributed
    from tcjepa.methods.jepa import JEPA, param_groups
    from tcjepa.train import _save_final, deepspeed_config

    cfg = load_config(RECIPE, [*TINY, "deepspeed.zero_stage=3"])
    info = init_distributed()
    torch.manual_seed(0)
    method = JEPA(cfg)
    perturb(method.model, 7)
    before = {f"{p}.{k}": v.clone() for p, m in (("encoder", method.model.encoder), ("predictor", method.model.predictor))
              for k, v in m.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(method.model), lr=0.0)
    engine, *_ = deepspeed.initialize(model=method.model, optimizer=optimizer, config=deepspeed_config(cfg, 1))
    assert engine.zero_optimization_partition_weights()
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned away
    _save_final(engine, method, tmp_path, cfg, info)
    final = load_final_state(tmp_path)
    for key, want in before.items():
        assert torch.equal(final[key], want), key
    assert {k for k in final if k.startswith("teacher.")} == {f"teacher.{k}" for k in method.teacher.state_dict()}
