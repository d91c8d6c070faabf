"""Zero-shot classification and retrieval with TC-JEPA's text-conditioned predictor as the scorer,
on a tiny trained run; the scorer against a manual computation of the training loss."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.loader import DataError, normalize
from tcjepa.config import ConfigError
from tcjepa.eval.common import read_split, topk_hits
from tcjepa.eval.retrieval import RetrievalConfig, recall_at, run_retrieval, unique_captioned
from tcjepa.eval.zeroshot import ZeroShotConfig, resolve_classes, run_zeroshot
from tests.eval_runs import train_tiny, write_colour_shards

ZS = ZeroShotConfig(num_masks=2, templates=("a {} square.",), batch_size=8)


def reference_topk(scores: list[list[float]], target: list[int], k: int) -> float:
    """Mean top-k hit of each row's target, ties broken uniformly at random: a plain-Python
    count of the candidates ranked above and level with the target, apart from the code under test."""
    hits = []
    for row, t in zip(scores, target):
        above = sum(s > row[t] for s in row)
        level = sum(s == row[t] for s in row)  # the target itself included
        hits.append(min(max((k - above) / level, 0.0), 1.0))
    return sum(hits) / len(hits)


def test_topk_hits_are_tie_aware():
    target = torch.tensor([0, 1, 2, 3])
    assert topk_hits(torch.eye(4), target, 1).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert topk_hits(torch.zeros(4, 4), target, 1).tolist() == [0.25] * 4  # a blind scorer gets chance
    assert topk_hits(torch.zeros(4, 4), target, 2).mean().item() == 0.5
    wrong = 1 - torch.eye(4)  # the true candidate always scores lowest
    assert topk_hits(wrong, target, 3).sum().item() == 0 and topk_hits(wrong, target, 4).mean().item() == 1.0


def test_recall_both_directions_and_caption_dedup():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])  # image 1 prefers caption 2
    r = recall_at(scores)
    assert r["image_to_text_r1"].tolist() == [1.0, 0.0, 1.0]
    assert r["text_to_image_r1"].tolist() == [1.0, pytest.approx(1 / 3), 0.5]  # caption 1 ties all three images
    assert unique_captioned(["a", "", "b", "a", " "]) == ([0, 2], 2, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_eval")
    data = write_colour_shards(root / "data", 48)
    return {"data": data, "tc": train_tiny(data, root / "tc", True), "ijepa": train_tiny(data, root / "ijepa")}


@pytest.mark.slow
def test_predictor_score_is_the_training_loss_reduction(runs):
    """score(image, text) = loss(no text) - loss(text), each the JEPA prediction loss (not the paper
    conditioner's regularisers) averaged over the masks."""
    from tcjepa.masks import MaskBatch
    from tcjepa.eval.scoring import build_scorer
    from tcjepa.models.vit import gather_tokens

    scorer = build_scorer(runs["tc"], "zeroshot", num_masks=2, seed=3)
    split = read_split(str(runs["data"]), 64, "--data", max_samples=3)
    images = normalize(split.images)
    texts = [split.captions[0], "a blue square."]
    errors = scorer.errors(images, [""] + texts)
    mb = scorer.masks
    for i in range(3):
        for j, text in enumerate(["", *texts]):
            losses = []
            for m in range(2):
                keep = mb.context_valid[m]
                masks = MaskBatch(mb.context_idx[m : m + 1, keep], mb.context_valid[m : m + 1, keep],
                                  mb.target_idx[m : m + 1], mb.target_valid[m : m + 1])
                with torch.no_grad():
                    h = scorer.teacher(images[i : i + 1])
                    h = F.layer_norm(h, (h.size(-1),))
                    t = gather_tokens(h, masks.target_idx.flatten(1)).view(*masks.target_idx.shape, -1)
                    scorer.student(images[i : i + 1], masks, t, scorer.tokenizer([text]))
                    losses.append(scorer.student.last_stats["loss_predict"].item())  # without the regularisers
            assert errors[i, j].item() == pytest.approx(sum(losses) / 2, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(scorer.score(images, texts), errors[:, :1] - errors[:, 1:])


@pytest.mark.slow
def test_zeroshot_writes_its_json(runs, tmp_path):
    out = tmp_path / "zs.json"
    result = run_zeroshot(runs["tc"], str(runs["data"]), cfg=ZS, json_out=out, progress=False)
    saved = json.loads((runs["tc"] / "eval" / "zeroshot.json").read_text())
    assert saved == json.loads(out.read_text()) == result
    m = saved["metrics"]
    assert {"task", "checkpoint", "data", "metrics"} <= set(saved) and saved["task"] == "zeroshot"
    assert m["top5"] == 1.0  # 3 classes: the true one is always in the top 5
    assert m["class_names"] == ["red", "green", "blue"] and m["num_samples"] == 48 and m["chance_top1"] == 1 / 3
    assert m["error_no_text"] > 0 and m["error_true_class"] > 0 and m["scorer"] == "predictor"
    again = run_zeroshot(runs["tc"], str(runs["data"]), cfg=dataclasses.replace(ZS, batch_size=5),
                         progress=False, save_to_run=False)
    assert again["metrics"]["top1"] == pytest.approx(m["top1"])  # masks are shared: batching changes nothing


@pytest.mark.slow
def test_zeroshot_top1_and_top5_equal_a_recount_of_the_scores(runs):
    """Seven candidate classes for three true ones, so that top-5 is not forced: both metrics equal
    a recount of the predictor's own image-prompt scores (error without text minus with it)."""
    from tcjepa.eval.scoring import build_scorer

    names = ("red", "green", "blue", "crimson", "lime", "navy", "grey")
    cfg = dataclasses.replace(ZS, class_names=names, max_samples=12, batch_size=12)  # one batch, as recounted
    m = run_zeroshot(runs["tc"], str(runs["data"]), cfg=cfg, progress=False, save_to_run=False)["metrics"]
    scorer = build_scorer(runs["tc"], "zeroshot", num_masks=cfg.num_masks, seed=cfg.seed)
    split = read_split(str(runs["data"]), 64, "--data", max_samples=12)
    err = scorer.errors(normalize(split.images), [""] + [cfg.templates[0].format(n) for n in names])
    scores = (err[:, :1] - err[:, 1:]).tolist()
    target = [meta["label"] for meta in split.metas]
    assert m["num_classes"] == 7 and m["chance_top5"] == 5 / 7
    assert m["top1"] == pytest.approx(reference_topk(scores, target, 1), abs=1e-6)
    assert m["top5"] == pytest.approx(reference_topk(scores, target, 5), abs=1e-6)
    assert m["top5"] < 1.0 or reference_topk(scores, target, 5) == 1.0


@pytest.mark.slow
def test_zeroshot_class_names_from_config_and_errors(runs, tmp_path):
    cfg = dataclasses.replace(ZS, class_names=("crimson", "lime", "navy", "grey"), max_samples=6)
    m = run_zeroshot(runs["tc"], str(runs["data"]), cfg=cfg, progress=False, save_to_run=False)["metrics"]
    assert m["num_classes"] == 4 and m["num_samples"] == 6 and m["top5"] == 1.0
    with pytest.raises(DataError, match="lists only 2 classes"):
        run_zeroshot(runs["tc"], str(runs["data"]), cfg=dataclasses.replace(ZS, class_names=("a", "b")),
                     progress=False, save_to_run=False)
    with pytest.raises(DataError, match=r"--data: no sample has an integer 'labels.color' in its json \(zeroshot.label; "
                                        r"--set zeroshot.label=KEY names another\); its json keys are: label, label_name"):
        run_zeroshot(runs["tc"], str(runs["data"]), cfg=dataclasses.replace(ZS, label="labels.color"),
                     progress=False, save_to_run=False)


def test_zeroshot_class_names_need_a_name_per_class():
    metas = [{"label": 0, "label_name": "cat"}, {"label": 2, "label_name": "dog"}]
    with pytest.raises(DataError, match=r"classes \[1\] of label never appear"):
        resolve_classes(metas, ["k0", "k1"], ZS, "--data")
    with pytest.raises(DataError, match="sample k1 has no 'label_name'"):
        resolve_classes([metas[0], {"label": 1}], ["k0", "k1"], ZS, "--data")
    with pytest.raises(DataError, match="named 'cat' in sample k0 but 'kitten' in sample k1"):
        resolve_classes([metas[0], {"label": 0, "label_name": "kitten"}], ["k0", "k1"], ZS, "--data")
    names, labels = resolve_classes([metas[0], {"label": 1, "label_name": "cow"}], ["k0", "k1"], ZS, "--data")
    assert names == ["cat", "cow"] and labels.tolist() == [0, 1]


@pytest.mark.slow
def test_retrieval_writes_its_json(runs, tmp_path):
    """Recall@1/5/10 both ways equal a recount of the scorer's own block scores (blocks of 12,
    so that no k is forced), and the JSON on disk is the result returned."""
    from tcjepa.eval.scoring import build_scorer

    cfg = RetrievalConfig(block_size=12, max_samples=28, num_masks=1, batch_size=12)  # a block at once, as recounted
    result = run_retrieval(runs["tc"], str(runs["data"]), cfg=cfg, json_out=tmp_path / "r.json", progress=False)
    m = json.loads((runs["tc"] / "eval" / "retrieval.json").read_text())["metrics"]
    assert m == result["metrics"] == json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["block_size"] == 12 and m["num_blocks"] == 2 and m["chance_r1"] == 1 / 12
    assert m["left_out"] == {"no_caption": 0, "duplicate_caption": 0, "last_partial_block": 4}
    scorer = build_scorer(runs["tc"], "retrieval", num_masks=cfg.num_masks, seed=cfg.seed)
    split = read_split(str(runs["data"]), 64, "--data", max_samples=28)
    blocks = [scorer.score(normalize(split.images[b : b + 12]), split.captions[b : b + 12]).tolist() for b in (0, 12)]
    diagonal = list(range(12))
    for k in (1, 5, 10):
        i2t = sum(reference_topk(s, diagonal, k) for s in blocks) / 2
        t2i = sum(reference_topk([list(c) for c in zip(*s)], diagonal, k) for s in blocks) / 2
        assert m[f"image_to_text_r{k}"] == pytest.approx(i2t, abs=1e-6), k
        assert m[f"text_to_image_r{k}"] == pytest.approx(t2i, abs=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_text_tasks_reject_a_run_without_text(task, runs, capsys):
    from tcjepa.cli import main

    assert main(["eval", task, "--checkpoint", str(runs["ijepa"]), "--data", str(runs["data"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "conditioner.enabled false: an image-only model" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_zeroshot_and_retrieval_settings(runs, tmp_path, capsys):
    from tcjepa.cli import main

    base = ["--checkpoint", str(runs["tc"]), "--data", str(runs["data"])]
    assert main(["eval", "zeroshot", *base, "--set", "zeroshot.num_masks=1", "zeroshot.max_samples=6",
                 "--json", str(tmp_path / "z.json")]) == 0
    out = capsys.readouterr().out
    assert "zero-shot over 3 classes, 6 samples" in out and "chance" in out
    assert main(["eval", "zeroshot", *base, "--set", "zeroshot.templates=[a photo]"]) == 2
    assert "every template needs a {}" in capsys.readouterr().err
    assert main(["eval", "retrieval", *base, "--set", "retrieval.blocksize=4"]) == 2
    assert "unknown key retrieval.blocksize (did you mean retrieval.block_size?)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only zeroshot"):
        from tcjepa.eval.tasks import task_config

        task_config("zeroshot", runs["tc"], ["probe.epochs=1"])


@pytest.mark.slow
def test_zeroshot_with_label_and_label_name_needs_no_settings(runs, tmp_path, capsys, monkeypatch):
    """Shards whose json has `label` and `label_name` (what `data write` gives a labelled manifest)
    are classified with no --set; shards without class names are refused before the model loads."""
    from tcjepa.cli import main
    import tcjepa.eval.scoring
    from tests.conftest import png_bytes, write_tar

    assert main(["eval", "zeroshot", "--checkpoint", str(runs["tc"]), "--data", str(runs["data"]),
                 "--json", str(tmp_path / "z.json")]) == 0
    assert json.loads((tmp_path / "z.json").read_text())["metrics"]["class_names"] == ["red", "green", "blue"]
    capsys.readouterr()

    def no_work(*a, **k):
        raise AssertionError("the scorer was built before the data was checked")

    monkeypatch.setattr(tcjepa.eval.scoring, "build_scorer", no_work)
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    write_tar(unnamed / "000000.tar", [("000000.png", png_bytes((1, 2, 3))), ("000000.json", b'{"label": 2}')])
    assert main(["eval", "zeroshot", "--checkpoint", str(runs["tc"]), "--data", str(unnamed)]) == 2
    err = capsys.readouterr().err
    assert "--data: no sample has a 'label_name' in its json; zero-shot needs class names" in err
    assert "--set zeroshot.class_names=[...]; its json keys are: label" in err
