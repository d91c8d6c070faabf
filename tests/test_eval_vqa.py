"""VQA on a frozen encoder: data handling, the head, and a short end-to-end run on synthetic QA
that must beat the majority-answer baseline."""

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import DataError
from data_pipelines.tokenizers import OpenCLIPTokenizer
from tcjepa.eval.vqa import VQAConfig, VQAHead, collect_qa, run_vqa, to_qaset
from tests.eval_runs import train_tiny

FAST = VQAConfig(epochs=15, width=64, heads=2, fusion_depth=1, lr=2e-3, batch_size=64)


def test_collect_qa_and_compact_vocabulary():
    metas = [{"qa": [{"question": "What color is it?", "answer": " Red", "type": "color"}]},
             {},  # no questions: fine
             {"qa": [{"question": "How many?", "answer": "two"}]}]
    image, questions, answers, types = collect_qa(metas, ["a", "b", "c"], "--data")
    assert image == [0, 2] and answers == ["red", "two"] and types == ["color", "all"]
    tok = OpenCLIPTokenizer(8)
    train, vocab = to_qaset(image, questions, answers, types, tok, None)
    assert train.ids.max() == len(vocab) + 1 and (train.ids[~train.mask] == 0).all()
    test, _ = to_qaset([0], ["What shape is it?"], ["circle"], ["shape"], tok, vocab)
    assert (test.ids[test.mask] == 1).sum() == 1  # "shape" never occurs in training questions: unknown
    with pytest.raises(DataError, match=r"sample b: qa\[0\] needs string 'question' and 'answer'"):
        collect_qa([{}, {"qa": [{"question": "q"}]}], ["a", "b"], "--data")
    with pytest.raises(DataError, match="no sample has question/answer pairs"):
        collect_qa([{}], ["a"], "--val-data")


def test_head_shares_image_keys_between_questions():
    torch.manual_seed(0)
    head = VQAHead(20, 8, image_dim=12, num_patches=4, num_answers=5, cfg=FAST).eval()
    ids = torch.randint(2, 20, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    images = torch.randn(2, 4, 12)
    where = torch.tensor([1, 0, 1])
    shared = head(ids, mask, images, where)
    torch.testing.assert_close(shared, head(ids, mask, images[where]), rtol=1e-5, atol=1e-6)
    assert shared.shape == (3, 5)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory) -> dict[str, Path]:
    from data_pipelines.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("vqa")
    train = root / "train"
    test = root / "test"
    write_synthetic_shards(train, samples=240, shard_size=120, seed=0)
    write_synthetic_shards(test, samples=80, shard_size=80, seed=1)
    return {"train": train, "test": test, "run": train_tiny(train, root / "run")}


@pytest.mark.slow
def test_vqa_head_beats_the_majority_answer(vqa_run, tmp_path):
    result = run_vqa(vqa_run["run"], str(vqa_run["train"]), str(vqa_run["test"]), FAST,
                     json_out=tmp_path / "vqa.json", progress=False)
    saved = json.loads((vqa_run["run"] / "eval" / "vqa.json").read_text())
    assert saved == result and saved["task"] == "vqa"
    m = saved["metrics"]
    assert m["accuracy"] > m["majority_baseline"] + 0.1, m
    assert set(m["per_type"]) == {"color", "count", "position", "shape", "yes/no"}
    assert m["num_test_images"] == 80 and m["num_test_questions"] > 200
    assert 0 < m["per_type_majority_overall"] < 1 and m["majority_answer"] in ("yes", "no", "one", "zero", "two")


@pytest.mark.slow
def test_vqa_cli_needs_a_test_split(vqa_run, capsys):
    from tcjepa.cli import main

    assert main(["eval", "vqa", "--checkpoint", str(vqa_run["run"]), "--data", str(vqa_run["train"])]) == 2
    assert "--val-data: VQA needs a test split" in capsys.readouterr().err
    assert main(["eval", "vqa", "--checkpoint", str(vqa_run["run"]), "--data", str(vqa_run["train"]),
                 "--val-data", str(vqa_run["test"]), "--set", "vqa.heads=3"]) == 2
    assert "vqa.heads 3 must divide vqa.width 128" in capsys.readouterr().err
