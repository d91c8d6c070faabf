"""Tokenizers' decode: ids back to text, markers and padding left out (the caption decoder's output)."""

from data_pipelines.tokenizers import HFTokenizer, OpenCLIPTokenizer, build_tokenizer, train_sentencepiece


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
