"""`tcjepa eval grounding`: the pointing game on hand-made attention maps (on the object: 1.0, on
the background: 0.0, flat: exactly chance), which words are scored and which are skipped, then
end to end through the CLI on tiny TC-JEPA runs of both conditioner variants, and the errors for
an I-JEPA run and for shards without instance maps."""

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.labels import IGNORE
from tcjepa.cli import main
from tcjepa.eval.grounding import Tally, WordCounts, named_objects, patch_fractions, pointing, score_batch
from tests.eval_runs import train_tiny, write_colour_shards

GRID = (4, 4)


def scene() -> tuple[torch.Tensor, dict]:
    """A 16 x 16 instance map on a 4 x 4 grid of 4-pixel patches: object 1 (a red circle) fills
    patch (0, 0) and half of patch (0, 1); object 2 (a blue square) fills patches (3, 2) and
    (3, 3); object 3 (a red star) covers one pixel of patch (2, 0)."""
    inst = torch.zeros(16, 16, dtype=torch.uint8)
    inst[0:4, 0:6] = 1
    inst[12:16, 8:16] = 2
    inst[8, 0] = 3
    meta = {"objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"},
                        {"shape": "star", "color": "red"}]}
    return inst, meta


def test_patch_fractions_are_each_patchs_share_of_the_object():
    inst, _ = scene()
    f = patch_fractions(inst, 1, GRID).reshape(GRID)
    assert f[0, 0] == 1 and f[0, 1] == 0.5 and f.sum() == 1.5
    assert patch_fractions(inst, 3, GRID).reshape(GRID)[2, 0] == pytest.approx(1 / 16)


def test_pointing_at_the_object_scores_one_at_the_background_zero_and_flat_its_chance():
    inst, _ = scene()
    f = patch_fractions(inst, 2, GRID)
    on = torch.zeros(16)
    on[14] = 1.0  # patch (3, 2): inside the square
    off = torch.zeros(16)
    off[5] = 1.0  # patch (1, 1): background
    assert pointing(on, f) == (1.0, 1.0)
    assert pointing(off, f) == (0.0, 0.0)
    hit, mass = pointing(torch.full((16,), 0.3), f)  # every patch tied: the share of patches the object touches
    assert hit == pytest.approx(2 / 16) and mass == pytest.approx(2 / 16)
    hit, mass = pointing(torch.zeros(16), f)  # no mass at all counts as flat
    assert (hit, mass) == pytest.approx((2 / 16, 2 / 16))
    half = torch.zeros(16)
    half[14], half[5] = 1.0, 1.0  # a tie between the object and the background
    assert pointing(half, f) == (0.5, 0.5)


def test_words_naming_several_objects_are_ambiguous():
    _, meta = scene()
    assert named_objects(meta, ("color", "shape")) == {
        "red": ("color", None), "blue": ("color", 2), "circle": ("shape", 1), "square": ("shape", 2),
        "star": ("shape", 3)}
    assert named_objects({"objects": "not a list"}, ("color",)) == {} and named_objects({}, ("color",)) == {}


def counts() -> dict[str, WordCounts]:
    return {"attention": WordCounts(Tally(), {}, {"ambiguous": 0, "hidden": 0, "cut": 0, "no_instance_map": 0})}


def test_score_batch_scores_unambiguous_words_and_counts_the_rest():
    """Caption tokens: [sot] a red circle , a blue square [eot]; "star" was cut off by the
    context. The map points "circle" and "blue" at their objects, "square" at the background."""
    inst, meta = scene()
    words = [("a", [1]), ("red", [2]), ("circle", [3]), (",", [4]), ("a", [5]), ("blue", [6]), ("square,", [7, 8])]
    maps = torch.zeros(1, 10, 16)
    maps[0, 3, 0] = 1.0  # circle -> patch (0, 0)
    maps[0, 6, 15] = 1.0  # blue -> patch (3, 3)
    maps[0, 7, 5], maps[0, 8, 6] = 0.5, 0.4  # square's pieces, summed: background patches
    c = counts()
    score_batch({"attention": maps}, [words], ["A red circle, a blue square, a red star"], [meta], inst[None],
                GRID, ("color", "shape"), c)
    got = c["attention"]
    assert got.scored.words == 3 and got.scored.hits == 2.0
    assert got.skipped == {"ambiguous": 1, "hidden": 0, "cut": 1, "no_instance_map": 0}
    s = got.per_attribute["shape"].summary()
    assert s["words"] == 2 and s["pointing_accuracy"] == 0.5
    assert s["mass_in_object"] == pytest.approx(0.5)  # circle: all of its mass on the object; square: none
    assert s["pointing_chance"] == pytest.approx((2 / 16 + 2 / 16) / 2)
    assert s["mass_chance"] == pytest.approx((24 / 256 + 32 / 256) / 2)
    assert got.per_attribute["color"].summary()["pointing_accuracy"] == 1.0

    hidden = inst.clone()
    hidden[hidden == 2] = 0  # the square is covered by nothing that the map shows
    c = counts()
    score_batch({"attention": maps}, [words], ["A red circle, a blue square"], [meta], hidden[None], GRID,
                ("color", "shape"), c)
    assert c["attention"].skipped["hidden"] == 2 and c["attention"].scored.words == 1
    c = counts()
    score_batch({"attention": maps}, [words], ["x"], [meta], torch.full((1, 16, 16), IGNORE, dtype=torch.uint8),
                GRID, ("color", "shape"), c)
    assert c["attention"].skipped["no_instance_map"] == 1 and c["attention"].scored.words == 0


@pytest.fixture(scope="module")
def ground_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grounding")
    assert main(["data", "synthetic", "--out", str(root / "train"), "--samples", "16", "--seed", "0",
                 "--image-size", "32"]) == 0
    assert main(["data", "synthetic", "--out", str(root / "val"), "--samples", "12", "--seed", "1",
                 "--image-size", "32"]) == 0
    size = ["model.image_size=32", "conditioner.context_length=48"]
    return {"train": root / "train", "val": root / "val", "plain": write_colour_shards(root / "plain", 6),
            "paper": train_tiny(root / "train", root / "paper", True, *size),
            "gated": train_tiny(root / "train", root / "gated", True, *size, "conditioner.variant=gated_topk"),
            "ijepa": train_tiny(root / "train", root / "ijepa", False, "model.image_size=32")}


@pytest.mark.parametrize("variant", ["paper", "gated"])
def test_eval_grounding_end_to_end(ground_data, variant, tmp_path, capsys):
    run, out = ground_data[variant], tmp_path / "g.json"
    assert main(["eval", "grounding", "--checkpoint", str(run), "--data", str(ground_data["train"]),
                 "--val-data", str(ground_data["val"]), "--json", str(out), "--set", "grounding.batch_size=5"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((run / "eval" / "grounding.json").read_text())
    assert saved == json.loads(out.read_text()) and saved["task"] == "grounding"
    m = saved["metrics"]
    assert f"grounding ({m['variant']} conditioner): {m['words']} words" in printed, printed
    assert m["variant"] == ("paper" if variant == "paper" else "gated_topk") and m["num_samples"] == 12
    assert m["words"] == sum(v["words"] for v in m["per_attribute"].values()) and m["words"] >= 12
    assert set(m["per_attribute"]) == {"color", "shape"}
    for v in (m, *m["per_attribute"].values()):
        assert 0 <= v["pointing_accuracy"] <= 1 and 0 < v["pointing_chance"] < 1
        assert 0 <= v["mass_in_object"] <= 1 and 0 < v["mass_chance"] < v["pointing_chance"]
    assert ("overlap" in m) == (variant == "paper")
    # the same words with at most 5 images
    assert main(["eval", "grounding", "--checkpoint", str(run), "--data", str(ground_data["val"]),
                 "--json", str(out), "--set", "grounding.max_samples=5", "grounding.batch_size=4"]) == 0
    assert json.loads(out.read_text())["metrics"]["num_samples"] == 5


def test_eval_grounding_errors(ground_data, capsys):
    argv = ["eval", "grounding", "--data", str(ground_data["val"])]
    assert main(argv + ["--checkpoint", str(ground_data["ijepa"])]) == 2
    assert "not a TC-JEPA run (conditioner.enabled is false)" in capsys.readouterr().err
    plain = str(ground_data["plain"])
    assert main(["eval", "grounding", "--checkpoint", str(ground_data["paper"]), "--data", plain]) == 2
    err = capsys.readouterr().err
    assert f"--data: none of the first 6 samples of {plain} has an instance map (KEY.inst.png)" in err, err
    assert main(argv + ["--checkpoint", str(ground_data["paper"]), "--set", "grounding.attributes=[size2]"]) == 2
    assert "no sample lists objects with size2 in its json" in capsys.readouterr().err


def test_eval_batches_decode_label_maps_only_when_asked(ground_data):
    """Probes and VQA never read the maps: their loaders leave them encoded."""
    from data_pipelines.loader import SkipTracker
    from tcjepa.eval.common import iter_eval_batches

    plain = next(iter_eval_batches(str(ground_data["val"]), 32, 4, "--data", SkipTracker()))
    assert "seg" not in plain and "inst" not in plain
    both = next(iter_eval_batches(str(ground_data["val"]), 32, 4, "--data", SkipTracker(), labels=True))
    assert both["seg"].shape == both["inst"].shape == (4, 32, 32)
    for inst, meta in zip(both["inst"], both["meta"]):
        ids = set(inst.unique().tolist())
        assert 1 in ids and ids <= set(range(len(meta["objects"]) + 1))  # the largest object shows; no stray id
