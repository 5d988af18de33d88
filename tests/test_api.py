"""The Python API: ``patchnet.load`` and the model object the command line also uses."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import patchnet
from patchnet.data import DatasetError, load_image

from conftest import calibrated_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return calibrated_model(tmp_path_factory.mktemp("api"))


def test_predict_takes_paths_pil_arrays_tensors_and_batches_alike(model):
    m, root = model
    path = root / "JPEGImages" / "a.jpg"
    array = load_image(path)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    by_path = m.predict(path)
    assert by_path.classes == ["cat", "dog", "person"] and by_path.scores.shape == (1, 3)
    for same in (Image.open(path), array, tensor, tensor.float() / 255):
        np.testing.assert_allclose(m.predict(same).scores, by_path.scores, rtol=1e-5)
    batch = m.predict(torch.stack([tensor, tensor]).float() / 255)
    assert batch.scores.shape == (2, 3)
    both = m.predict([path, root / "JPEGImages" / "b.jpg"])
    assert len(both) == 2 and both.probabilities is not None and both.present.dtype == bool
    assert ((both.probabilities >= 0) & (both.probabilities <= 1)).all()
    assert "Predictions(2 images" in repr(both) and set(both.to_dict()[0]) == {"cat", "dog", "person"}


def test_score_maps_and_localize(model):
    m, root = model
    path = root / "JPEGImages" / "a.jpg"
    maps = m.score_maps(path, classes=["cat", "dog"])
    assert set(maps) == {"cat", "dog"} and maps["cat"].shape == (72, 96)
    boxes = m.localize(path, classes=["cat"])
    assert boxes and all(d.class_index == 0 for d in boxes)
    x1, y1, x2, y2 = boxes[0].box
    assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 72
    assert m.localize(path, classes=["cat"], method="whole")[0].box == (0.0, 0.0, 96.0, 72.0)
    with pytest.raises(DatasetError, match="valid names: cat, dog, person"):
        m.localize(path, classes=["unicorn"])


def test_bad_images_are_one_clear_error(model):
    m, _ = model
    with pytest.raises(DatasetError, match=r"\(3, H, W\)"):
        m.predict(torch.zeros(2, 5, 5))
    with pytest.raises(DatasetError, match="does not exist"):
        m.predict("nowhere.jpg")


def test_importing_patchnet_loads_no_torch():
    code = "import sys, patchnet; assert 'torch' not in sys.modules; assert callable(patchnet.load)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_localize_command_writes_coco_results_that_pycocotools_scores(model, tmp_path):
    import json
    import shutil

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from typer.testing import CliRunner

    from patchnet.cli import app

    m, root = model
    images, anns = [], []
    for n, (name, box) in enumerate([("a", [9, 9, 51, 51]), ("d", [39, 29, 51, 41])], 1):
        shutil.copy(root / "JPEGImages" / f"{name}.jpg", tmp_path / f"{n}.jpg")
        images.append({"id": n, "file_name": f"{n}.jpg", "width": 96, "height": 72})
        anns.append({"id": n, "image_id": n, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(m.classes)]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    result = CliRunner().invoke(
        app,
        [
            "localize",
            str(tmp_path / "1.jpg"),
            str(tmp_path / "2.jpg"),
            "--checkpoint",
            str(m.predictor.state_path),
            "--classes",
            "cat",
            "--json",
            str(tmp_path / "boxes.json"),
            "--out",
            str(tmp_path / "drawn"),
        ],
    )
    assert result.exit_code == 0, result.output
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    assert boxes and {b["image_id"] for b in boxes} == {1, 2} and all(b["category_id"] == 1 for b in boxes)
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["1.png", "2.png"]
    gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "boxes.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert -1 <= ev.stats[1] <= 1  # AP at IoU 0.5 is computed


@pytest.mark.parametrize(
    "option, said",
    [
        (["--classes", "unicorn"], "unknown class name(s) unicorn; valid names: cat, dog, person"),
        (["--method", "bogus"], "the box method must be one of auto, mil, map, patch, whole, got 'bogus'"),
        (["--threshold", "1.5"], "the map's cut must lie in [0, 1]"),
    ],
)
def test_localize_command_refuses_bad_options_once_before_any_image(model, tmp_path, option, said):
    from typer.testing import CliRunner

    from patchnet.cli import app

    m, root = model
    args = ["localize", str(root / "JPEGImages"), "--checkpoint", str(m.predictor.state_path), *option]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output
    assert "skipped" not in result.output  # one error, not one per image


def test_localize_command_keeps_images_of_one_stem_apart(model, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from patchnet.cli import app

    m, root = model
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(root / "JPEGImages" / "a.jpg", tmp_path / folder / "img.jpg")
    args = [str(tmp_path / "x" / "img.jpg"), str(tmp_path / "y" / "img.jpg"), "--classes", "cat"]
    out, boxes = tmp_path / "drawn", tmp_path / "boxes.json"
    result = CliRunner().invoke(
        app,
        ["localize", *args, "--checkpoint", str(m.predictor.state_path), "--out", str(out), "--json", str(boxes)],
    )
    assert result.exit_code == 0, result.output
    assert len(list(out.iterdir())) == 2  # neither drawing overwrote the other
    assert len({b["image_id"] for b in json.loads(boxes.read_text())}) == 2


def test_eval_scores_localization_beside_the_classification_table(model, tmp_path):
    import json

    from typer.testing import CliRunner

    from patchnet.cli import app

    m, _ = model
    result = CliRunner().invoke(
        app,
        ["eval", "--checkpoint", str(m.predictor.state_path), "--split", "train", "--localize", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "CorLoc" in result.output and "detAP07" in result.output
    saved = json.loads((tmp_path / "eval_train.json").read_text())["localization"]
    assert saved["method"] == "map" and 0 <= saved["corloc"] <= 1 and saved["pairs"] == 4
    whole = CliRunner().invoke(
        app,
        [
            "eval",
            "--checkpoint",
            str(m.predictor.state_path),
            "--split",
            "train",
            "--localize",
            "--box-method",
            "whole",
            "--out",
            str(tmp_path / "w"),
        ],
    )
    assert whole.exit_code == 0 and "boxes: whole" in whole.output


def test_predictions_index_slice_and_iterate_as_one_image_predictions(model):
    m, root = model
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in "abc"]
    p = m.predict(paths)
    first, last = p[0], p[-1]
    assert isinstance(first, patchnet.api.Predictions) and len(first) == 1 and first.classes == p.classes
    np.testing.assert_array_equal(first.scores, p.scores[:1])
    np.testing.assert_array_equal(last.probabilities, p.probabilities[2:])
    np.testing.assert_array_equal(p[1:].present, p.present[1:])
    assert len(p[1:]) == 2 and len(p[5:]) == 0
    one = list(p)
    assert len(one) == 3 and all(len(q) == 1 for q in one)
    assert [q.top(1)[0] for q in p] == [t[:1] for t in p.top()]
    np.testing.assert_allclose(p[1].scores, m.predict(paths[1]).scores, rtol=1e-6)
    with pytest.raises(IndexError, match="image 3 of predictions for 3 images"):
        p[3]


def test_model_repr_says_what_it_holds(model):
    m, _ = model
    text = repr(m)
    assert text.startswith(f"Model({m.predictor.state_path}: 3 classes (cat, dog, person), backbone efficientnet_lite0")
    assert "pooling power k=5" in text and "not fused" in text and "calibrated" in text and "on cpu" in text
    m.classes = [f"c{i}" for i in range(7)]  # many classes: the first few, then an ellipsis
    try:
        assert "7 classes (c0, c1, c2, c3, ...)" in repr(m)
    finally:
        m.classes = m.predictor.classes


def test_explain_scores_once_and_a_threshold_decides_what_is_present(model):
    m, root = model
    path = root / "JPEGImages" / "b.jpg"
    e = m.explain(path)
    assert e.image.shape == (72, 96, 3) and len(e.predictions) == 1
    np.testing.assert_allclose(e.predictions.scores, m.predict(path).scores, rtol=1e-6)
    present = [c for c, f in zip(m.classes, e.predictions.present[0]) if f]
    assert list(e.maps) == (present or [e.predictions.top(1)[0][0][0]])
    everything = m.explain(path, threshold=0.0)
    assert everything.predictions.present.all() and list(everything.maps) == m.classes
    assert m.predict(path, threshold=0.0).present.all() and set(m.score_maps(path, threshold=0.0)) == set(m.classes)
    strict = m.predict(path, threshold=1.0)
    np.testing.assert_array_equal(strict.present, strict.probabilities >= 1.0)
    with pytest.raises(patchnet.api.ThresholdError, match=r"must lie in \[0, 1\], got 2"):
        m.predict(path, threshold=2)


def test_image_arrays_of_other_types_map_by_their_range_and_never_wrap():
    from patchnet.api import as_image

    wide = np.array([[[0, 257, 65535]] * 2] * 2, np.uint16)  # 16-bit: by [0, 65535], as a 16-bit file decodes
    np.testing.assert_array_equal(as_image(wide)[0, 0], np.round(np.array([0, 257, 65535]) / 65535 * 255))
    assert (as_image(wide.astype(np.int64) // 257) == as_image(wide)).all()  # 8-bit values in a wider type
    floats = np.array([[[0.0, 0.5, 1.0]], [[-1.0, 2.0, np.nan]]])
    np.testing.assert_array_equal(as_image(floats)[:, 0], [[0, 128, 255], [0, 255, 0]])
    with pytest.raises(DatasetError, match=r"must hold 0\.\.255 .* got values in \[0, 300\]"):
        as_image(np.array([[[0, 300, 5]]], np.int32))  # 300 would have wrapped to 44
