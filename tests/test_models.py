import math

import pytest
import torch

from tcjepa.methods.jepa import ema_update, masked_smooth_l1
from tcjepa.models.predictor import Predictor
from tcjepa.models.vit import build_encoder, parse_encoder_name, run_blocks, sincos_pos_embed_2d


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


def test_encoder_last_blocks_are_each_blocks_normed_output():
    """``last_blocks`` n returns the final norm of each of the last n blocks' outputs (checked
    against hooks), the last of them the usual output, with padding as in the plain forward."""
    torch.manual_seed(0)
    enc = build_encoder("vit_micro_8", 32, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(enc.norm(out))) for b in enc.blocks]
    plain = enc(x)
    for h in hooks:
        h.remove()
    two = enc(x, last_blocks=2)
    assert two.shape == (2, 2, 16, 96)
    torch.testing.assert_close(two, torch.stack(seen[1:]))
    torch.testing.assert_close(two[-1], plain)
    idx, valid = torch.tensor([[0, 3, 5, 0], [1, 2, 4, 6]]), torch.tensor([[True, True, True, False], [True] * 4])
    padded = enc(x, idx, valid, last_blocks=2)
    torch.testing.assert_close(padded[:, 0, :3], enc(x[:1], idx[:1, :3], last_blocks=2)[:, 0])
    assert (padded[:, 0, 3] == 0).all()
    with pytest.raises(ValueError, match="last_blocks 4"):
        enc(x, last_blocks=4)
    tokens = torch.randn(2, 5, 96)  # no blocks at all (a text tower of depth 0): the norm alone
    torch.testing.assert_close(run_blocks(tokens, torch.nn.ModuleList(), enc.norm), enc.norm(tokens))


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
    from tcjepa.models.attention import Packing, whole_row_attention

    valid = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    with whole_row_attention():
        rows = Packing(valid)  # the [B, N] layout's order
    assert rows.groups is None and torch.equal(rows.pack(x), torch.stack([x[0, 0], x[0, 1], x[1, 0]]))
    grouped = Packing(valid)  # samples by ascending length
    assert torch.equal(grouped.pack(x), torch.stack([x[1, 0], x[0, 0], x[0, 1]]))
    for p in (rows, grouped):
        back = p.unpack(p.pack(x))
        assert torch.equal(back[valid], x[valid]) and torch.all(back[~valid] == 0)


def test_length_groups_and_layout():
    from tcjepa.models.attention import MIN_GROUP, Packing, grouped_layout, length_groups

    assert length_groups(MIN_GROUP * 2 - 1) == [(0, MIN_GROUP * 2 - 1)]  # too few for two groups
    groups = length_groups(100)
    assert len(groups) == 8 and groups[0][0] == 0 and groups[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert max(e - f for f, e in groups) - min(e - f for f, e in groups) <= 1
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (45,), generator=gen)
    valid = torch.arange(30)[None] < lengths[:, None]
    valid = valid[:, torch.randperm(30, generator=gen)]  # real tokens need not come first
    p = Packing(valid)
    positions, squares = grouped_layout(lengths.tolist())
    assert positions == sum(g.batch * g.length for g in p.groups) < 45 * 30
    assert squares == sum(g.batch * g.length**2 for g in p.groups)
    assert [g.length for g in p.groups] == sorted(g.length for g in p.groups)
    assert sum(g.end - g.start for g in p.groups) == int(valid.sum())
    assert all(g.attn_mask is not None for g in p.groups)
    same = Packing(torch.ones(40, 7, dtype=torch.bool))  # one length: one group, nothing to mask
    assert [(g.batch, g.length, g.attn_mask) for g in same.groups] == [(40, 7, None)]


def _grouped_vs_whole_rows(run):
    """``run()`` (a tuple of tensors) with grouped attention and with whole padded rows."""
    from tcjepa.models.attention import whole_row_attention

    grouped = run()
    with whole_row_attention():
        rows = run()
    for a, b in zip(grouped, rows):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _padded_encoder_predictor(lengths):
    """A float64 encoder + predictor step on context sequences of these lengths (16 patches, 2
    targets of up to 4): ``run()`` -> (context features, predictions, first qkv gradients of each),
    and the two models."""
    torch.manual_seed(0)
    B, N = len(lengths), 16
    enc = build_encoder("vit_micro_8", 32).double()
    pred = Predictor(embed_dim=96, grid=(4, 4), width=48, depth=2, num_heads=3).double()
    x = torch.randn(B, 3, 32, 32, dtype=torch.float64)
    idx = torch.stack([torch.randperm(N) for _ in range(B)])
    valid = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    tgt_idx = torch.randint(0, N, (B, 2, 4))
    tgt_valid = torch.rand(B, 2, 4) < 0.7
    tgt_valid[..., 0] = True

    def run():
        enc.zero_grad(), pred.zero_grad()
        z = enc(x, idx, valid)
        out = pred(z, idx, tgt_idx, valid, tgt_valid)
        (z.square().sum() + out[tgt_valid].square().sum()).backward()
        return z, out, enc.blocks[0].attn.qkv.weight.grad.clone(), pred.predictor_blocks[0].attn.qkv.weight.grad.clone()

    return run, enc, pred


@pytest.mark.parametrize("lengths", [[5, 16, 3, 9, 12, 7, 16, 4, 8, 11, 6, 13, 15, 10, 14, 3, 2, 9, 16, 5], [7], [9] * 20])
def test_grouped_attention_equals_whole_padded_rows(lengths, monkeypatch):
    """Attention over length groups (each padded to its own longest) gives the encoder's and the
    predictor's outputs and gradients of one batch padded to its longest row; the models take
    the grouped path."""
    from tcjepa.models.attention import Packing

    groups_seen = []
    padded = Packing.padded

    def spy(self, x, fn):
        groups_seen.append(len(self.groups or []))
        return padded(self, x, fn)

    monkeypatch.setattr(Packing, "padded", spy)
    run, _, _ = _padded_encoder_predictor(lengths)
    B = len(lengths)

    _grouped_vs_whole_rows(run)
    if B >= 16 and len(set(lengths)) > 1:
        assert max(groups_seen) > 1  # the encoder and the predictor ran grouped


def test_grouped_attention_skips_sequences_without_tokens():
    from tcjepa.models.attention import Packing
    from tcjepa.models.vit import Attention

    torch.manual_seed(0)
    attn = Attention(24, 3).double()
    lengths = torch.tensor([0, 3, 0, 6, 0, 0, 1, 0, 2, 0, 4, 0, 5, 0, 6, 0, 2])  # the shortest group: no tokens
    valid = torch.arange(6)[None] < lengths[:, None]
    x = torch.randn(*valid.shape, 24, dtype=torch.float64, requires_grad=True)

    def run():
        x.grad = None
        p = Packing(valid)
        out = p.unpack(attn(p.pack(x), p))  # the packed orders differ, the [B, N] layout does not
        out.square().sum().backward()
        return out, x.grad.clone()

    _grouped_vs_whole_rows(run)
    p = Packing(valid)
    assert len(p.groups) == 1 and p.groups[0].length == 6


def _reference_varlen(calls):
    """A stand-in for torch's CUDA-only varlen flash attention: SDPA per sequence of the packed
    tokens, checking the offsets it is given."""
    import torch.nn.functional as F

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k):
        bounds = cu_q.tolist()
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k
        assert bounds[0] == 0 and bounds[-1] == q.size(0) and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        calls.append(len(bounds) - 1)
        heads_first = [t.transpose(0, 1) for t in (q, k, v)]  # [H, T, d]
        return torch.cat([F.scaled_dot_product_attention(*(t[:, a:b] for t in heads_first)).transpose(0, 1)
                          for a, b in zip(bounds, bounds[1:])])

    return kernel


def test_varlen_attention_equals_length_groups(monkeypatch):
    """Where the varlen kernel runs (by default), the encoder and predictor hand it the packed
    tokens and their sequence offsets (empty sequences left out), and get the outputs and
    gradients of the length groups (varlen_attention(False)). The kernel itself is CUDA-only: a
    per-sequence SDPA stands in for it here."""
    from tcjepa.models import attention

    calls, packings = [], []
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: _reference_varlen(calls))
    monkeypatch.setattr(attention, "varlen_can_run", lambda qkv, head_dim: True)
    init = attention.Packing.__init__
    monkeypatch.setattr(attention.Packing, "__init__", lambda self, valid: (packings.append(self), init(self, valid))[1])
    lengths = [5, 16, 0, 9, 12, 7, 16, 4, 8, 11, 6, 13, 15, 10, 14, 3, 2, 9, 16, 5]
    run, enc, pred = _padded_encoder_predictor(lengths)
    B = len(lengths)

    varlen = run()
    assert calls == [B - 1] * len(enc.blocks) + [B * 2] * len(pred.predictor_blocks)
    assert packings and not any("groups" in vars(p) for p in packings)  # the groups were never built
    with attention.varlen_attention(False):
        grouped = run()
    assert len(calls) == len(enc.blocks) + len(pred.predictor_blocks)  # the groups ran
    for a, b in zip(varlen, grouped):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_varlen_attention_runs_only_where_its_kernel_can():
    from tcjepa.models.attention import Packing, varlen_attention, varlen_can_run
    from tcjepa.models.vit import Attention

    assert not varlen_can_run(torch.zeros(4, 3 * 64, dtype=torch.bfloat16), 64)  # CPU: the kernel is CUDA-only
    assert not varlen_can_run(torch.zeros(4, 3 * 64), 64)
    attn = Attention(24, 3)
    valid = torch.arange(5)[None] < torch.tensor([[2], [5], [3]])
    x = torch.randn(3, 5, 24)
    p = Packing(valid)
    assert p.cu_seqlens.tolist() == [0, 2, 5, 10] and p.max_length == 5
    with varlen_attention(False):
        assert Packing(valid).cu_seqlens is None
    assert p.varlen(attn.qkv(p.pack(x)), 3) is None  # falls back to the length groups
    out = p.unpack(attn(p.pack(x), p))
    ref = p.unpack(attn(p.pack(x), Packing(valid)))  # the same packed order either way
    assert torch.allclose(out, ref)


def test_layer_norm_in_bf16_matches_fp32_and_leaves_the_cpu_alone():
    """The bf16 layer norm the blocks use under CUDA autocast: bf16 out, equal to fp32 layer norm
    to bf16 rounding, with fp32 parameter gradients close to fp32's. On the CPU the blocks' norm
    is nn.LayerNorm, bit for bit (CPU autocast already keeps bf16)."""
    import torch.nn.functional as F

    from tcjepa.models.vit import LayerNorm, layer_norm_in_dtype

    torch.manual_seed(0)
    norm = LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = (3 * torch.randn(8, 64) + 1).bfloat16()
    y = layer_norm_in_dtype(x, norm)
    ref = F.layer_norm(x.float(), (64,), norm.weight, norm.bias, 1e-6)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.03
    y.float().square().sum().backward()
    grad = norm.weight.grad.clone()
    norm.zero_grad()
    ref.square().sum().backward()
    assert grad.dtype == torch.float32 and torch.allclose(grad, norm.weight.grad, rtol=0.02, atol=0.05)
    stock = torch.nn.LayerNorm(64, eps=1e-6)
    stock.load_state_dict(norm.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), stock(x))
    assert torch.equal(norm(x.float()), stock(x.float()))


def test_block_layer_norm_skips_cuda_autocasts_fp32_round_trip():
    """Under CUDA autocast (simulated on fake CUDA tensors: no GPU here) nn.LayerNorm returns fp32
    for the blocks' bf16 input, which the next Linear casts back; the blocks' norms return bf16,
    so the step copies fewer activation bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from tcjepa.plan import simulated_cuda_autocast, warnings_off

    class CopiedElements(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "copy" in str(func.overloadpacket):
                self.n += out.numel()
            return out

    def forward(encoder):
        seen = {}
        encoder.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
        with simulated_cuda_autocast(), warnings_off(), CopiedElements() as copies:
            encoder(torch.empty(32, 3, 64, 64, device="cuda"))
        return seen["dtype"], copies.n

    ours, stock = build_encoder("vit_tiny_16", 64), build_encoder("vit_tiny_16", 64)
    for block in stock.blocks:
        block.norm1, block.norm2 = torch.nn.LayerNorm(192, eps=1e-6), torch.nn.LayerNorm(192, eps=1e-6)
    with FakeTensorMode(allow_non_fake_inputs=True):
        ours, stock = forward(ours.to_empty(device="cuda")), forward(stock.to_empty(device="cuda"))
    assert ours[0] == torch.bfloat16 and stock[0] == torch.float32
    tokens, width, norms = 32 * 16, 192, 24
    assert stock[1] - ours[1] == 2 * norms * tokens * width - 2 * norms * width  # minus the bf16 affine params


def test_attention_backends_leave_out_cudnn():
    """cuDNN attention made the H200 step 1.74x slower (benchmarks/RESULTS.md): keep it out."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from tcjepa.models.attention import CUDA_SDPA_BACKENDS, attention

    assert SDPBackend.CUDNN_ATTENTION not in CUDA_SDPA_BACKENDS
    assert CUDA_SDPA_BACKENDS[0] == SDPBackend.FLASH_ATTENTION
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = torch.tensor([True, True, True, False, False]).view(1, 1, 1, 5)
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_cpu_half_attention_matches_sdpa_and_keeps_masked_rows_finite():
    """bf16 on the CPU attends through two bmm's and a softmax (faster there than the flash
    kernel): the same outputs and gradients as fp64 SDPA to bf16 rounding, masked keys ignored,
    and a row whose keys are all masked finite."""
    import torch.nn.functional as F

    from tcjepa.models.attention import attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 7, 16, generator=gen).unbind(0)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    mask[1] = False  # a sequence without tokens beside a longer one
    grads = []
    for dtype in (torch.bfloat16, torch.float64):
        qkv = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        fn = attention if dtype == torch.bfloat16 else F.scaled_dot_product_attention
        out = fn(*qkv, mask[:1])
        out.float().pow(2).sum().backward()
        grads.append([out.detach().double(), *(t.grad.double() for t in qkv)])
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, rtol=0.03, atol=0.03), (ours - ref).abs().max()
    k2 = k.clone()
    k2[0, :, 5:] += 100.0  # masked keys: changing them changes nothing
    assert torch.equal(attention(q[:1].bfloat16(), k.bfloat16()[:1], v[:1].bfloat16(), mask[:1]),
                       attention(q[:1].bfloat16(), k2.bfloat16()[:1], v[:1].bfloat16(), mask[:1]))
    assert torch.isfinite(attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)).all()
    for scale in (0.6, 1.0):  # the paper conditioner's cosine logits carry their own scale
        ours = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask[:1], scale=scale).double()
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[:1], scale=scale)
        assert torch.allclose(ours, ref, rtol=0.05, atol=0.05)  # the default scale, 0.25, is 1.0 away
    bias = torch.zeros(1, 1, 1, 7).masked_fill(~mask[:1], float("-inf"))  # an fp32 additive mask, outside autocast
    assert torch.equal(attention(q[:1].bfloat16(), k[:1].bfloat16(), v[:1].bfloat16(), bias),
                       attention(q[:1].bfloat16(), k[:1].bfloat16(), v[:1].bfloat16(), mask[:1]))


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


def test_prediction_loss_choice_smooth_l1_or_squared_error():
    """``train.predict_loss``: smooth-L1 (I-JEPA's code) or l2 (squared error, the paper's), per
    token averaged over channels, masked the same way; training and the text scorer share it."""
    from tcjepa.eval.scoring import per_sample_error
    from tcjepa.methods.jepa import masked_mean, per_token_loss

    pred, target = torch.tensor([[[0.0, 3.0], [0.5, 0.0]]]), torch.zeros(1, 2, 2)
    assert per_token_loss(pred, target, "l2").tolist() == [[4.5, 0.125]]
    assert per_token_loss(pred, target, "smooth_l1").tolist() == [[1.25, 0.0625]]
    valid = torch.tensor([[True, False]])
    assert masked_mean(per_token_loss(pred, target, "l2"), valid).item() == 4.5
    # per_sample_error reads [B, T, Nt, D]: one sample, one block of two tokens
    assert per_sample_error(pred[:, None], target[:, None], valid[:, None], "l2").tolist() == [4.5]


def test_targets_average_the_teachers_last_blocks():
    """``teacher.target_blocks`` 2: the targets are the layer norm of the mean of the last two
    blocks' layer-normed outputs (data2vec's top-k average); 1 keeps I-JEPA's last-block targets;
    a frozen teacher too shallow for the setting is a config error."""
    import dataclasses

    import torch.nn.functional as F

    from tcjepa.config import ConfigError, load_config, project_root
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA

    cfg = load_config(project_root() / "recipes/ijepa_quickstart.yaml",
                      ["model.encoder=vit_micro_8", "model.depth=3", "model.predictor_depth=1",
                       "model.predictor_width=48", "teacher.target_blocks=2"])
    torch.manual_seed(0)
    method = JEPA(cfg)
    images = torch.randn(2, 3, 64, 64)
    masks = sample_masks(2, method.teacher.grid, torch.Generator().manual_seed(0), **dataclasses.asdict(cfg.mask))
    B, T, Nt = masks.target_idx.shape
    at_targets = lambda h: torch.stack([h[b, masks.target_idx[b].reshape(-1)] for b in range(B)]).reshape(B, T, Nt, -1)
    ln = lambda t: F.layer_norm(t, (t.size(-1),))
    with torch.no_grad():
        blocks = method.teacher(images, last_blocks=2)
        torch.testing.assert_close(method.targets(images, masks), at_targets(ln((ln(blocks[0]) + ln(blocks[1])) / 2)))
        method.cfg.teacher.target_blocks = 1
        torch.testing.assert_close(method.targets(images, masks), at_targets(ln(method.teacher(images))))
    cfg.teacher.target_blocks = 2
    with pytest.raises(ConfigError, match="teacher.target_blocks 2 exceeds the teacher's 1 blocks"):
        JEPA(cfg, teacher=build_encoder("vit_micro_8", 64, depth=1))
