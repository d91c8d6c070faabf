"""``tcjepa report``: runs compared in a markdown table, with PIL-drawn plots."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tcjepa.cli import main
from tcjepa.config import ConfigError
from tcjepa.eval.plots import confusion_plot, log_ticks, nice_ticks, tick_label
from tcjepa.eval.report import RunInfo, draw_plots, probe_keys, read_run, unique_names, write_report


def fake_run(root: Path, conditioner: bool, probe: float, rankme: bool = False) -> Path:
    (root / "final").mkdir(parents=True)
    (root / "eval").mkdir()
    cfg = {"model": {"encoder": "vit_tiny_8", "image_size": 64}, "conditioner": {"enabled": conditioner},
           "teacher": {"update": "ema"}, "train": {"method": "jepa", "steps": 20}}
    (root / "final" / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.dumps({"step": s, "loss": 0.5 / s, "img_per_s": 50.0, "target_std": 0.5 - s / 100,
                         **({"target_rankme": 10.0 + s} if rankme else {}),
                         **({"cond_sparse": 0.3 / s} if conditioner else {}),
                         **({"probe_top1": 0.3 + s / 100} if s % 10 == 0 else {})}) for s in range(1, 21)]
    lines.insert(0, json.dumps({"step": 0, "probe_top1": 0.3}))  # train.eval_every's probe of the encoder at init
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 21, \"lo")  # a partial last line
    res = {"task": "probe", "checkpoint": str(root), "data": "d", "val_data": "v",
           "metrics": {"top1": probe, "per_label": {"label": {"top1": probe, "majority_class": 0.2,
                                                              "linear": {"top1": probe}}}}}
    (root / "eval" / "probe.json").write_text(json.dumps(res))
    if conditioner:
        zs = {"task": "zeroshot", "checkpoint": str(root), "data": "v",
              "metrics": {"top1": 0.4, "top5": 0.9, "chance_top1": 0.2, "chance_top5": 1.0, "label": "label"}}
        (root / "eval" / "zeroshot.json").write_text(json.dumps(zs))
        vqa = {"task": "vqa", "checkpoint": str(root), "data": "d",
               "metrics": {"accuracy": 0.5, "majority_baseline": 0.18, "per_type": {"color": 0.6},
                           "per_type_majority": {"color": 0.15}}}
        (root / "eval" / "vqa.json").write_text(json.dumps(vqa))
        ground = {"task": "grounding", "checkpoint": str(root), "data": "v",
                  "metrics": {"pointing_accuracy": 0.7, "pointing_chance": 0.25, "mass_in_object": 0.4,
                              "mass_chance": 0.1, "per_attribute": {"color": {"pointing_accuracy": 0.8,
                                                                              "pointing_chance": 0.3}},
                              "skipped_words": {"ambiguous": 3}}}
        (root / "eval" / "grounding.json").write_text(json.dumps(ground))
    caption = {"task": "caption", "checkpoint": str(root), "data": "d", "val_data": "v",
               "metrics": {"cider": probe * 2, "bleu4": 0.2, "blind_cider": 0.4, "blind_bleu4": 0.1, "num_train": 30,
                           "num_val": 10, "captions_cut": 2, "examples": [{"key": "k", "generated": "a"}]}}
    (root / "eval" / "caption.json").write_text(json.dumps(caption))
    seg = {"task": "segment", "checkpoint": str(root), "data": "d",
           "metrics": {"miou": probe / 2, "pixel_accuracy": 0.9, "majority_miou": 0.13, "majority_pixel_accuracy": 0.8,
                       "per_class_iou": {"circle": 0.5}, "num_classes": 6, "lr": 0.01}}
    (root / "eval" / "segment.json").write_text(json.dumps(seg))
    return root


def test_report_table_and_plots(tmp_path, capsys):
    a = fake_run(tmp_path / "a" / "run", True, 0.61, rankme=True)
    b = fake_run(tmp_path / "b" / "run", False, 0.55)
    assert unique_names([a, b]) == ["a/run", "b/run"]
    assert len(read_run(a).records) == 21  # the partial last line of a killed run is ignored
    out = tmp_path / "rep" / "report.md"
    text = write_report([a, b], out)
    assert out.read_text() == text
    assert "| a/run | TC-JEPA | vit_tiny_8 @ 64 px | 20 | 0.0250 | 50 | 30.0 |" in text
    assert "| b/run | I-JEPA |" in text
    assert "| probe label top-1 (linear) | 0.610 | 0.550 | 0.200 |" in text
    assert "| zeroshot label top-1 | 0.400 |  | 0.200 |" in text
    assert "| vqa color | 0.600 |  | 0.150 |" in text
    assert "| segment mIoU | 0.305 | 0.275 | 0.130 |" in text and "| segment pixel accuracy | 0.900 | 0.900 | 0.800 |" in text
    assert "| grounding pointing accuracy | 0.700 |  | 0.250 |" in text
    assert "| grounding attention mass in object | 0.400 |  | 0.100 |" in text
    assert "| grounding pointing accuracy, color words | 0.800 |  | 0.300 |" in text
    assert "| caption CIDEr | 1.220 | 1.100 | 0.400 |" in text  # the reference is the blind decoder's
    assert "| caption BLEU-4 | 0.200 | 0.200 | 0.100 |" in text
    assert "num_classes" not in text and "lr |" not in text  # only the headline metrics, not every number
    assert "captions_cut" not in text and "examples" not in text
    rows = [line.split(" |")[0] for line in text.splitlines() if line.startswith("| ")]
    assert rows.index("| segment mIoU") < rows.index("| grounding pointing accuracy") < rows.index("| caption CIDEr")
    assert rows.index("| caption BLEU-4") < rows.index("| zeroshot label top-1")
    for name in ("report_loss.png", "report_rankme.png", "report_target_std.png", "report_cond_sparse.png",
                 "report_probe.png", "report_accuracy.png"):
        assert f"]({name})" in text
        with Image.open(out.parent / name) as im:
            assert im.size[0] >= 700 and im.getextrema() != ((255, 255),) * 3  # something was drawn

    assert main(["report", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "| probe label top-1 (linear) |" in printed and ".png" not in printed  # no --out: no plots
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_report_rejects_broken_eval_json(tmp_path):
    run = fake_run(tmp_path / "run", False, 0.5)
    (run / "eval" / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not JSON"):
        read_run(run)


def test_ticks_and_confusion_plot(tmp_path):
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert log_ticks(0.03, 0.4) == pytest.approx([0.05, 0.1, 0.2])
    assert log_ticks(0.001, 10) == pytest.approx([0.001, 0.01, 0.1, 1.0, 10.0])
    assert [tick_label(v) for v in (0, 500, 1500, 2000, 2.5e6, 0.25, 0.005, 2.5e-5)] == \
        ["0", "500", "1,500", "2,000", "2.5e+06", "0.25", "0.005", "2.5e-05"]
    path = confusion_plot([[5, 1], [0, 4]], ["cat", "dog"], tmp_path / "c.png", "probe")
    with Image.open(path) as im:
        assert im.width > 80


def test_decoder_vqa_rows_stand_apart_and_captioning_has_no_accuracy_bar():
    from tcjepa.eval.report import eval_metrics, headline

    m = {"head": "decoder", "accuracy": 0.5, "majority_baseline": 0.2, "per_type": {"color": 0.6},
         "per_type_majority": {"color": 0.15}, "blind_accuracy": 0.3}
    assert eval_metrics({"task": "vqa", "metrics": m}, "vqa") == [
        ("vqa accuracy (decoder)", 0.5, 0.2), ("vqa color (decoder)", 0.6, 0.15), ("vqa blind decoder (no image)", 0.3, 0.2)]
    del m["head"]
    assert eval_metrics({"task": "vqa", "metrics": m}, "vqa")[0] == ("vqa accuracy", 0.5, 0.2)
    caption = {"task": "caption", "metrics": {"cider": 1.5, "bleu4": 0.2, "blind_cider": 0.4, "blind_bleu4": 0.1}}
    assert headline(caption, "caption") is None  # CIDEr is no fraction: it stays out of the accuracy bars
    assert eval_metrics(caption, "caption") == [("caption CIDEr", 1.5, 0.4), ("caption BLEU-4", 0.2, 0.1)]


def test_periodic_probe_curves_are_drawn_per_label(tmp_path, monkeypatch):
    import tcjepa.eval.plots as plots

    drawn = {}

    def fake_line_plot(series, path, *args, **kwargs):
        drawn[Path(path).name] = series
        return Path(path)

    monkeypatch.setattr(plots, "line_plot", fake_line_plot)
    recs = [{"step": s, "probe_top1": 0.2, "probe_top1/labels.color": 0.4 + s / 100} for s in (0, 10)]
    scenes = RunInfo(tmp_path / "s", "scenes", {"probe": {"labels": ["label", "labels.color"]}}, recs)
    fmnist = RunInfo(tmp_path / "f", "fmnist", {}, [{"step": 0, "probe_top1": 0.7}, {"step": 10, "probe_top1": 0.8}])
    assert probe_keys([fmnist, scenes]) == ["probe_top1", "probe_top1/labels.color"]
    draw_plots([scenes, fmnist], tmp_path / "rep.md")
    assert drawn["rep_probe.png"] == {"scenes label": ([0, 10], [0.2, 0.2]),
                                      "scenes labels.color": ([0, 10], [0.4, 0.5]),
                                      "fmnist label": ([0, 10], [0.7, 0.8])}
    draw_plots([fmnist], tmp_path / "one.md")  # one label: the curves are named by run alone
    assert drawn["one_probe.png"] == {"fmnist": ([0, 10], [0.7, 0.8])}
