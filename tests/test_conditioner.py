"""TC-JEPA's sparse cross-attention conditioner: sparsity rules, zero-init equivalence with
I-JEPA, identity conditioning without text, gradient flow."""

import dataclasses

import pytest
import torch

from tcjepa.config import ConfigError, load_config, project_root
from tcjepa.masks import sample_masks
from tcjepa.methods.jepa import JEPA
from tcjepa.models.conditioner import TextConditioner, build_conditioners, conditioned_blocks, sparsemax, topk_softmax
from tcjepa.models.attention import Packing

TC_RECIPE = project_root() / "recipes/tcjepa_quickstart.yaml"
# this file tests the gated_topk variant (tests/test_paper_conditioner.py the paper's)
TINY = ["model.encoder=vit_micro_8", "model.depth=2", "model.predictor_depth=3", "model.predictor_width=48",
        "conditioner.text_width=32", "conditioner.text_depth=1", "conditioner.context_length=16",
        "conditioner.variant=gated_topk"]


def tiny_cfg(*extra: str):
    return load_config(TC_RECIPE, [*TINY, *extra])


def method(*extra: str) -> JEPA:
    torch.manual_seed(0)
    return JEPA(tiny_cfg(*extra))


def batch(m: JEPA, captions: list[str], seed: int = 0):
    """Images, masks (padded 'pad' policy), teacher targets and tokens for one batch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(captions), 3, 64, 64, generator=g)
    masks = sample_masks(len(captions), m.model.encoder.grid, g, **dataclasses.asdict(m.cfg.mask))
    tokens = m.tokenizer(captions) if m.tokenizer is not None else None
    return images, masks, m.targets(images, masks), tokens


CAPTIONS = ["a red circle on the left", "two blue squares", "", "a big green triangle at the top"]


# ----------------------------------------------------------------------------- sparsity rules


def test_topk_keeps_exactly_k_real_tokens_per_query():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 50, 12, generator=g)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 5:] = False  # 5 real tokens
    valid[2, 2:] = False  # fewer real tokens than k
    w = topk_softmax(scores, valid[:, None, None, :], k=4)
    nnz = (w > 0).sum(-1)
    assert (nnz[0] == 4).all() and (nnz[1] == 4).all() and (nnz[2] == 2).all()
    assert (w[1, ..., 5:] == 0).all() and (w[2, ..., 2:] == 0).all()  # padding never attended
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 50))
    # the kept tokens are the k best real ones, weighted by a softmax over them
    s = scores[0, 0, 0]
    top = s.topk(4)
    torch.testing.assert_close(w[0, 0, 0, top.indices], torch.softmax(top.values, 0))


def test_topk_is_exact_under_ties():
    scores = torch.zeros(1, 1, 3, 8)  # every token ties
    w = topk_softmax(scores, torch.ones(1, 1, 1, 8, dtype=torch.bool), k=3)
    assert ((w > 0).sum(-1) == 3).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 3))


def test_sparsemax_projects_onto_the_simplex_and_ignores_padding():
    z = torch.tensor([[3.0, 1.0, 0.2, 5.0], [0.5, 0.4, 0.3, 0.2]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    p = sparsemax(z, valid)
    torch.testing.assert_close(p[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # 5.0 is padding; 3 - 1 >= 1
    torch.testing.assert_close(p[1], torch.tensor([0.4, 0.3, 0.2, 0.1]))  # all within 1: shift by tau
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    zg = z.clone().requires_grad_(True)
    (sparsemax(zg, valid) * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(zg.grad).all() and zg.grad[0, 3] == 0


@pytest.mark.parametrize("sparsity", ["topk", "sparsemax", "softmax"])
def test_conditioner_handles_packed_and_padded_layouts_alike(sparsity):
    torch.manual_seed(0)
    cond = TextConditioner(16, 2, sparsity, top_k=2)
    torch.nn.init.normal_(cond.gate)
    B, S, N, L = 2, 3, 5, 6
    x = torch.randn(B * S, N, 16)
    valid = torch.rand(B * S, N) > 0.3
    valid[:, 0] = True
    text, text_valid = torch.randn(B, L, 16), torch.ones(B, L, dtype=torch.bool)
    has_text = torch.tensor([True, False])
    dense = cond(x, text, text_valid, has_text)
    packing = Packing(valid)
    packed = packing.unpack(cond(packing.pack(x), text, text_valid, has_text, packing))
    torch.testing.assert_close(packed[valid], dense[valid])
    torch.testing.assert_close(dense[S:], x[S:])  # the sample without text is left unchanged
    assert not torch.allclose(dense[:S], x[:S])


def test_a_caption_with_no_real_token_is_identity_not_nan():
    cond = build_conditioners(16, 1, 1, 2)["0"]
    torch.nn.init.normal_(cond.gate)
    x, text = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    valid = torch.tensor([[True, True, False, False], [False] * 4])
    out = cond(x, text, valid, torch.tensor([True, False]))
    assert torch.isfinite(out).all() and torch.equal(out[1], x[1])


def test_qk_norm_gives_order_one_logits_and_gate_scale_scales_the_gate():
    torch.manual_seed(0)
    x, text = torch.randn(2, 20, 32), torch.randn(2, 6, 32)  # unit scale, as TextTower's LayerNorm gives
    valid, has = torch.ones(2, 6, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    for qk_norm, lo, hi in ((True, 0.05, 1.2), (False, 0.0, 0.01)):
        cond = build_conditioners(32, 1, 1, 2, "softmax", qk_norm=qk_norm)["0"]  # tcjepa's 0.02 init
        cond(x, text, valid, has)
        ent = cond.last_entropy
        assert lo <= float(torch.log(torch.tensor(6.0)) - ent) <= hi, (qk_norm, ent)  # gap from uniform
    cond = TextConditioner(32, 2, gate_scale=10.0)
    torch.nn.init.constant_(cond.gate, 0.01)
    torch.testing.assert_close(cond.gate_value(), torch.tanh(torch.full((32,), 0.1)))


def test_conditioned_blocks_always_include_the_last():
    assert conditioned_blocks(6, 1) == [0, 1, 2, 3, 4, 5]
    assert conditioned_blocks(6, 2) == [1, 3, 5]
    assert conditioned_blocks(6, 4) == [1, 5]
    assert conditioned_blocks(3, 3) == [2]


# ----------------------------------------------------------------------------- TC-JEPA vs I-JEPA


def test_fresh_tcjepa_equals_ijepa_bitwise():
    ij, tc = method("conditioner.enabled=false"), method()
    s_ij, s_tc = ij.model.state_dict(), tc.model.state_dict()
    assert all(torch.equal(s_ij[k], s_tc[k]) for k in s_ij)  # same init, text parts on a forked RNG
    assert set(s_tc) - set(s_ij)  # ... and the text parts exist
    images, masks, targets, tokens = batch(tc, CAPTIONS)
    assert masks.padded
    pred_ij = ij.model.predictor(ij.model.encoder(images, masks.context_idx, masks.context_valid), masks.context_idx,
                                 masks.target_idx, masks.context_valid, masks.target_valid)
    text = tc.model.text(tokens)
    pred_tc = tc.model.predictor(tc.model.encoder(images, masks.context_idx, masks.context_valid), masks.context_idx,
                                 masks.target_idx, masks.context_valid, masks.target_valid, text)
    assert torch.equal(pred_ij, pred_tc)
    assert torch.equal(ij.model(images, masks, targets), tc.model(images, masks, targets, tokens))


def test_without_text_the_predictor_is_ijepa_even_after_training_the_gate():
    ij, tc = method("conditioner.enabled=false"), method()
    for c in tc.model.predictor.conditioners.values():
        torch.nn.init.normal_(c.gate)
    images, masks, targets, _ = batch(tc, CAPTIONS)
    no_text = tc.tokenizer([""] * len(CAPTIONS))
    assert not no_text.has_text.any() and no_text.mask.any(1).all()  # begin/end markers stay real
    loss_ij = ij.model(images, masks, targets)
    assert torch.equal(loss_ij, tc.model(images, masks, targets, no_text))
    assert torch.equal(loss_ij, tc.model(images, masks, targets, None))
    with_text = tc.model(images, masks, targets, tc.tokenizer(CAPTIONS))
    assert not torch.equal(loss_ij, with_text)


def test_caption_dropout_empties_captions_at_its_rate():
    tc = method("conditioner.caption_dropout=0.5")
    tokens = tc.text_inputs(["a red circle"] * 2000, torch.Generator().manual_seed(0))
    assert 0.45 < tokens.has_text.float().mean() < 0.55
    none = method("conditioner.caption_dropout=0").text_inputs(["a red circle"] * 50, torch.Generator())
    assert none.has_text.all()
    assert method("conditioner.enabled=false").text_inputs(["x"], torch.Generator()) is None


def _grads(m: JEPA, captions: list[str]) -> dict[str, torch.Tensor | None]:
    for c in m.model.predictor.conditioners.values():
        torch.nn.init.constant_(c.gate, 0.5)  # at gate 0 only the gate itself gets a gradient
    images, masks, targets, tokens = batch(m, captions)
    m.model(images, masks, targets, tokens).backward()
    return {n: p.grad for n, p in m.model.named_parameters()}


def test_gradients_reach_a_trainable_text_encoder():
    grads = _grads(method(), CAPTIONS)
    text = {n: g for n, g in grads.items() if n.startswith("text.encoder.")}
    assert text and all(g is not None for g in text.values())
    assert grads["text.encoder.token_embed.weight"].abs().sum() > 0
    assert grads["predictor.conditioners.2.q.weight"].abs().sum() > 0


def test_frozen_text_encoder_gets_no_gradient_but_its_projection_does():
    m = method("conditioner.text_frozen=true")
    assert not any(p.requires_grad for p in m.model.text.encoder.parameters())
    grads = _grads(m, CAPTIONS)
    assert all(grads[n] is None for n in grads if n.startswith("text.encoder."))
    assert grads["text.proj.weight"].abs().sum() > 0


def test_gate_alone_learns_at_initialisation():
    m = method()
    images, masks, targets, tokens = batch(m, CAPTIONS)
    m.model(images, masks, targets, tokens).backward()
    cond = m.model.predictor.conditioners["2"]
    assert cond.gate.grad.abs().sum() > 0
    assert cond.q.weight.grad.abs().sum() == 0  # behind the zero gate
    assert m.model.text.encoder.token_embed.weight.grad.abs().sum() == 0


def test_conditioner_stats_are_recorded():
    m = method()
    images, masks, targets, tokens = batch(m, CAPTIONS)
    m.model(images, masks, targets, tokens)
    stats = m.model.last_stats
    assert stats["cond_gate"] == 0
    assert 0 < stats["cond_entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6  # top-4: at most log 4


@pytest.mark.parametrize("overrides, match", [
    (["conditioner.sparsity=dense"], "conditioner.sparsity"),
    (["conditioner.every=9"], "conditioner.every"),
    (["conditioner.text_encoder=hf", "conditioner.text_path=/nonexistent/minilm"], "conditioner.text_path"),
    (["conditioner.tokenizer=sentencepiece"], "conditioner.tokenizer_path"),
    (["conditioner.text_encoder=hf", f"conditioner.text_path={project_root()}", "conditioner.tokenizer=open_clip"], "must be hf"),
    (["conditioner.heads=5"], "conditioner.heads"),
    (["conditioner.gate_scale=0"], "conditioner.gate_scale"),
    (["conditioner.variant=sparse"], r"conditioner.variant must be paper or gated_topk, got 'sparse'"),
    (["conditioner.max_captions=0"], r"conditioner.max_captions must be >= 1, got 0"),
    (["conditioner.sparse_weight=-0.1"], r"conditioner.sparse_weight must be a finite number >= 0, got -0.1"),
    (["conditioner.consistency_weight=.inf"], r"conditioner.consistency_weight must be a finite number >= 0"),
    (["conditioner.weigh_against=total"], r"conditioner.weigh_against must be mean or sum, got 'total'"),
    (["train.predict_loss=l1"], r"train.predict_loss must be smooth_l1 or l2, got 'l1'"),
    (["conditioner.logits=l2"], r"conditioner.logits must be dot, cosine or overlap, got 'l2'"),
    (["conditioner.logit_scale=0"], r"conditioner.logit_scale must be in \(0, 100\], got 0"),
    (["conditioner.text_encoder=t5", "conditioner.text_path=/nonexistent/t5-base"], "conditioner.text_path"),
])
def test_conditioner_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(*overrides)


def test_pkg_asset_paths_resolve_through_get_model_path(tmp_path, monkeypatch):
    from tcjepa.config import resolve_asset_path

    pkg = tmp_path / "site" / "fake_text_model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"def get_model_path():\n    return {str(tmp_path / 'weights')!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_asset_path("pkg:fake_text_model") == str(tmp_path / "weights")
    assert resolve_asset_path("/some/dir") == "/some/dir"
    with pytest.raises(ConfigError, match="not installed"):
        resolve_asset_path("pkg:no_such_package_here")
    with pytest.raises(ConfigError, match="no get_model_path"):
        resolve_asset_path("pkg:json")
    # an hf encoder whose package resolves to a missing directory fails before training
    with pytest.raises(ConfigError, match="conditioner.text_path"):
        tiny_cfg("conditioner.text_encoder=hf", "conditioner.text_path=pkg:fake_text_model")
