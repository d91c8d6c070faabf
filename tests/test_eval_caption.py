"""`tcjepa eval caption` and `eval vqa --set vqa.head=decoder`: the scoring against pycocoevalcap's
scorers called directly, tokenizers' decode, the decoder on stand-in features that encode the
caption (it writes it) or are noise (it scores as the blind decoder), greedy against beam
search, answer normalisation, generative VQA on features that encode the answer, then both
end to end through the CLI on tiny synthetic shards and a tiny run, with their errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipelines.tokenizers import HFTokenizer, OpenCLIPTokenizer, build_tokenizer, train_sentencepiece
from tcjepa.cli import main
from tcjepa.eval.caption import (BOS, EOS, CaptionConfig, PAPER_DECODER, TextDecoder, beam_decode, caption_metrics,
                                 caption_scores, check_config, greedy_decode, next_logprobs, score_tokens)
from tcjepa.eval.probe import Features
from tcjepa.eval.vqa import VQAConfig, decoder_metrics, normalize_answer
from tests.conftest import write_tar
from tests.eval_runs import colour_members, train_tiny

CANDIDATES = ["A red circle, on the LEFT.", "two Blue squares at the top-right!", "", "a green star"]
REFERENCES = [["a red circle on the left", "A red circle (left side)."],
              ["Two blue squares in the top right corner.", "two blue squares, top right"],
              ["a yellow triangle"],
              ["A big green star near the bottom.", "a green star", "green star at the bottom"]]


def test_scores_equal_pycocoevalcap_on_the_pinned_tokenisation():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    assert score_tokens("A Red-square, at the TOP_left!  (big) it's 2.5") == "a red square at the top left big it s 2 5"
    assert score_tokens(" ...! ") == ""
    ours = caption_scores(CANDIDATES, REFERENCES)
    gts = {i: [score_tokens(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [score_tokens(c)] for i, c in enumerate(CANDIDATES)}
    assert gts[1] == ["two blue squares in the top right corner", "two blue squares top right"]
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert ours["cider"] == pytest.approx(cider, abs=1e-12) and ours["bleu4"] == pytest.approx(bleu[3], abs=1e-12)
    assert ours["per_image_cider"] == pytest.approx(list(per_image))
    assert ours["per_image_cider"][2] == 0 and ours["per_image_cider"][0] > 1  # the empty caption scores nothing
    exact = caption_scores([refs[0] for refs in REFERENCES], REFERENCES)  # a reference itself scores far higher
    assert exact["cider"] > ours["cider"] and exact["bleu4"] > ours["bleu4"]
    with pytest.raises(ValueError, match="2 candidates for 4 reference sets"):
        caption_scores(CANDIDATES[:2], REFERENCES)


def test_tokenizers_decode_their_ids(tmp_path):
    from transformers import BertTokenizerFast

    clip = OpenCLIPTokenizer(32)
    t = clip(["A Red square, at the top-left!"])
    assert clip.decode(t.ids[0][t.mask[0]].tolist()) == "a red square , at the top - left !"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cy", "##an", "circle"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path / "wp")
    wp = HFTokenizer(str(tmp_path / "wp"), context_length=8)
    t = wp(["a cyan circle"])
    assert wp.decode(t.ids[0].tolist()) == "a cyan circle"  # CLS, SEP and padding left out
    captions = [f"a {c} circle on the {p}" for c in ("red", "green", "blue") for p in ("left", "right")] * 20
    sp = build_tokenizer("sentencepiece", str(train_sentencepiece(captions, tmp_path / "sp.model", vocab_size=30)), 24)
    t = sp(["a green circle on the right"])
    assert sp.decode(t.ids[0].tolist()) == "a green circle on the right"


CAPTIONS = ["a red circle on the left", "a blue square at the top", "two green stars near the bottom right",
            "a yellow triangle in the middle", "a small pink diamond on the right", "three purple circles at the top"]


def stand_in(n: int, seed: int, informative: bool) -> tuple[torch.Tensor, list[list[str]]]:
    """Patch features [n, 4, 16] (fp16, as extracted) of images whose caption is one of CAPTIONS:
    the caption's one-hot in every patch plus noise, or (not ``informative``) noise alone."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(CAPTIONS), (n,), generator=g)
    x = 0.1 * torch.randn(n, 4, 16, generator=g)
    if informative:
        x += F.one_hot(ids, 16)[:, None].float()
    return x.half(), [[CAPTIONS[i]] for i in ids.tolist()]


SMALL = CaptionConfig(depth=1, width=64, heads=2, context_length=16, epochs=20, lr=3e-3, batch_size=32)


def test_decoder_writes_the_caption_the_features_encode_and_not_noise():
    tok = OpenCLIPTokenizer(SMALL.context_length + 1)
    m, texts = caption_metrics(*stand_in(120, 0, True), *stand_in(30, 1, True), tok, SMALL)
    assert m["cider"] > 9.5 and m["bleu4"] > 0.95, m  # every caption reproduced (CIDEr-D of a copy: 10)
    assert m["blind_cider"] < 3 and m["cider"] > m["blind_cider"] + 6, m
    assert len(set(texts["blind"])) <= 2 and texts["generated"][0] in CAPTIONS
    assert m["num_train"] == m["num_train_captions"] == 120 and m["num_val"] == 30 and m["captions_cut"] == 0
    noise, _ = caption_metrics(*stand_in(120, 0, False), *stand_in(30, 1, False), tok, SMALL)
    assert abs(noise["cider"] - noise["blind_cider"]) < 1.0, noise

    cut, _ = caption_metrics(*stand_in(40, 0, True), *stand_in(10, 1, True), tok,
                             CaptionConfig(depth=1, width=32, heads=2, context_length=8, epochs=1, blind_baseline=False))
    assert cut["captions_cut"] == sum(len(c.split()) > 6 for refs in stand_in(40, 0, True)[1] for c in refs) > 0
    assert "blind_cider" not in cut


def small_decoder(vocab: int = 14, seed: int = 0) -> tuple[TextDecoder, list]:
    """A fixed random decoder whose weights (std 0.5, not 0.02) give peaked next-token distributions
    that depend on the image, and its memory of 48 random images."""
    torch.manual_seed(seed)
    model = TextDecoder(vocab, 8, 4, CaptionConfig(depth=2, width=32, heads=2, context_length=12)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(std=0.5)
        return model, model.image_memory(torch.randn(48, 4, 8))


def logprob(model: TextDecoder, memory, i: int, tokens: list[int]) -> float:
    """Teacher-forced log-probability of ``tokens`` after BOS, for sequence ``i`` of ``memory``."""
    ids = torch.tensor([[BOS, *tokens]])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1], [(k[i : i + 1], v[i : i + 1]) for k, v in memory])
    return sum(float(next_logprobs(logits[:, : p + 1])[0, ids[0, p + 1]]) for p in range(len(tokens)))


def test_decoding_with_the_cache_equals_the_full_pass():
    model, memory = small_decoder()
    memory = [(k[:3], v[:3]) for k, v in memory]
    ids = torch.randint(5, 14, (3, 7))
    with torch.no_grad():
        full, _ = model(ids, memory)
        step, cache = model(ids[:, :3], memory)
        steps = [step]
        for t in range(3, 7):
            step, cache = model(ids[:, t : t + 1], memory, cache)
            steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_greedy_and_beam_search():
    """Beam 1 is greedy decoding; a beam wide enough to keep every hypothesis finds the most likely
    sequence (checked against all of them); the reported scores are the sequences' log-probabilities."""
    import itertools

    model, memory = small_decoder()
    prefix = torch.full((48, 1), BOS)
    greedy, g_score = greedy_decode(model, memory, prefix, 11)
    one, one_score = beam_decode(model, memory, prefix, 11, 1)
    assert one == greedy and torch.equal(one_score, g_score)
    assert len({tuple(t) for t in greedy}) > 20 and any(len(t) < 11 for t in greedy)  # varied, some end early
    for i in (0, 7, 30):  # the end marker's log-probability included when the sequence ended
        ended = [EOS] if len(greedy[i]) < 11 else []
        assert logprob(model, memory, i, greedy[i] + ended) == pytest.approx(float(g_score[i]), abs=1e-4)
    # Beam search is no search for the optimum: a wider beam can lose the greedy path and end lower.
    # On this fixed model it never does, for beams of 2 and 4 (on other seeds a few sequences of 48 do).
    for beam in (2, 4):
        _, b_score = beam_decode(model, memory, prefix, 11, beam)
        assert (b_score >= g_score - 1e-5).all() and (b_score > g_score + 1e-4).sum() > 10, (beam, b_score - g_score)

    small, memory = small_decoder(vocab=8, seed=1)  # 3 word tokens and the end marker; 3 steps: 40 sequences
    words = [5, 6, 7]
    candidates = [[*w, EOS] for n in range(3) for w in itertools.product(words, repeat=n)]
    candidates += [list(w) for w in itertools.product(words, repeat=3)]  # cut at max_new, no end marker
    found, score = beam_decode(small, memory, prefix, 3, 27)
    for i in range(0, 48, 6):
        scores = [logprob(small, memory, i, c) for c in candidates]
        assert float(score[i]) == pytest.approx(max(scores), abs=1e-4)
        best = candidates[scores.index(max(scores))]
        assert found[i] == [t for t in best if t != EOS]


def test_configs_and_the_paper_preset():
    check_config(CaptionConfig(**PAPER_DECODER))
    assert PAPER_DECODER["depth"] == 12
    from tcjepa.config import ConfigError

    with pytest.raises(ConfigError, match="caption.heads 3 must divide caption.width 128"):
        check_config(CaptionConfig(heads=3))
    with pytest.raises(ConfigError, match="caption.context_length must be >= 3"):
        check_config(CaptionConfig(context_length=2))


def test_the_runs_tokenizer_is_used_and_open_clip_otherwise(tmp_path):
    from data_pipelines.tokenizers import SentencePieceTokenizer
    from tcjepa.config import load_config, project_root
    from tcjepa.eval.caption import caption_tokenizer

    model = train_sentencepiece(CAPTIONS * 20, tmp_path / "sp.model", vocab_size=40)
    cfg = load_config(project_root() / "recipes/tcjepa_quickstart.yaml",
                      ["conditioner.tokenizer=sentencepiece", f"conditioner.tokenizer_path={model}"])
    assert isinstance(caption_tokenizer(cfg, 20), SentencePieceTokenizer)
    plain = load_config(project_root() / "recipes/ijepa_quickstart.yaml")
    tok = caption_tokenizer(plain, 20)
    assert isinstance(tok, OpenCLIPTokenizer) and tok.context_length == 20


def test_vqa_head_is_classifier_or_decoder():
    from tcjepa.config import ConfigError
    from tcjepa.eval.vqa import check_config as check_vqa

    assert VQAConfig().head == "classifier"
    with pytest.raises(ConfigError, match="vqa.head must be classifier or decoder, got 'generator'"):
        check_vqa(VQAConfig(head="generator"))


def test_normalize_answer_as_vqa_v2():
    assert normalize_answer("Two") == "2" and normalize_answer("none") == "0" and normalize_answer("ten") == "10"
    assert normalize_answer("The red circle.") == "red circle"
    assert normalize_answer("  an   Apple ") == "apple"
    assert normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("top-left!") == "top left" and normalize_answer("yes, it is") == "yes it is"
    assert normalize_answer("man's") == "man's"


COLOURS, SHAPES, PLACES = ("red", "green", "blue", "yellow"), ("circle", "square", "star"), ("top left", "bottom right")


def qa_stand_in(n: int, seed: int) -> tuple[Features, tuple[list[int], list[str], list[str], list[str]]]:
    """Images whose patch features encode their colour, shape, count and place (one-hots in
    separate channels); one question of each kind per image, answered by the image alone."""
    g = torch.Generator().manual_seed(seed)
    c, s, k, p = (torch.randint(0, m, (n,), generator=g) for m in (4, 3, 3, 2))
    x = 0.1 * torch.randn(n, 4, 16, generator=g)
    x[:, :, :4] += F.one_hot(c, 4)[:, None]
    x[:, :, 4:7] += F.one_hot(s, 3)[:, None]
    x[:, :, 7:10] += F.one_hot(k, 3)[:, None]
    x[:, :, 10:12] += F.one_hot(p, 2)[:, None]
    image, questions, answers, types = [], [], [], []
    for i in range(n):
        for q, a, t in (("What color is the shape?", COLOURS[c[i]], "color"), ("What shape is it?", SHAPES[s[i]], "shape"),
                        ("How many shapes are there?", ("one", "two", "three")[k[i]], "count"),
                        ("Where is the shape?", PLACES[p[i]], "position")):
            image.append(i)
            questions.append(q)
            answers.append(a)
            types.append(t)
    feats = Features(x.float().mean(1), x.half(), [{}] * n, [f"{seed}-{i}" for i in range(n)], {})
    return feats, (image, questions, answers, types)


def test_generative_vqa_reads_the_answer_the_features_encode():
    (ftrain, qtrain), (ftest, qtest) = qa_stand_in(150, 0), qa_stand_in(40, 1)
    cfg = VQAConfig(epochs=25, width=64, heads=2, text_depth=0, fusion_depth=1, lr=3e-3, batch_size=64,
                    blind_baseline=True, head="decoder")
    m = decoder_metrics(qtrain, qtest, ftrain, ftest, OpenCLIPTokenizer(16), cfg, torch.device("cpu"), False)
    assert m["head"] == "decoder" and m["accuracy"] >= 0.99, m
    assert set(m["per_type"]) == {"color", "shape", "count", "position"} and min(m["per_type"].values()) >= 0.95
    assert m["blind_accuracy"] < 0.6 and m["blind_accuracy"] <= m["per_type_majority_overall"] + 0.1, m
    assert m["num_answers"] == 12 and m["unseen_test_answers"] == 0 and m["num_test_questions"] == 160
    assert m["majority_answer"] in {"1", "2", "3", "top left", "bottom right"}  # counts compare as digits
    assert all(normalize_answer(e["generated"]) == normalize_answer(e["answer"]) for e in m["examples"])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caption")
    for name, samples, seed in (("train", 48, 0), ("val", 16, 1)):
        assert main(["data", "synthetic", "--out", str(root / name), "--samples", str(samples), "--seed", str(seed),
                     "--shard-size", "32", "--image-size", "32", "--captions-per-image", "3"]) == 0
    bare = root / "bare"  # images and json, no caption
    bare.mkdir()
    write_tar(bare / "000000.tar", [m for m in colour_members(0, 6, size=32) if not m[0].endswith(".txt")])
    run = train_tiny(root / "train", root / "run", False, "model.image_size=32")
    return {"train": root / "train", "val": root / "val", "bare": bare, "run": run}


E2E = ["caption.epochs=2", "caption.depth=1", "caption.width=32", "caption.heads=2", "caption.context_length=24",
       "caption.batch_size=16"]


def test_eval_caption_end_to_end(caption_data, tmp_path, capsys):
    run, out = caption_data["run"], tmp_path / "caption.json"
    argv = ["eval", "caption", "--checkpoint", str(run), "--data", str(caption_data["train"]), "--val-data",
            str(caption_data["val"]), "--json", str(out), "--set", *E2E, "caption.beam_size=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "captioning: 16 val images, 48 references (decoder trained on 48 images, 144 captions" in printed, printed
    assert "CIDEr  BLEU-4" in printed and "blind decoder (no image)" in printed and "beam 2" in printed
    saved = json.loads((run / "eval" / "caption.json").read_text())
    assert saved["task"] == "caption" and saved == json.loads(out.read_text())
    m = saved["metrics"]
    for key in ("cider", "bleu4", "blind_cider", "blind_bleu4"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert m["num_train"] == 48 and m["num_val"] == 16 and m["num_train_captions"] == 144
    assert 0 < m["captions_cut"] < 144  # the full synthetic captions run past 22 tokens, the partial ones do not
    assert m["no_caption"] == {"train": 0, "val": 0} and set(m["skipped"]) == {"train", "val"}
    assert m["method"] == "I-JEPA" and m["weights"] == "teacher" and m["decoding"] == "beam 2"
    example = m["examples"][0]
    assert set(example) == {"key", "generated", "blind", "references", "cider"} and len(m["examples"]) == 8
    assert len(example["references"]) == 3 and isinstance(example["generated"], str)
    assert saved["config"]["beam_size"] == 2 and "per_image_cider" not in m
    png = Path(saved["plots"][0])
    assert png == run / "eval" / "caption_examples.png"
    with Image.open(png) as im:
        assert im.width >= 128 + 520 and im.height >= 4 * 128 and im.getextrema() != ((255, 255),) * 3


def test_eval_vqa_decoder_end_to_end(caption_data, tmp_path, capsys):
    argv = ["eval", "vqa", "--checkpoint", str(caption_data["run"]), "--data", str(caption_data["train"]),
            "--val-data", str(caption_data["val"]), "--json", str(tmp_path / "vqa.json"), "--set", "vqa.head=decoder",
            "vqa.epochs=1", "vqa.width=32", "vqa.heads=2", "vqa.text_depth=0", "vqa.fusion_depth=1",
            "vqa.blind_baseline=true"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "VQA decoder" in printed and "blind decoder (no image)" in printed and "(decoder trained on" in printed
    m = json.loads((tmp_path / "vqa.json").read_text())["metrics"]
    assert m["head"] == "decoder" and 0 <= m["accuracy"] <= 1 and 0 <= m["blind_accuracy"] <= 1
    assert set(m["per_type"]) == {"color", "count", "position", "shape", "yes/no"} and m["num_test_images"] == 16
    assert {"question", "generated", "answer", "key"} <= set(m["examples"][0])


def test_eval_caption_errors_come_before_the_model(caption_data, capsys, monkeypatch):
    import tcjepa.checkpoint

    def no_model(*a, **k):
        raise AssertionError("the encoder was loaded before the data was checked")

    monkeypatch.setattr(tcjepa.checkpoint, "load_encoder", no_model)
    base = ["eval", "caption", "--checkpoint", str(caption_data["run"]), "--data", str(caption_data["train"])]
    bare = str(caption_data["bare"])
    assert main([*base, "--val-data", bare]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --val-data: none of the first 6 samples of {bare} has a caption (KEY.txt or KEY.json "
                   "'captions'); its json keys are: label, label_name"), err
    assert main(base) == 2
    assert "--val-data: captioning needs a validation split" in capsys.readouterr().err
    assert main([*base, "--val-data", str(caption_data["val"]), "--set", "caption.depht=2"]) == 2
    assert "unknown key caption.depht (did you mean caption.depth?)" in capsys.readouterr().err
    for name in [m for m in sys.modules if m.split(".")[0] == "pycocoevalcap"] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert main([*base, "--val-data", str(caption_data["val"])]) == 2
    assert capsys.readouterr().err.strip() == ("error: eval caption scores with pycocoevalcap (CIDEr-D, BLEU-4), which "
                                               "is not installed: pip install 'tcjepa[caption]'")
