import math

import pytest
import torch

from tcjepa.methods.jepa import ema_update, masked_smooth_l1
from tcjepa.models.predictor import Predictor
from tcjepa.models.vit import build_encoder, parse_encoder_name, sincos_pos_embed_2d


def test_parse_encoder_name():
    a = parse_encoder_name("vit_huge_14")
    assert (a.width, a.depth, a.num_heads, a.patch_size) == (1280, 32, 16, 14)
    assert parse_encoder_name("vit_small_16", depth=3).depth == 3
    with pytest.raises(ValueError, match="vit_tiny_16"):
        parse_encoder_name("resnet50")


def test_official_parameter_names():
    keys = set(build_encoder("vit_micro_8", 32).state_dict())
    for k in ["patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.bias"]:
        assert k in keys
    assert "pos_embed" not in keys  # fixed sin-cos: derived, not stored


def test_sincos_layout():
    pe = sincos_pos_embed_2d(8, 3, 4)
    assert pe.shape == (12, 8)
    # patch (row 1, col 2): first half encodes x=2, second half y=1; omega = [1, 1/100]
    row = pe[1 * 4 + 2]
    assert torch.allclose(row[:4], torch.tensor([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]), atol=1e-6)
    assert torch.allclose(row[4:], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]), atol=1e-6)


def test_encoder_shapes_and_context_gather():
    torch.manual_seed(0)
    enc = build_encoder("vit_micro_8", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    full = enc(x)
    assert full.shape == (2, 16, 96)
    idx = torch.arange(16).expand(2, 16)
    assert torch.allclose(enc(x, idx), full, atol=1e-5)


def test_encoder_padding_is_invisible():
    """Padded context entries (valid=False) must not change the real tokens' outputs."""
    torch.manual_seed(0)
    enc = build_encoder("vit_micro_8", 32).eval()
    x = torch.randn(1, 3, 32, 32)
    idx = torch.tensor([[0, 3, 5, 9, 12]])
    ref = enc(x, idx)
    padded_idx = torch.tensor([[0, 3, 5, 9, 12, 0, 0]])
    valid = torch.tensor([[True] * 5 + [False] * 2])
    out = enc(x, padded_idx, valid)
    assert torch.allclose(out[:, :5], ref, atol=1e-5)


def test_init_matches_ijepa():
    torch.manual_seed(0)
    enc = build_encoder("vit_small_16", 224)
    qkv = enc.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(0.02, rel=0.05)
    assert qkv.mean().abs().item() < 1e-3
    assert enc.blocks[0].attn.qkv.bias.abs().sum() == 0
    for layer in (1, 4, 12):
        proj = enc.blocks[layer - 1].attn.proj.weight
        assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * layer), rel=0.05)
    assert torch.all(enc.norm.weight == 1)


def test_predictor_shapes_and_padding():
    torch.manual_seed(0)
    pred = Predictor(embed_dim=96, grid=(4, 4), width=48, depth=2, num_heads=3).eval()
    ctx = torch.randn(2, 5, 96)
    ctx_idx = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    tgt_idx = torch.tensor([[[10, 11], [12, 13], [14, 15]], [[0, 1], [2, 3], [4, 11]]])
    out = pred(ctx, ctx_idx, tgt_idx)
    assert out.shape == (2, 3, 2, 96)
    # same sample with an extra padded context token and a padded target slot
    ctx_p = torch.cat([ctx[:1], torch.randn(1, 1, 96)], 1)
    ctx_idx_p = torch.tensor([[0, 1, 2, 3, 4, 0]])
    cv = torch.tensor([[True] * 5 + [False]])
    tgt_p = torch.tensor([[[10, 11, 0], [12, 13, 0], [14, 15, 0]]])
    tv = torch.tensor([[[True, True, False]] * 3])
    out_p = pred(ctx_p, ctx_idx_p, tgt_p, cv, tv)
    assert torch.allclose(out_p[0, :, :2], out[0], atol=1e-5)


def test_masked_smooth_l1_ignores_padding():
    pred = torch.zeros(1, 1, 3, 4)
    target = torch.ones(1, 1, 3, 4)
    target[0, 0, 2] = 100.0  # a padded slot with a huge error
    valid = torch.tensor([[[True, True, False]]])
    assert masked_smooth_l1(pred, target, valid).item() == pytest.approx(0.5)
    assert masked_smooth_l1(pred, torch.ones_like(pred), None).item() == pytest.approx(0.5)


def test_ema_update():
    teacher = torch.nn.Linear(3, 2)
    student = torch.nn.Linear(3, 2)
    t0 = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.9 * t_old + 0.1 * s)
    ema_update(teacher, student, 1.0)  # momentum 1 freezes the teacher
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_packing_roundtrip_keeps_real_tokens_only():
    from tcjepa.models.vit import Packing

    valid = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    p = Packing(valid)
    packed = p.pack(x)
    assert packed.shape == (3, 3)
    assert torch.equal(packed, torch.stack([x[0, 0], x[0, 1], x[1, 0]]))
    back = p.unpack(packed)
    assert torch.equal(back[valid], x[valid]) and torch.all(back[~valid] == 0)


def test_attention_backends_leave_out_cudnn():
    """cuDNN attention made the H200 step 1.74x slower (benchmarks/RESULTS.md): keep it out."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from tcjepa.models.vit import CUDA_SDPA_BACKENDS, attention

    assert SDPBackend.CUDNN_ATTENTION not in CUDA_SDPA_BACKENDS
    assert CUDA_SDPA_BACKENDS[0] == SDPBackend.FLASH_ATTENTION
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = torch.tensor([True, True, True, False, False]).view(1, 1, 1, 5)
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_activation_checkpointing_same_gradients_less_saved_memory():
    """``model.activation_checkpointing``: the same loss and gradients, and what autograd keeps
    between forward and backward shrinks to the blocks' inputs."""
    from tcjepa.config import load_config, project_root
    from tcjepa.masks import sample_masks
    from tcjepa.methods import build_method
    from tcjepa.models.vit import set_activation_checkpointing

    cfg = load_config(project_root() / "recipes/ijepa_quickstart.yaml",
                      ["model.encoder=vit_micro_8", "model.depth=3", "model.predictor_depth=2", "model.predictor_width=48"])
    images = torch.randn(4, 3, 64, 64)
    masks = sample_masks(4, (8, 8), torch.Generator().manual_seed(0), **cfg.mask.__dict__)

    def step(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        torch.manual_seed(0)
        method = build_method(cfg)
        assert set_activation_checkpointing(method.model, checkpointing) == 5  # 3 encoder + 2 predictor blocks
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = method.loss(method.model, images, masks)
        loss.backward()
        return loss.detach(), [p.grad for p in method.model.parameters()], sum(saved)

    loss, grads, plain = step(False)
    loss_c, grads_c, ckpt = step(True)
    assert torch.equal(loss, loss_c)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_c))
    assert ckpt < 0.35 * plain, (ckpt, plain)
