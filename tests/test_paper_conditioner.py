"""TC-JEPA's conditioner as the paper defines it (``conditioner.variant: paper``): per-layer
cross-attention over each caption's words, max-pooled over captions, with the sparsity and
cross-layer consistency regularisers; checked against hand computations in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from tcjepa.config import load_config, project_root
from tcjepa.models.conditioner import CaptionCrossAttention, build_caption_conditioners, overlap_regularisers
from tcjepa.models.attention import Packing

QUICK = project_root() / "recipes/tcjepa_quickstart.yaml"
PAPER = ["conditioner.variant=paper", "model.encoder=vit_micro_8", "model.depth=1", "model.predictor_depth=2",
         "model.predictor_width=32", "model.predictor_heads=4", "conditioner.text_width=16", "conditioner.text_depth=1",
         "conditioner.context_length=12"]


def reference_layer(layer: CaptionCrossAttention, x: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                    has_text: torch.Tensor) -> torch.Tensor:
    """The paper's layer written out per sample and per caption, over each caption's real words
    only (no masking): each caption's cross-attended state x + proj(attention), the elementwise
    max over the real captions, then the MLP on the pooled state (if the layer has one); x [B, Q, C]."""
    B, Q, C = x.shape
    H = layer.num_heads
    dh = C // H
    out = x.clone()
    for b in range(B):
        states = []
        for n in range(text.shape[1]):
            if not has_text[b, n]:
                continue
            t = text[b, n][valid[b, n]]  # [S_real, C]
            q = layer.q(layer.norm(x[b])).view(Q, H, dh)
            k, v = layer.k(t).view(-1, H, dh), layer.v(t).view(-1, H, dh)
            heads = []
            for h in range(H):
                cos = F.normalize(q[:, h], dim=-1) @ F.normalize(k[:, h], dim=-1).T
                if layer.logits == "dot":
                    w = torch.softmax(q[:, h] @ k[:, h].T / math.sqrt(dh), dim=-1)
                elif layer.logits == "cosine":  # times the learned scale
                    w = torch.softmax(cos * layer.log_scale.exp(), dim=-1)
                else:  # overlap: the rectified cosines, unnormalised
                    w = cos.clamp_min(0)
                heads.append(w @ v[:, h])
            states.append(x[b] + torch.cat(heads, dim=-1))
        if states:
            pooled = torch.stack(states).amax(0)
            out[b] = pooled + layer.mlp(layer.mlp_norm(pooled)) if layer.mlp is not None else pooled
    return out


def random_text(B: int, N: int, S: int, C: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    text = torch.randn(B, N, S, C, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, S + 1, (B, N), generator=gen)
    valid = torch.arange(S)[None, None] < lengths[..., None]  # captions of different lengths
    return text, valid


@pytest.mark.parametrize("mlp,logits", [(True, "dot"), (False, "dot"), (True, "overlap")])
def test_batched_captions_equal_a_loop_over_captions_then_a_max(mlp, logits):
    """With and without the MLP after the attention (``conditioner.mlp``); values and gradients,
    with missing captions among real ones (the pooling repeats a real caption in their place)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    B, T, Ns, N, S, C = 3, 2, 5, 4, 6, 16
    layer = build_caption_conditioners(C, 1, 1, num_heads=4, mlp=mlp, logits=logits)["0"].double()
    assert any(name.startswith("mlp.") for name, _ in layer.named_parameters()) is mlp
    text, valid = random_text(B, N, S, C, gen)
    has_text = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    x = torch.randn(B * T, Ns, C, generator=gen, dtype=torch.float64)
    out = layer(x, text, valid, has_text)
    ref = reference_layer(layer, x.reshape(B, T * Ns, C), text, valid, has_text)
    torch.testing.assert_close(out.reshape(B, T * Ns, C), ref, rtol=1e-10, atol=1e-10)
    inputs = (x.requires_grad_(True), text.requires_grad_(True), *layer.parameters())
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((layer(x, text, valid, has_text) * g_out).sum(), inputs)
    ref_grads = torch.autograd.grad((reference_layer(layer, x.reshape(B, T * Ns, C), text, valid, has_text)
                                     * g_out.reshape(B, T * Ns, C)).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    x, text = x.detach(), text.detach()
    torch.testing.assert_close(out[T : 2 * T], x[T : 2 * T], rtol=0, atol=0)  # no caption: unconditioned
    x.requires_grad_(True)
    layer(x, text, valid, has_text).sum().backward()  # an image without captions: finite gradients everywhere
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(x.grad[T : 2 * T], torch.ones_like(x.grad[T : 2 * T]))
    # packed predictor tokens (padded sequences): the real tokens get the same values
    seq_valid = torch.rand(B * T, Ns, generator=gen) < 0.7
    seq_valid[:, 0] = True
    packing = Packing(seq_valid)
    packed = layer(packing.pack(x), text, valid, has_text, packing)
    torch.testing.assert_close(packed, packing.pack(out), rtol=1e-10, atol=1e-10)


def test_cosine_logits_are_the_scaled_cosines_and_learn_their_scale():
    """conditioner.logits=cosine: the same loop-then-max reference with softmax(scale * cos(q, k));
    the scale starts at logit_scale, gets a gradient, is capped at 100, and the logged attention
    entropy re-scores the kernel's own logits."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    B, T, Ns, N, S, C = 2, 2, 3, 3, 5, 16
    layer = build_caption_conditioners(C, 1, 1, num_heads=4, logits="cosine", logit_scale=7.0)["0"].double()
    assert layer.log_scale.item() == pytest.approx(math.log(7.0))
    text, valid = random_text(B, N, S, C, gen)
    has_text = torch.tensor([[True, True, False], [True, False, True]])
    x = torch.randn(B * T, Ns, C, generator=gen, dtype=torch.float64)
    layer.keep_weights = True
    out = layer(x, text, valid, has_text)
    torch.testing.assert_close(out.reshape(B, T * Ns, C), reference_layer(layer, x.reshape(B, T * Ns, C), text, valid,
                                                                          has_text), rtol=1e-10, atol=1e-10)
    q = layer.q(layer.norm(x.reshape(B, T * Ns, C)))[0].view(-1, 4, 4)  # sample 0's queries, per head
    k = layer.k(text[0, 0][valid[0, 0]]).view(-1, 4, 4)  # its first caption's real words
    heads = [torch.softmax(F.normalize(q[:, h], dim=-1) @ F.normalize(k[:, h], dim=-1).T * 7.0, -1) for h in range(4)]
    n_real = int(valid[0, 0].sum())
    torch.testing.assert_close(layer.last_weights[0, 0, :, :n_real], torch.stack(heads).mean(0).float(), rtol=1e-5,
                               atol=1e-6)  # what viz and eval grounding read
    out.sum().backward()
    assert layer.log_scale.grad is not None and layer.log_scale.grad.abs() > 0
    with torch.no_grad():
        layer.log_scale.fill_(math.log(1000.0))
    scaled_q = layer.logit_inputs(q.transpose(0, 1)[None], k.transpose(0, 1)[None, None])[0]
    assert scaled_q.norm(dim=-1).max().item() == pytest.approx(100.0)  # the scale is capped
    with pytest.raises(ValueError, match="unknown conditioner logits 'l2'"):
        build_caption_conditioners(C, 1, 1, num_heads=4, logits="l2")


def test_overlap_logits_weight_each_word_by_its_rectified_cosine():
    """conditioner.logits=overlap: the loop-then-max reference with unnormalised weights
    max(cos(q_h, k_h), 0); the overlaps the regularisers read are those weights' head mean, so
    the sparsity loss reaches q and k through the weights themselves; a caption whose cosines are
    all negative adds nothing; the entropy statistic normalises the first caption's rows."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    B, T, Ns, N, S, C, H = 2, 2, 3, 3, 5, 16, 4
    layer = build_caption_conditioners(C, 1, 1, num_heads=H, logits="overlap")["0"].double()
    text, valid = random_text(B, N, S, C, gen)
    has_text = torch.tensor([[True, True, False], [True, False, True]])
    x = torch.randn(B * T, Ns, C, generator=gen, dtype=torch.float64, requires_grad=True)
    layer.keep_weights = True
    out = layer(x, text, valid, has_text)
    torch.testing.assert_close(out.reshape(B, T * Ns, C), reference_layer(layer, x.reshape(B, T * Ns, C), text, valid,
                                                                          has_text), rtol=1e-10, atol=1e-10)
    q = layer.q(layer.norm(x.reshape(B, T * Ns, C)))[1].view(-1, H, C // H)  # sample 1's queries, per head
    k = layer.k(text[1, 2]).view(-1, H, C // H)  # its third caption, padding included
    weights = torch.stack([(F.normalize(q[:, h], dim=-1) @ F.normalize(k[:, h], dim=-1).T).clamp_min(0)
                           for h in range(H)]).mean(0) * valid[1, 2]
    torch.testing.assert_close(layer.last_overlap[1, 2], weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.last_weights[1, 2], weights.float(), rtol=1e-5, atol=1e-7)
    assert ((layer.last_overlap > 0).sum(-1) < valid.sum(-1)[..., None]).any()  # sparse: some real words get 0
    queries = layer.q(layer.norm(x.reshape(B, T * Ns, C))).view(B, -1, H, C // H)

    def first_caption_entropy(b: int) -> torch.Tensor:  # rows normalised to 1, mean over heads and queries
        keys = layer.k(text[b, 0][valid[b, 0]]).view(-1, H, C // H)
        rows = [(F.normalize(queries[b, :, h], dim=-1) @ F.normalize(keys[:, h], dim=-1).T).clamp_min(0)
                for h in range(H)]
        rows = [torch.where(r.sum(-1, keepdim=True) > 0, r / r.sum(-1, keepdim=True), 1 / r.shape[-1]) for r in rows]
        return torch.stack([-(r * r.clamp_min(1e-12).log()).sum(-1) for r in rows]).mean()

    expected = (first_caption_entropy(0) + first_caption_entropy(1)) / 2  # both images have a first caption
    torch.testing.assert_close(layer.last_entropy.double(), expected, rtol=1e-5, atol=1e-6)
    sparse, _ = overlap_regularisers([layer.last_overlap], has_text[:, :, None].expand(B, N, T * Ns))
    sparse.backward()
    assert layer.q.weight.grad.abs().sum() > 0 and layer.k.weight.grad.abs().sum() > 0
    with torch.no_grad():  # no overlap with any word (zero keys): the text adds nothing
        layer.k.weight.zero_()
        layer.k.bias.zero_()
        layer.v.bias.fill_(1.0)
    neg = layer(x.detach(), text, valid, has_text)
    torch.testing.assert_close(layer.last_overlap, torch.zeros_like(layer.last_overlap))
    h = x.detach().reshape(B, T * Ns, C)  # zero keys: cos 0, weight 0, update 0; the MLP still runs
    torch.testing.assert_close(neg.reshape(B, T * Ns, C), h + layer.mlp(layer.mlp_norm(h)), rtol=1e-10, atol=1e-10)


def test_overlaps_are_head_averaged_rectified_cosines_with_padding_zero():
    gen = torch.Generator().manual_seed(1)
    B, N, S, C, H = 2, 2, 4, 8, 2
    layer = build_caption_conditioners(C, 1, 1, num_heads=H)["0"].double()
    text, valid = random_text(B, N, S, C, gen)
    x = torch.randn(B, 3, C, generator=gen, dtype=torch.float64)
    layer(x, text, valid, torch.ones(B, N, dtype=torch.bool))
    q = layer.q(layer.norm(x)).view(B, 3, H, C // H)
    k = layer.k(text).view(B, N, S, H, C // H)
    for b in range(B):
        for n in range(N):
            for s in range(S):
                cos = F.cosine_similarity(q[b], k[b, n, s][None].expand_as(q[b]), dim=-1).mean(-1)  # [Q]
                want = cos.clamp_min(0) if valid[b, n, s] else torch.zeros(3, dtype=torch.float64)
                torch.testing.assert_close(layer.last_overlap[b, n, :, s], want, rtol=1e-10, atol=1e-12)


def test_regularisers_equal_the_formulas_by_hand():
    # two layers, one image, two captions (the second has only 2 real words), three predictor tokens
    o1 = torch.tensor([[[[0.5, 0.0, 0.25], [0.1, 0.2, 0.0], [0.0, 0.0, 0.0]],
                        [[0.3, 0.4, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]], dtype=torch.float64)
    o2 = torch.tensor([[[[0.1, 0.0, 0.25], [0.3, 0.2, 0.4], [0.0, 0.5, 0.0]],
                        [[0.3, 0.0, 0.0], [0.2, 0.2, 0.0], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    pairs = torch.tensor([[[True, True, False], [True, True, True]]])  # token 3 of caption 1 is padding
    sparse, consistency = overlap_regularisers([o1, o2], pairs)
    # per pair: (1/L) sum_l ||O^l||_1, and (1/L) sum_l ||O^l - mean_l O||_1 = ||O^1 - O^2||_1 / 2 for L = 2
    sparse_by_hand = [(0.75 + 0.35) / 2, (0.3 + 0.9) / 2, (0.7 + 0.3) / 2, (0.0 + 0.4) / 2, (1.0 + 0.0) / 2]
    consistency_by_hand = [0.4 / 2, 0.6 / 2, 0.4 / 2, 0.4 / 2, 1.0 / 2]
    assert sparse.item() == pytest.approx(sum(sparse_by_hand) / 5)
    assert consistency.item() == pytest.approx(sum(consistency_by_hand) / 5)
    # the count over ranks replaces the local count
    assert overlap_regularisers([o1, o2], pairs, torch.tensor(10.0))[0].item() == pytest.approx(sum(sparse_by_hand) / 10)


@pytest.fixture()
def student_and_batch():
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA

    cfg = load_config(QUICK, PAPER)
    method = JEPA(cfg)
    gen = torch.Generator().manual_seed(0)
    size = cfg.model.image_size
    images = torch.randn(3, 3, size, size, generator=gen)
    masks = sample_masks(3, method.model.encoder.grid, gen, **vars(cfg.mask))
    targets = method.targets(images, masks)
    captions = ["a red circle on the left", "two blue squares", "a large green star at the top"]
    return method, images, masks, targets, method.tokenizer(captions)


def test_regularisers_reach_every_layers_query_and_key_weights(student_and_batch):
    """Through L_sparse + L_consistency alone, a gradient reaches W_Q and W_K of every layer (the
    overlaps depend on queries and keys; W_V only through later layers' queries, so the last
    layer's gets none); through the full loss every layer's W_V gets one too."""
    method, images, masks, targets, tokens = student_and_batch
    student = method.model
    student(images, masks, targets, tokens)
    sparse, consistency = student._regularisers(masks, student.text(tokens).has_text)
    (sparse + consistency).backward()
    layers = list(student.predictor.conditioners.values())
    assert len(layers) == 2 and all(isinstance(c, CaptionCrossAttention) for c in layers)
    for c in layers:
        assert c.q.weight.grad.abs().sum() > 0 and c.k.weight.grad.abs().sum() > 0
    last_v = layers[-1].v.weight.grad  # values feed the overlaps only through later layers' queries
    assert last_v is None or last_v.abs().sum() == 0
    student.zero_grad()
    student(images, masks, targets, tokens).backward()
    assert all(c.v.weight.grad.abs().sum() > 0 for c in layers)


@pytest.mark.parametrize("logits", ["dot", "overlap"])
def test_regularisers_can_stop_at_the_conditioner(logits):
    """``conditioner.regularise_encoder: false``: the same loss, overlaps and prediction, but the
    regularisers' gradient trains only the conditioners' W_Q (with its norm), W_K and the text
    side (the default); with ``true`` they also move the encoder and the predictor's blocks through
    the queries (measured: their pull contracts the encoder's features, benchmarks/RESULTS.md)."""
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA

    grads, values = {}, {}
    for reach in (True, False):
        torch.manual_seed(0)
        cfg = load_config(QUICK, PAPER + [f"conditioner.logits={logits}", f"conditioner.regularise_encoder={reach}"])
        method = JEPA(cfg)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(3, 3, cfg.model.image_size, cfg.model.image_size, generator=gen)
        masks = sample_masks(3, method.model.encoder.grid, gen, **vars(cfg.mask))
        student, tokens = method.model, method.tokenizer(["a red circle on the left", "two blue squares", "a star"])
        loss = student(images, masks, method.targets(images, masks), tokens)
        sparse, consistency = student._regularisers(masks, student.text(tokens).has_text)
        (sparse + consistency).backward()
        values[reach] = (loss.detach(), sparse.detach(), consistency.detach())
        grads[reach] = {n: p.grad for n, p in student.named_parameters()}
    for a, b in zip(values[True], values[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert values[False][1] > 0

    def moved(reach: bool, prefix: str) -> bool:
        return any(g is not None and g.abs().sum() > 0 for n, g in grads[reach].items() if n.startswith(prefix))

    for prefix in ("encoder.", "predictor.predictor_blocks.", "predictor.predictor_embed."):
        assert moved(True, prefix) and not moved(False, prefix), prefix
    for prefix in ("predictor.conditioners.0.q.", "predictor.conditioners.1.k.", "text."):
        assert moved(False, prefix), prefix


@pytest.mark.parametrize("separate", [True, False])
def test_cosines_computed_once_for_both_gradient_paths(separate):
    """``logits: overlap`` takes the attention weights and the regularisers' overlaps (their head
    mean) from one cosine product: the same values and gradients as plain autograd over
    max(cos, 0) (float64, padding words); with ``regularise_encoder: false`` the overlaps'
    gradient goes to the regularisers' own queries, as two separate products would send it."""
    from tcjepa.models.conditioner import rectified_cosines

    def plain(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        cos = torch.einsum("bhqd,bnhsd->bnhqs", F.normalize(q, dim=-1), F.normalize(k, dim=-1))
        return cos.clamp_min(0) * valid[:, :, None, None, :]

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    q_reg = q.detach().clone().requires_grad_(True)
    k = torch.randn(3, 4, 2, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(3, 4, 6, generator=gen) > 0.3
    weights, read = rectified_cosines(q, k, valid, q_reg if separate else None)
    g_w, g_r = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (weights, read))
    once = torch.autograd.grad((weights * g_w).sum() + (read * g_r).sum(), (q, q_reg, k), allow_unused=True)
    ref_w, ref_r = plain(q, k, valid), plain(q_reg if separate else q, k, valid).mean(2)
    twice = torch.autograd.grad((ref_w * g_w).sum() + (ref_r * g_r).sum(), (q, q_reg, k), allow_unused=True)
    padding = ~valid[:, :, None, :].expand_as(read)
    torch.testing.assert_close(weights, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(read, ref_r, rtol=1e-12, atol=1e-12)
    assert weights.is_contiguous() and (read[padding] == 0).all()
    for a, b in zip(once, twice):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (once[1] is not None and bool(once[1].abs().sum() > 0)) is separate  # the regularisers' queries' own gradient


def test_stopped_regularisers_cost_nothing_without_a_gradient():
    """With no gradient recorded (evaluation, retrieval scoring, grounding) the stopped
    regularisers' queries are not recomputed: the same output and overlaps as ``true`` for the
    FLOPs of ``true``; while training they add their own queries' work."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 3, 5, 16, generator=gen)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    has = torch.ones(2, 3, dtype=torch.bool)
    layers = {reach: CaptionCrossAttention(16, 2, logits="overlap", regularise_encoder=reach) for reach in (True, False)}
    layers[False].load_state_dict(layers[True].state_dict())

    def run(reach: bool, grad: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            out = layers[reach](x, text, valid, has)
        return out.detach(), layers[reach].last_overlap.detach(), counter.get_total_flops()

    (out_t, ov_t, flops_t), (out_f, ov_f, flops_f) = run(True, False), run(False, False)
    torch.testing.assert_close(out_f, out_t)
    torch.testing.assert_close(ov_f, ov_t)
    assert flops_f == flops_t
    assert run(False, True)[2] > run(True, True)[2]


def test_zero_weights_give_the_prediction_loss_gradients(student_and_batch, monkeypatch):
    import dataclasses

    method, images, masks, targets, tokens = student_and_batch
    student = method.model
    student.objective = dataclasses.replace(student.objective, sparse_weight=0.0, consistency_weight=0.0)
    loss = student(images, masks, targets, tokens)
    assert loss.item() == student.last_stats["loss_predict"].item()
    loss.backward()
    with_zero = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    monkeypatch.setattr(type(student), "_paper_variant", lambda self: False)  # no regulariser term at all
    monkeypatch.setattr(type(student), "_conditioner_stats", lambda self: {})
    student(images, masks, targets, tokens).backward()
    alone = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert with_zero.keys() == alone.keys()
    assert all(torch.equal(with_zero[n], alone[n]) for n in alone)


@pytest.mark.parametrize("weigh_against", ["mean", "sum"])
def test_weights_weigh_the_regularisers_against_the_mean_or_the_summed_distance(weigh_against):
    """conditioner.weigh_against: the loss is L_predict + lambda L_sparse + beta L_consistency
    with L_predict averaged over the target's channels (mean), or with lambda and beta divided by
    the target width (sum: the same balance as against the distance summed over the channels);
    loss_predict is logged as computed either way."""
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA

    cfg = load_config(QUICK, PAPER + [f"conditioner.weigh_against={weigh_against}", "conditioner.sparse_weight=0.3",
                                      "conditioner.consistency_weight=0.7"])
    method = JEPA(cfg)
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=gen)
    masks = sample_masks(2, method.model.encoder.grid, gen, **vars(cfg.mask))
    student = method.model
    loss = student(images, masks, method.targets(images, masks), method.tokenizer(["a red circle", "two blue stars"]))
    stats, width = student.last_stats, student.encoder.embed_dim
    per_channel = 1.0 / width if weigh_against == "sum" else 1.0
    assert stats["cond_sparse"] > 0 and width > 1
    expected = stats["loss_predict"] + (0.3 * stats["cond_sparse"] + 0.7 * stats["cond_consistency"]) * per_channel
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)


def test_captions_change_the_prediction_and_none_is_the_unconditioned_path(student_and_batch):
    from data_pipelines.tokenizers import Tokens

    method, images, masks, targets, tokens = student_and_batch
    predictor, student = method.model.predictor, method.model
    z = student.encoder(images, masks.context_idx, masks.context_valid if masks.padded else None)
    args = (z, masks.context_idx, masks.target_idx, *((masks.context_valid, masks.target_valid) if masks.padded else (None, None)))
    with torch.no_grad():
        plain = predictor(*args)
        conditioned = predictor(*args, student.text(tokens))
        shuffled = predictor(*args, student.text(Tokens(tokens.ids[[1, 2, 0]], tokens.mask[[1, 2, 0]],
                                                        tokens.has_text[[1, 2, 0]])))
        dropped = predictor(*args, student.text(Tokens(tokens.ids, tokens.mask, torch.zeros_like(tokens.has_text))))
    assert not torch.allclose(conditioned, plain) and not torch.allclose(conditioned, shuffled)
    torch.testing.assert_close(dropped, plain, rtol=0, atol=0)


def test_unused_caption_slots_are_trimmed_without_changing_the_loss(student_and_batch):
    """A batch of one-caption images in a run with max_captions 4 computes one caption slot, not
    four, and the loss and its statistics are those of the untrimmed tokens."""
    from data_pipelines.tokenizers import Tokens, tokenize_caption_sets, trim_caption_slots

    method, images, masks, targets, _ = student_and_batch
    sets = [["a red circle on the left"], ["two blue squares", "a blue pair"], ["a large green star at the top"]]
    four = tokenize_caption_sets(method.tokenizer, sets, 4)
    trimmed = trim_caption_slots(four)
    assert trimmed.ids.shape[1] == 2 and torch.equal(trimmed.ids, four.ids[:, :2])
    none = Tokens(four.ids, four.mask, torch.zeros_like(four.has_text))
    assert trim_caption_slots(none).ids.shape[1] == 1  # all dropped: one (empty) slot stays
    student = method.model
    with torch.no_grad():
        full = student(images, masks, targets, four)
        stats = dict(student.last_stats)
        cut = student(images, masks, targets, trimmed)
    torch.testing.assert_close(cut, full)
    for k, v in student.last_stats.items():
        torch.testing.assert_close(v, stats[k])
    gen = torch.Generator().manual_seed(0)
    assert method.text_inputs(sets, gen, four).ids.shape[1] <= 2  # what a training step gets


def test_cosine_logits_train_through_the_student():
    """conditioner.logits=cosine from the config: every layer's learned scale gets a gradient from
    the loss and sits in the optimiser group without weight decay."""
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA, param_groups

    cfg = load_config(QUICK, PAPER + ["conditioner.logits=cosine", "conditioner.logit_scale=5"])
    method = JEPA(cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=gen)
    masks = sample_masks(2, method.model.encoder.grid, gen, **vars(cfg.mask))
    tokens = method.tokenizer(["a red circle on the left", "two blue squares"])
    loss = method.model(images, masks, method.targets(images, masks), tokens)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    scales = [c.log_scale for c in method.model.predictor.conditioners.values()]
    assert len(scales) == 2 and all(s.item() == pytest.approx(math.log(5)) and s.grad.abs() > 0 for s in scales)
    no_decay = next(g for g in param_groups(method.model) if not g["apply_wd"])["params"]
    assert all(any(s is p for p in no_decay) for s in scales)


def test_cosine_logits_train_end_to_end(tmp_path):
    """Two DeepSpeed steps with cosine logits (its parameter broadcast refuses 0-d tensors); the
    learned scales are saved with the run."""
    from safetensors.torch import load_file

    from tests.eval_runs import TINY, TINY_TEXT, write_colour_shards
    from tcjepa.train import train

    cfg = load_config(QUICK, [f"data.train={write_colour_shards(tmp_path / 'data', 16)}", *TINY, *TINY_TEXT,
                              "conditioner.logits=cosine"])
    run = train(cfg, tmp_path / "run", progress=False)
    state = load_file(str(run / "final" / "model.safetensors"))
    scales = [v for k, v in state.items() if k.endswith("log_scale")]
    assert len(scales) == cfg.model.predictor_depth and all(torch.isfinite(s).all() for s in scales)
