"""Several captions per image through the whole data path (``conditioner.max_captions``):
synthetic scenes with N captions, ``data write`` with caption lists, the loader's caption sets
and their tokens, per-caption dropout, and a paper-variant run that reads them."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import LoaderSpec, SkipTracker, make_loader, resolve_shards
from data_pipelines.synthetic import synthetic_sample, write_synthetic_shards
from data_pipelines.tokenizers import build_tokenizer, drop_captions, tokenize_caption_sets
from tests.conftest import png_bytes, write_tar


def test_synthetic_scenes_get_n_different_captions_without_changing_the_rest():
    one, eight = synthetic_sample(7, seed=3), synthetic_sample(7, seed=3, captions_per_image=8)
    assert one["png"] == eight["png"] and one["txt"] == eight["txt"]
    meta_one, meta_eight = json.loads(one["json"]), json.loads(eight["json"])
    captions = meta_eight.pop("captions")
    assert meta_one == meta_eight and "captions" not in meta_one
    assert len(captions) == len(set(captions)) == 8 and captions[0] == eight["txt"]
    assert synthetic_sample(7, seed=3, captions_per_image=8) == eight  # a pure function of (seed, index)
    # every caption names at least one of the scene's objects, by colour and shape, and none other
    from data_pipelines.synthetic import COLOR_NAMES, SHAPE_NAMES

    present = {(o["color"], o["shape"]) for o in meta_eight["objects"]}
    for c in captions:
        words = c.lower().replace(",", " ").replace(".", " ").split()
        named = {(a, b.rstrip("s")) for a, b in zip(words, words[1:]) if a in COLOR_NAMES and b.rstrip("s") in SHAPE_NAMES}
        assert named and named <= present, (c, present)
    with pytest.raises(ValueError, match="captions_per_image"):
        write_synthetic_shards("unused", samples=1, captions_per_image=0)


def test_cli_synthetic_captions_per_image(tmp_path, capsys):
    from tcjepa.cli import main

    assert main(["data", "synthetic", "--out", str(tmp_path / "s"), "--samples", "4", "--captions-per-image", "3"]) == 0
    with tarfile.open(next((tmp_path / "s").glob("*.tar"))) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 4 and all(len(m["captions"]) == 3 for m in metas)


def caption_members(key: str, txt: str | None, captions, size: int = 16) -> list[tuple[str, bytes]]:
    members = [(f"{key}.png", png_bytes((10, 20, 30), size))]
    if txt is not None:
        members.append((f"{key}.txt", txt.encode()))
    if captions is not None:
        members.append((f"{key}.json", json.dumps({"captions": captions}).encode()))
    return members


def read_eval(shards: Path, max_captions: int, tokenizer=None, workers: int = 0):
    spec = LoaderSpec(resolve_shards(str(shards)), 4, 16, train=False, max_captions=max_captions,
                      tokenizer=tokenizer, workers=workers)
    batches, tracker = [], SkipTracker()
    for batch in make_loader(spec):
        tracker.update(batch["skipped"])
        batches.append(batch)
    return batches, tracker


def test_loader_reads_caption_sets_counts_the_overflow_and_skips_bad_lists(tmp_path):
    members = []
    members += caption_members("a", "a red circle", ["two squares", "a red circle", "  ", "a star"])
    members += caption_members("b", None, ["only json"])
    members += caption_members("c", "just the txt", None)
    members += caption_members("d", "", [])  # no caption at all
    members += caption_members("e", "txt", ["1", "2", "3", "4"])  # 5 captions: one over the limit of 4
    members += caption_members("f", "fine", "not a list")
    members += caption_members("g", "fine", ["ok", 3])
    write_tar(tmp_path / "000000.tar", members)
    tok = build_tokenizer("open_clip", "", 12)
    with pytest.warns(UserWarning, match="bad_captions"):
        batches, tracker = read_eval(tmp_path, 4, tok)
    sets = {k: s for b in batches for k, s in zip(b["keys"], b["caption_sets"])}
    assert sets == {"a": ["a red circle", "two squares", "a star"], "b": ["only json"], "c": ["just the txt"],
                    "d": [], "e": ["txt", "1", "2", "3"]}
    assert tracker.counts == {"bad_captions": 2} and tracker.notes == {"captions_over_max": 1}
    firsts = {k: c for b in batches for k, c in zip(b["keys"], b["captions"])}
    assert firsts["a"] == "a red circle" and firsts["d"] == ""
    tokens = batches[0]["tokens"]
    assert tokens.ids.shape == (4, 4, 12) and tokens.has_text.shape == (4, 4)
    by_key = dict(zip(batches[0]["keys"], tokens.has_text.tolist()))
    assert by_key["a"] == [True, True, True, False] and by_key["d"] == [False] * 4
    reference = tok([s[i] if i < len(s) else "" for s in batches[0]["caption_sets"] for i in range(4)])
    assert torch.equal(tokens.ids.reshape(16, 12), reference.ids)
    # max_captions 1 keeps today's single caption (a json caption, the first in evaluation) and no sets
    single, _ = read_eval(tmp_path, 1)
    assert "caption_sets" not in single[0]
    assert {k: c for b in single for k, c in zip(b["keys"], b["captions"])}["a"] == "two squares"


def test_per_caption_dropout_equals_tokenizing_empty_captions():
    tok = build_tokenizer("open_clip", "", 10)
    sets = [["a b", "c d e"], ["f"], []]
    tokens = tokenize_caption_sets(tok, sets, 2)
    drop = torch.tensor([[True, False], [False, True], [True, True]])
    dropped = drop_captions(tokens, drop, tok([""]))
    by_hand = tokenize_caption_sets(tok, [["", "c d e"], ["f", ""], []], 2)
    # dropping the first caption of image 0 leaves "" then "c d e" (its position kept)
    assert torch.equal(dropped.ids, by_hand.ids) and torch.equal(dropped.mask, by_hand.mask)
    assert dropped.has_text.tolist() == [[False, True], [True, False], [False, False]]


def test_method_drops_each_caption_independently():
    from tcjepa.config import load_config, project_root
    from tcjepa.methods.jepa import JEPA

    cfg = load_config(project_root() / "recipes/tcjepa_quickstart.yaml",
                      ["conditioner.variant=paper", "conditioner.max_captions=3", "conditioner.caption_dropout=0.5",
                       "model.predictor_depth=1", "conditioner.text_depth=1"])
    method = JEPA(cfg)
    sets = [["a", "b", "c"]] * 64
    tokens = method.text_inputs(sets, torch.Generator().manual_seed(0))
    assert tokens.ids.shape[:2] == (64, 3)
    kept = tokens.has_text.float()
    assert 0.35 < kept.mean().item() < 0.65 and kept.sum(1).unique().numel() > 2  # per caption, not per image


def test_data_write_takes_caption_lists_and_several_columns(tmp_path):
    from data_pipelines.write import WriteOptions, write_dataset

    img = tmp_path / "img.png"
    img.write_bytes(png_bytes((200, 10, 10), 24))
    rows = [{"image": "img.png", "caption": ["a red image", "red", "a red image", ""]},
            {"image": "img.png", "caption": ["only one"]},
            {"image": "img.png", "caption": ["fine", 7]},
            {"image": "img.png", "caption": ["", " "]}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = write_dataset(str(manifest), tmp_path / "out", WriteOptions())
    assert stats["written"] == 2 and stats["skipped_by_reason"] == {"bad_row": 1, "empty_caption": 1}
    batches, _ = read_eval(tmp_path / "out", 8)
    sets = sorted(s for b in batches for s in b["caption_sets"])
    assert sets == [["a red image", "red"], ["only one"]]
    # several caption columns of a CSV
    (tmp_path / "m.csv").write_text("image,caption,alt\nimg.png,first,second\nimg.png,solo,\n")
    write_dataset(str(tmp_path / "m.csv"), tmp_path / "out2", WriteOptions(caption_column="caption,alt"))
    batches, _ = read_eval(tmp_path / "out2", 8)
    assert sorted(s for b in batches for s in b["caption_sets"]) == [["first", "second"], ["solo"]]


@pytest.mark.slow
def test_paper_variant_trains_on_eight_captions_and_logs_its_terms(tmp_path):
    from tcjepa.config import load_config, project_root
    from tcjepa.train import train
    from tests.eval_runs import TINY, TINY_TEXT

    write_synthetic_shards(tmp_path / "data", samples=48, shard_size=24, captions_per_image=8)
    overrides = [f"data.train={tmp_path / 'data'}", *TINY, *TINY_TEXT, "conditioner.context_length=48",
                 "conditioner.variant=paper", "train.steps=3", "data.workers=2",
                 "conditioner.weigh_against=mean"]  # lambda and beta as written (sum: tested in test_paper_conditioner)
    recipe = project_root() / "recipes/tcjepa_quickstart.yaml"
    run = train(load_config(recipe, [*overrides, "conditioner.max_captions=8"]), tmp_path / "eight", progress=False)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_predict", "cond_sparse", "cond_consistency", "cond_entropy"):
        assert all(key in r and r[key] >= 0 for r in recs), key
    weighted = recs[0]["loss_predict"] + 0.1 * recs[0]["cond_sparse"] + 0.5 * recs[0]["cond_consistency"]
    assert recs[0]["loss"] == pytest.approx(weighted, rel=1e-5)
    assert "captions_over_max" not in recs[-1]
    four = train(load_config(recipe, [*overrides, "conditioner.max_captions=4"]), tmp_path / "four", progress=False)
    last = json.loads((four / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["captions_over_max"] == 3 * 8  # every image has 8 captions: all of them over 4


def test_shuffled_captions_control_gives_every_image_another_images_captions_afresh_each_step():
    """``conditioner.shuffle_captions``: each step a permutation with no fixed point moves every
    image's whole caption set to another image of the batch, a different pairing each step (a
    fixed permutation would leave the wrong captions an identity of the image); off, nothing moves."""
    from tcjepa.config import load_config, project_root
    from tcjepa.methods.jepa import JEPA

    sets = [[f"scene {i} first", f"scene {i} second"] for i in range(16)]
    over = ["conditioner.max_captions=2", "conditioner.caption_dropout=0", "model.predictor_depth=1",
            "conditioner.text_depth=1"]
    quick = project_root() / "recipes/tcjepa_quickstart.yaml"
    plain = JEPA(load_config(quick, over)).text_inputs(sets, torch.Generator().manual_seed(0))
    method = JEPA(load_config(quick, [*over, "conditioner.shuffle_captions=true"]))
    rows = {tuple(plain.ids[i].flatten().tolist()): i for i in range(16)}
    pairings = []
    for step in range(2):
        shuffled = method.text_inputs(sets, torch.Generator().manual_seed(step))
        source = [rows[tuple(shuffled.ids[i].flatten().tolist())] for i in range(16)]  # whose captions image i got
        assert sorted(source) == list(range(16)) and all(s != i for i, s in enumerate(source))
        assert torch.equal(shuffled.mask, plain.mask[source]) and torch.equal(shuffled.has_text, plain.has_text[source])
        pairings.append(source)
    assert pairings[0] != pairings[1]
