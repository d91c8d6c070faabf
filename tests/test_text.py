"""Tokenizers and text encoders (scratch, local Hugging Face, open_clip), and a TC-JEPA training
step with each encoder."""

import json
import random
import string
from pathlib import Path

import pytest
import torch

from data_pipelines.tokenizers import HFTokenizer, OpenCLIPTokenizer, build_tokenizer, train_sentencepiece
from tcjepa.checkpoint import load_final_state
from tcjepa.config import load_config, project_root
from tcjepa.models.text import HFTextEncoder, OpenCLIPTextEncoder, ScratchTextEncoder, build_text_encoder
from tcjepa.train import train
from tests.conftest import labelled_members, write_tar

WORDS = "a an the red green blue circle square triangle big small on left right top of two".split()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny BERT and its WordPiece tokenizer saved as a local Hugging Face directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


def test_open_clip_tokenizer_pads_and_marks_empty_captions():
    tok = OpenCLIPTokenizer(16)
    t = tok(["a red circle", "", "word " * 40])
    assert t.ids.shape == (3, 16) and t.ids.dtype == torch.long
    assert t.mask[0].sum() == 5  # <start> a red circle <end>
    assert t.mask[1].sum() == 2 and t.mask[2].all()  # empty: markers only; long: truncated
    assert t.has_text.tolist() == [True, False, True]
    assert tok.token_strings(t.ids[0, 1:4]) == ["a", "red", "circle"]
    # '!' inside a punctuation run can be id 0, the padding id: the mask counts it (by position)
    t = tok(["what!??"])
    real = int(t.mask[0].sum())
    assert 0 in t.ids[0, :real].tolist() and t.mask[0, :real].all() and not t.mask[0, real:].any()


def test_hf_tokenizer_from_local_dir(tiny_hf):
    tok = HFTokenizer(str(tiny_hf), context_length=8)
    t = tok(["the red circle", "   "])
    assert t.ids.shape == (2, 8) and t.mask[0].sum() == 5 and t.has_text.tolist() == [True, False]
    assert tok.token_strings(t.ids[0, :5]) == ["[CLS]", "the", "red", "circle", "[SEP]"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HFTokenizer(str(tiny_hf / "missing"))


def test_words_join_sub_word_pieces(tiny_hf, tmp_path):
    """What `viz attention` labels its maps with: the words a reader sees, whatever the tokenizer
    splits them into, begin/end markers dropped, each with the positions of its pieces."""
    from tests.conftest import write_t5_model

    clip = OpenCLIPTokenizer(16)
    t = clip(["a cyan circle"])
    ids = t.ids[0, : int(t.mask[0].sum())].tolist()
    assert clip.token_strings(ids[2:4]) == ["cy", "an"]  # BPE splits "cyan"
    assert clip.words(ids) == [("a", [1]), ("cyan", [2, 3]), ("circle", [4])]

    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cy", "##an", "circle"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path / "wp")
    wp = HFTokenizer(str(tmp_path / "wp"), context_length=8)
    t = wp(["a cyan circle"])
    ids = t.ids[0, : int(t.mask[0].sum())].tolist()
    assert wp.token_strings(ids) == ["[CLS]", "a", "cy", "##an", "circle", "[SEP]"]
    assert wp.words(ids) == [("a", [1]), ("cyan", [2, 3]), ("circle", [4])]

    t5 = HFTokenizer(str(write_t5_model(tmp_path)), context_length=24)  # SentencePiece pieces, no BOS
    t = t5(["a large green star"])
    ids = t.ids[0, : int(t.mask[0].sum())].tolist()
    found = t5.words(ids)
    assert [w for w, _ in found] == ["a", "large", "green", "star"]  # the first word kept, </s> dropped
    assert sorted(i for _, idx in found for i in idx) == list(range(len(ids) - 1))

    captions = [f"a {c} circle" for c in ("cyan", "red", "magenta")] * 10
    sp = build_tokenizer("sentencepiece", str(train_sentencepiece(captions, tmp_path / "sp.model", vocab_size=30)), 24)
    t = sp(["a magenta circle"])
    ids = t.ids[0, : int(t.mask[0].sum())].tolist()
    assert [w for w, _ in sp.words(ids)] == ["a", "magenta", "circle"]


def test_hf_tokenizer_cleans_as_open_clip_does(tiny_hf):
    """HTML entities, ftfy fixes and whitespace runs are cleaned as open_clip's Hugging Face
    tokenizer cleans them (what an ``export open_clip`` of the run will do)."""
    from open_clip.tokenizer import HFTokenizer as OpenCLIPHF

    ours, ref = HFTokenizer(str(tiny_hf), context_length=12), OpenCLIPHF(str(tiny_hf), context_length=12)
    captions = ["the red &amp; blue circle", "  the\t red\ncircle ", "caf\u00e9 &lt;b&gt;", "plain words", ""]
    assert torch.equal(ours(captions).ids, ref(captions))
    assert torch.equal(ours(["the red &amp; circle"]).ids, ours(["the red & circle"]).ids)


def test_sentencepiece_trains_on_captions_and_tokenizes(tmp_path):
    captions = [f"a {c} {s} on the {p}" for c in ("red", "green", "blue") for s in ("circle", "square")
                for p in ("left", "right", "top")] * 20
    model = train_sentencepiece(captions, tmp_path / "caps.model", vocab_size=40)
    tok = build_tokenizer("sentencepiece", str(model), context_length=40)
    t = tok(["a red circle on the left", ""])
    assert t.ids[0, 0] == 1 and t.mask[0].sum() >= 4 and t.mask[1].sum() == 2  # <s> ... </s>
    assert (t.ids[~t.mask] == 0).all() and tok.vocab_size <= 40
    assert "".join(tok.token_strings(t.ids[0, 1 : t.mask[0].sum() - 1])).replace("\u2581", " ").strip() == "a red circle on the left"


def test_scratch_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = ScratchTextEncoder(vocab_size=50, context_length=8, width=16, depth=2, num_heads=2)
    ids = torch.randint(1, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    out = enc(ids, mask)
    ids2 = ids.clone()
    ids2[0, 5:] = 7  # change only padding
    torch.testing.assert_close(enc(ids2, mask)[0, :5], out[0, :5])
    assert out.shape == (2, 8, 16)


def test_hf_encoder_is_frozen_by_default_and_returns_token_features(tiny_hf):
    enc = build_text_encoder("hf", vocab_size=0, context_length=8, path=str(tiny_hf))
    assert isinstance(enc, HFTextEncoder) and enc.frozen and enc.width == 32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen encoders stay in eval mode (no dropout)
    t = HFTokenizer(str(tiny_hf), 8)(["the red circle"])
    out = enc(t.ids, t.mask)
    assert out.shape == (1, 8, 32) and not out.requires_grad


def test_open_clip_tower_loads_a_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = OpenCLIPTextEncoder("", context_length=16, vocab_size=100, width=32, depth=1, num_heads=2)
    state = {k: v for k, v in src.model.state_dict().items() if k != "attn_mask"}
    state["logit_scale"] = torch.ones(())  # a full CLIP checkpoint also holds the image tower etc.
    state["visual.proj"] = torch.zeros(2, 2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "clip.pt")
    torch.manual_seed(1)
    dst = build_text_encoder("open_clip", vocab_size=100, context_length=16, width=32, depth=1, num_heads=2,
                             open_clip_model="", path=str(tmp_path / "clip.pt"))
    ids = torch.randint(1, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    torch.testing.assert_close(dst(ids, mask), src(ids, mask))
    assert not dst.frozen


# ----------------------------------------------------------------------------- a training step each


@pytest.fixture(scope="module")
def captioned_shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("captioned")
    write_tar(d / "000000.tar", labelled_members(0, 48, size=64))
    return d


def _train_tc(shards: Path, out: Path, *extra: str) -> Path:
    cfg = load_config(project_root() / "recipes/tcjepa_quickstart.yaml", [
        f"data.train={shards}", "model.encoder=vit_micro_8", "model.depth=1", "model.predictor_depth=2",
        "model.predictor_width=48", "train.batch_size=8", "train.steps=2", "train.log_every=1",
        "data.workers=0", "data.shuffle_buffer=10", "checkpoint.every=0", "conditioner.context_length=16",
        "conditioner.text_width=32", "conditioner.text_depth=1", *extra])
    return train(cfg, out, progress=False)


@pytest.fixture(scope="module")
def scratch_run(captioned_shards, tmp_path_factory) -> Path:
    return _train_tc(captioned_shards, tmp_path_factory.mktemp("tc") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["scratch", "hf", "open_clip", "scratch, gated_topk"])
def test_each_text_encoder_trains_a_step(encoder, captioned_shards, tiny_hf, scratch_run, tmp_path):
    extra = {"hf": ["conditioner.text_encoder=hf", f"conditioner.text_path={tiny_hf}"],
             "open_clip": ["conditioner.text_encoder=open_clip", "conditioner.open_clip_model=",
                           "conditioner.text_heads=2"],
             "scratch, gated_topk": ["conditioner.variant=gated_topk"]}.get(encoder)
    run = scratch_run if extra is None else _train_tc(captioned_shards, tmp_path / "run", *extra)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["loss"] > 0 for r in recs)
    if encoder.endswith("gated_topk"):
        assert recs[0]["cond_gate"] == 0 and recs[1]["cond_gate"] > 0  # the gate opened after step 1
    else:  # the paper's regularisers act from the first step
        assert "cond_gate" not in recs[0] and recs[0]["cond_sparse"] > 0 and recs[0]["cond_consistency"] > 0
        assert recs[0]["loss"] > recs[0]["loss_predict"]
    assert recs[0]["cond_entropy"] > 0
    state = load_final_state(run)
    assert any(k.startswith("text.encoder.") for k in state)
    assert any(k.startswith("predictor.conditioners.") for k in state)


@pytest.mark.slow
def test_viz_attention_writes_overlays(scratch_run, captioned_shards, tmp_path):
    from PIL import Image

    from tcjepa.cli import main

    assert main(["viz", "attention", "--checkpoint", str(scratch_run), "--data", str(captioned_shards),
                 "--out", str(tmp_path / "viz"), "--samples", "3"]) == 0
    pngs = sorted((tmp_path / "viz").glob("attention_*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as im:
        assert im.width >= 128 * 6 and im.height > 128  # image + two tiles per caption word
    rec = json.loads((tmp_path / "viz" / "attention.json").read_text())
    sample = rec["samples"][0]
    assert sample["words"] == ["a", sample["caption"].split()[1], "square"]  # markers dropped
    grid = rec["grid"][0] * rec["grid"][1]
    for kind in ("attention", "overlap"):  # the paper variant also draws the overlaps its losses see
        assert len(sample[kind]) == 3 and all(len(m) == grid for m in sample[kind])
        assert all(0 <= v <= 1 for m in sample[kind] for v in m)


@pytest.mark.slow
def test_viz_attention_rejects_a_run_without_conditioner(captioned_shards, tmp_path, capsys):
    from tcjepa.cli import main

    run = _train_tc(captioned_shards, tmp_path / "ijepa", "conditioner.enabled=false", "train.steps=1")
    assert main(["viz", "attention", "--checkpoint", str(run), "--data", str(captioned_shards),
                 "--out", str(tmp_path / "viz")]) == 2
    assert "not a TC-JEPA run" in capsys.readouterr().err


def test_cli_train_tokenizer_on_shards(tmp_path, capsys):
    from tcjepa.cli import main

    shards = tmp_path / "shards"
    assert main(["data", "synthetic", "--out", str(shards), "--samples", "200", "--shard-size", "100"]) == 0
    out = tmp_path / "tok" / "caps.model"
    assert main(["data", "train-tokenizer", "--data", str(shards), "--vocab-size", "120", "--out", str(out)]) == 0
    assert "on 200 captions" in capsys.readouterr().out
    tok = build_tokenizer("sentencepiece", str(out), context_length=64)
    t = tok(["a big red circle in the top left"])
    assert tok.vocab_size <= 120 and 4 <= t.mask.sum() <= 20  # sub-word pieces, far fewer than characters
    assert main(["data", "train-tokenizer", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2


@pytest.mark.slow
def test_shards_without_captions_train_as_ijepa(tmp_path):
    """No KEY.txt at all: every sample has identity conditioning; the run still trains and logs."""
    shards = tmp_path / "nocap"
    shards.mkdir()
    write_tar(shards / "000000.tar", [m for m in labelled_members(0, 24, size=64) if not m[0].endswith(".txt")])
    run = _train_tc(shards, tmp_path / "run", "conditioner.caption_dropout=0")
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["loss"] > 0 for r in recs)
    # no caption anywhere: no (token, caption) pair, so the regularisers are 0 and the loss is I-JEPA's
    assert all(r["cond_sparse"] == 0 and r["cond_consistency"] == 0 and r["loss"] == r["loss_predict"] for r in recs)
    run = _train_tc(shards, tmp_path / "gated", "conditioner.caption_dropout=0", "conditioner.variant=gated_topk")
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[1]["cond_gate"] == 0  # gated_topk: the gate never received a gradient


def test_open_clip_tokenizer_matches_open_clip_exactly():
    from open_clip.tokenizer import SimpleTokenizer

    from data_pipelines.tokenizers import OpenCLIPTokenizer

    captions = ["a red circle above a small blue square", "", "  ", "Hello, World!! naïve café 東京 🙂 it's 3.14 &amp;",
                "word " * 100, "CAPS and   spaces\n\ttabs", "a red circle above a small blue square"]
    rng = random.Random(0)  # printable ASCII takes a fast cleaning path: it must clean the same
    alphabet = string.printable + "&;#<>" * 3
    captions += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(500)]
    captions += ["caf\u00e9 &lt;b&gt; \u201cquoted\u201d", "line\r\nbreak", "esc \x1b[31m red"]
    for length in (6, 77):
        ours, ref = OpenCLIPTokenizer(length), SimpleTokenizer(context_length=length)
        for _ in range(2):  # the second pass runs from the per-word cache
            assert torch.equal(ours(captions).ids, ref(captions, context_length=length))
    assert OpenCLIPTokenizer(8)([]).ids.shape == (0, 8)
