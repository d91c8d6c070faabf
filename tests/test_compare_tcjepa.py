"""The comparison script's shuffled-caption control (benchmarks/compare_tcjepa.py): the
"is it the text?" rows are only as good as the permutation that makes them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from data_pipelines.synthetic import write_synthetic_shards
from tests.conftest import load_benchmark


def read_dir(d: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(d.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_shuffled_captions_move_an_images_whole_caption_list_and_nothing_else(tmp_path):
    write_synthetic_shards(tmp_path / "train", samples=12, shard_size=5, seed=3, captions_per_image=3)
    compare = load_benchmark("compare_tcjepa")
    compare.write_shuffled_captions(tmp_path / "train", tmp_path / "shuffled")
    real, shuffled = read_dir(tmp_path / "train"), read_dir(tmp_path / "shuffled")
    assert sorted(real) == sorted(shuffled)
    caption_lists = {key: json.loads(s["json"])["captions"] for key, s in real.items()}
    moved = 0
    for key, s in shuffled.items():
        meta, real_meta = json.loads(s["json"]), json.loads(real[key]["json"])
        captions = meta.pop("captions")
        real_meta.pop("captions")
        assert meta == real_meta  # labels, objects, QA stay with their image
        assert {e: v for e, v in s.items() if e not in ("txt", "json")} == \
               {e: v for e, v in real[key].items() if e not in ("txt", "json")}
        donors = [k for k, c in caption_lists.items() if c == captions]
        assert donors, f"{key}: caption list is no image's list"
        assert s["txt"].decode() == captions[0]  # KEY.txt moves with its list
        moved += donors != [key]
    assert moved >= len(shuffled) // 2
    assert sorted(map(tuple, caption_lists.values())) == sorted(
        tuple(json.loads(s["json"])["captions"]) for s in shuffled.values())  # a permutation


def test_probe_top1_reads_the_attentive_probe_when_it_ran():
    compare = load_benchmark("compare_tcjepa")
    both = {"per_label": {"label": {"top1": 0.5, "attentive": {"top1": 0.6}},
                          "labels.count": {"top1": 0.3, "attentive": {"top1": 0.4}}}}
    assert compare.probe_top1(both) == {"top1": {"label": 0.5, "labels.count": 0.3},
                                        "attentive": {"label": 0.6, "labels.count": 0.4}}
    assert compare.probe_top1({"per_label": {"label": {"top1": 0.5}}}) == {"top1": {"label": 0.5}}


def test_summary_reports_the_targets_spread_and_rank_with_paired_differences():
    """A loss that falls because the targets shrink must show in the table: the last logged
    ``target_std`` and ``target_rankme`` per method, and their paired differences."""
    compare = load_benchmark("compare_tcjepa")
    recs = [{"step": 10, "loss": 0.3, "target_std": 0.5, "target_rankme": 30.0}, {"step": 20, "loss": 0.2, "img_per_s": 9}]
    assert compare.target_health(recs) == {"target_std": 0.5, "target_rankme": 30.0}
    assert compare.target_health([{"step": 1}]) == {"target_std": None, "target_rankme": None}

    def run(std: float, rank: float) -> dict:
        return {"top1": {"label": 0.3}, "final_loss": 0.1, "img_per_s": 10.0, "target_std": std, "target_rankme": rank}

    table = compare.summarise({"A": {0: run(0.6, 30.0), 1: run(0.62, 32.0)}, "B": {0: run(0.5, 25.0), 1: run(0.46, 24.0)}})
    head, _, a, b, diff = table.splitlines()
    assert "| target std | target RankMe |" in head
    assert "0.610 ± 0.014 | 31.0 ± 1.4" in a and "0.480 ± 0.028" in b
    assert "-0.130 ± 0.042 (0/2 seeds up)" in diff and "-6.5 ± 2.1 (0/2 seeds up)" in diff


def test_summary_reports_retrieval_recall_where_a_run_scores_text():
    """``--retrieval``: recall@1 both ways for runs that score text, blank for those that cannot."""
    compare = load_benchmark("compare_tcjepa")

    def run(r1: dict | None) -> dict:
        return {"top1": {"label": 0.3}, "final_loss": 0.1, "img_per_s": 10.0, "retrieval": r1}

    table = compare.summarise({"I-JEPA": {0: run(None)},
                               "TC-JEPA": {0: run({"image_to_text_r1": 0.25, "text_to_image_r1": 0.125})}})
    head, _, ijepa, tcjepa, diff = table.splitlines()
    assert "| retrieval i->t R@1 | retrieval t->i R@1 |" in head
    assert "| 0.250 ± 0.000 | 0.125 ± 0.000 |" in tcjepa and "| — | — |" in ijepa
