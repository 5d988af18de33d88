"""What a user's folder holds (patchnet.data.detect) and the recipe a run on it gets (patchnet.training.setup)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from patchnet.data import DatasetError, detect_layout, held_out_share, open_split
from patchnet.recipe import VOC_CLASSES, RecipeError
from patchnet.training.setup import RunOptions, run_recipe

from conftest import VocWriter, write_image


def image_folder(root: Path, splits: dict[str, int], classes=("cat", "dog")) -> Path:
    """``root/<split>/<class>/<n>.jpg``; a split named '.' puts the class folders in the root."""
    for split, n in splits.items():
        for c, name in enumerate(classes):
            for i in range(n):
                write_image(root / split / name / f"{name}{i}.jpg", 40 + i, 32, seed=100 * c + i)
    return root


def roboflow(root: Path, splits=("train", "valid", "test"), n: int = 4) -> Path:
    """A Roboflow COCO export as downloaded: ``<split>/_annotations.coco.json`` beside the images, with the
    unused super-category (id 0) Roboflow adds."""
    for split in splits:
        images, anns = [], []
        for i in range(n):
            name = f"img{i}_jpg.rf.{i}abc.jpg"
            write_image(root / split / name, 64, 48, seed=i)
            images.append({"id": i, "file_name": name, "width": 64, "height": 48})
            anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 4, 30, 30], "area": 900})
        cats = [{"id": 0, "name": "pets", "supercategory": "none"}]
        cats += [{"id": 1, "name": "cat", "supercategory": "pets"}, {"id": 2, "name": "dog", "supercategory": "pets"}]
        text = json.dumps({"images": images, "annotations": anns, "categories": cats})
        (root / split / "_annotations.coco.json").write_text(text)
    return root


def csv_lists(root: Path, splits=("train", "val"), n: int = 4) -> Path:
    for split in splits:
        lines = ["path,labels"]
        for i in range(n):
            write_image(root / "images" / f"{split}{i}.jpg", 48, 40, seed=i)
            lines.append(f"images/{split}{i}.jpg,{'cat;dog' if i % 2 else 'cat'}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def voc_devkit(root: Path) -> Path:
    """``root/VOC2007`` in VOC layout (classes cat, dog, person) with train, val and test lists."""
    w = VocWriter(root / "VOC2007")
    for n, i in enumerate("abcdefgh"):
        w.add(i, 64, 48, [(("cat", "dog", "person")[n % 3], 4, 4, 40, 40)], seed=n)
    w.split("train", list("abcd"))
    w.split("val", list("ef"))
    w.split("test", list("gh"))
    return root


def test_image_folder_with_train_and_val(tmp_path):
    layout = detect_layout(image_folder(tmp_path / "pets", {"train": 3, "val": 1}))
    assert (layout.format, layout.train_split, layout.val_split, layout.val_from_train) == ("folder", "train", "val", 0)
    assert not layout.boxes and layout.data_values()["classes"] == []


def test_split_names_as_people_write_them(tmp_path):
    layout = detect_layout(image_folder(tmp_path / "d", {"Training": 2, "validation": 1, "test": 1}))
    assert (layout.train_split, layout.val_split) == ("Training", "validation")
    assert layout.splits == ["Training", "validation", "test"]


def test_folder_of_class_folders_holds_out_a_val_share(tmp_path):
    layout = detect_layout(image_folder(tmp_path / "photos", {".": 10}))
    assert (layout.train_split, layout.val_split, layout.val_from_train) == (".", "val", 0.1)


def test_only_a_train_split_holds_out_a_val_share(tmp_path):
    layout = detect_layout(image_folder(tmp_path / "d", {"train": 10}))
    assert (layout.train_split, layout.val_split, layout.val_from_train) == ("train", "val", 0.1)


def test_roboflow_export(tmp_path):
    layout = detect_layout(roboflow(tmp_path / "export"))
    assert (layout.format, layout.train_split, layout.val_split) == ("coco", "train", "valid")
    assert layout.boxes and "test" in layout.splits


def test_coco_annotations_folder(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text("{}")
    (root / "annotations" / "captions_train2017.json").write_text("{}")
    layout = detect_layout(root)
    assert (layout.format, layout.train_split, layout.val_split) == ("coco", "train2017", "val2017")


def test_csv_lists(tmp_path):
    layout = detect_layout(csv_lists(tmp_path / "lists"))
    assert (layout.format, layout.train_split, layout.val_split) == ("csv", "train", "val")


def test_voc_devkit_one_level_down(tmp_path):
    layout = detect_layout(voc_devkit(tmp_path / "VOCdevkit"))
    assert layout.root == tmp_path / "VOCdevkit" / "VOC2007"
    assert (layout.format, layout.train_split, layout.val_split, layout.boxes) == ("voc", "train", "val", True)
    assert layout.classes == ["cat", "dog", "person"]  # read from the XML: a VOC-layout export of other classes
    assert any("test" in note for note in layout.notes)


def test_voc_itself_keeps_its_twenty_classes_in_order(tmp_path):
    w = VocWriter(tmp_path / "VOC2012", classes=VOC_CLASSES)
    w.add("a", 64, 48, [("dog", 4, 4, 40, 40)])
    w.split("trainval", ["a"], labels={c: [1 if c == "dog" else -1] for c in VOC_CLASSES})
    assert detect_layout(w.root).classes == VOC_CLASSES


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda r: image_folder(r, {"train": 1, "cat": 1}), ["split folders (train)", "data.train_split"]),
        (lambda r: (image_folder(r, {"train": 1}), csv_lists(r)), ["csv and folder", "--format"]),
        (lambda r: (voc_devkit(r), roboflow(r)), ["voc and coco", "--format"]),
        (lambda r: write_image(r / "x.jpg", 8, 8), ["found no", "one folder per class"]),
        (lambda r: (r / "empty").mkdir(parents=True), ["found no"]),
    ],
)
def test_ambiguous_or_empty_folders_say_what_was_seen(tmp_path, make, words):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DatasetError) as e:
        detect_layout(root)
    for word in words:
        assert word in str(e.value)


def test_a_class_folder_named_like_a_split(tmp_path):
    root = tmp_path / "d"
    write_image(root / "train" / "a.jpg", 8, 8)  # images directly in 'train': a class, or a split?
    with pytest.raises(DatasetError, match="hold no class folders"):
        detect_layout(root)
    assert detect_layout(root, train_split=".").train_split == "."  # the user decides


def test_format_decides_between_two_layouts(tmp_path):
    root = csv_lists(image_folder(tmp_path / "d", {"train": 1}))
    assert detect_layout(root, "csv").format == "csv"
    assert detect_layout(root, "folder").format == "folder"
    with pytest.raises(DatasetError, match="voc, coco, csv, folder"):
        detect_layout(root, "yolo")


def test_missing_and_file_roots(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "f.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="is a file"):
        detect_layout(tmp_path / "f.csv")


def test_held_out_share_is_stable_and_stratified(tmp_path):
    root = image_folder(tmp_path / "photos", {".": 10})
    recipe, _ = run_recipe(root)
    train = open_split(recipe.data, ".")
    val = open_split(recipe.data, "val", classes=train.classes)
    assert (len(train), len(val)) == (18, 2)
    assert {r.image_id for r in train.records}.isdisjoint(r.image_id for r in val.records)
    assert sorted(int(r.labels.argmax()) for r in val.records) == [0, 1]  # one of each class
    # the same images whatever order the records come in
    whole = open_split(replace(recipe.data, val_from_train=0.0), ".")
    shuffled = whole.__class__(whole.name, whole.classes, whole.records[::-1])
    first = {r.image_id for r, k in zip(whole.records, held_out_share(whole, 0.1)) if k}
    second = {r.image_id for r, k in zip(shuffled.records, held_out_share(shuffled, 0.1)) if k}
    assert first == second == {r.image_id for r in val.records}


def test_run_recipe_layers(tmp_path):
    root = image_folder(tmp_path / "My Photos", {"train": 2})
    recipe, layout = run_recipe(root, options=RunOptions(epochs=3, device="cpu", output=str(tmp_path / "runs")))
    assert layout is not None and recipe.name.startswith("My_Photos")  # through the one sanitiser
    assert (recipe.train.epochs, recipe.runtime.device, recipe.train.supervision) == (3, "cpu", "images")
    assert recipe.data.classes == [] and recipe.backbone.name == "efficientnet_lite2"  # the default recipe's
    recipe, _ = run_recipe(root, overrides=["train.epochs=5", "name=x"], options=RunOptions(epochs=3))
    assert (recipe.train.epochs, recipe.name) == (5, "x")  # --set wins over the flags
    boxed, _ = run_recipe(voc_devkit(tmp_path / "VOCdevkit"))
    assert boxed.train.supervision == "both" and boxed.data.classes == ["cat", "dog", "person"]
    with pytest.raises(RecipeError, match="give a folder of images"):
        run_recipe()


def test_val_from_train_needs_a_val_name():
    from patchnet.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="val_split must name it"):
        recipe_from_dict({}, ["data.val_from_train=0.1", "data.val_split=''", "data.train_split=train"])
    assert np.isclose(recipe_from_dict({}, ["data.val_from_train=0.2", "data.val_split=val"]).data.val_from_train, 0.2)
