import json
import logging

import numpy as np
import pytest
from PIL import Image

from patchnet.data import DatasetError, image_size, load_image, open_split, read_coco, read_voc
from patchnet.recipe import DataConfig

from conftest import CLASSES, write_image


def test_voc_reader_converts_boxes_and_reads_class_lists(voc):
    voc.add("001", 100, 80, [("cat", 11, 21, 50, 60), ("person", 1, 1, 100, 80, 1)])
    voc.add("002", 64, 64, [("dog", 5, 5, 30, 30)])
    voc.split("train", ["001", "002"], {"cat": [1, -1], "dog": [-1, 1], "person": [0, 1]})
    ds = read_voc(voc.root, "train", CLASSES)
    assert ds.classes == CLASSES and len(ds) == 2
    r = ds.records[0]
    assert (r.width, r.height) == (100, 80)
    # VOC's 1-based inclusive pixels become continuous 0-based coordinates
    np.testing.assert_allclose(r.boxes, [[10, 20, 50, 60], [0, 0, 100, 80]])
    assert r.box_classes.tolist() == [0, 2] and r.box_difficult.tolist() == [False, True]
    assert r.labels.tolist() == [1, -1, 0]
    # the lists are the image-level truth even where the XML lacks a box (person in 002)
    assert ds.records[1].labels.tolist() == [-1, 1, 1]
    assert ds.labels().shape == (2, 3)


def test_voc_labels_come_from_boxes_without_class_lists(voc):
    voc.add("001", 100, 80, [("cat", 11, 21, 50, 60), ("person", 1, 1, 40, 40, 1)])
    voc.split("train", ["001"])
    assert read_voc(voc.root, "train", CLASSES).records[0].labels.tolist() == [1, -1, 0]


def test_missing_image(voc):
    voc.add("001", 50, 50, [("cat", 1, 1, 20, 20)])
    (voc.root / "JPEGImages" / "001.jpg").unlink()
    voc.split("train", ["001"])
    with pytest.raises(DatasetError, match=r"names image '001' but .*001.jpg does not exist"):
        read_voc(voc.root, "train", CLASSES)


def test_split_naming_an_image_that_is_not_there(voc):
    voc.add("001", 50, 50, [("cat", 1, 1, 20, 20)])
    voc.split("train", ["001", "999"])
    with pytest.raises(DatasetError, match=r"999.xml: annotation file does not exist"):
        read_voc(voc.root, "train", CLASSES)


def test_malformed_xml(voc):
    voc.add("001", 50, 50)
    (voc.root / "Annotations" / "001.xml").write_text("<annotation><object><name>cat</name></annotation>")
    voc.split("train", ["001"])
    with pytest.raises(DatasetError, match=r"001.xml: malformed XML"):
        read_voc(voc.root, "train", CLASSES)


def test_entity_expansion_is_refused(voc):
    voc.add("001", 50, 50)
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        "<annotation><filename>&lol2;</filename></annotation>"
    )
    (voc.root / "Annotations" / "001.xml").write_text(bomb)
    voc.split("train", ["001"])
    with pytest.raises(DatasetError, match=r"001.xml: refused unsafe XML"):
        read_voc(voc.root, "train", CLASSES)


def test_unknown_class_names_the_file_and_the_accepted_names(voc):
    voc.add("001", 50, 50, [("unicorn", 1, 1, 20, 20)])
    voc.split("train", ["001"])
    with pytest.raises(DatasetError, match=r"001.xml: unknown class 'unicorn'; accepted classes: cat, dog, person"):
        read_voc(voc.root, "train", CLASSES)


def test_missing_coordinate(voc):
    voc.add("001", 50, 50)
    (voc.root / "Annotations" / "001.xml").write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox>"
        "</object></annotation>"
    )
    voc.split("train", ["001"])
    with pytest.raises(DatasetError, match=r"001.xml: missing <ymax>"):
        read_voc(voc.root, "train", CLASSES)


def test_boxes_outside_the_image_are_clipped_with_a_count(voc, caplog):
    voc.add("001", 50, 40, [("cat", -5, 1, 80, 30), ("dog", 1, 1, 10, 10)])
    voc.add("002", 50, 40, [("cat", 1, 1, 50, 60)])
    voc.split("train", ["001", "002"])
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = read_voc(voc.root, "train", CLASSES)
    np.testing.assert_allclose(ds.records[0].boxes[0], [0, 0, 50, 30])
    np.testing.assert_allclose(ds.records[1].boxes[0], [0, 0, 50, 40])
    assert len(ds.fixes["clipped"]) == 2
    assert "2 boxes extending outside their image were clipped" in caplog.text


def test_zero_area_boxes_are_dropped_with_a_count(voc, caplog):
    voc.add("001", 50, 40, [("cat", 10, 10, 9, 30), ("dog", 1, 1, 10, 10), ("cat", 60, 1, 70, 10)])
    voc.split("train", ["001"])
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = read_voc(voc.root, "train", CLASSES)
    r = ds.records[0]
    assert r.box_classes.tolist() == [1]  # the inverted box and the one wholly outside are gone
    assert len(ds.fixes["dropped"]) == 2
    assert "2 zero-area boxes were dropped" in caplog.text


def test_empty_split(voc):
    voc.split("train", [])
    with pytest.raises(DatasetError, match=r"train.txt: split 'train' is empty"):
        read_voc(voc.root, "train", CLASSES)


def test_unknown_split_lists_the_available_ones(voc):
    voc.add("001", 50, 50)
    voc.split("train", ["001"])
    with pytest.raises(DatasetError, match=r"split list does not exist; splits here: train"):
        read_voc(voc.root, "val", CLASSES)


def test_not_a_voc_root(tmp_path):
    with pytest.raises(DatasetError, match="not a VOC root"):
        read_voc(tmp_path, "train", CLASSES)


def test_bad_class_list_line(voc):
    voc.add("001", 50, 50)
    voc.split("train", ["001"], {"cat": [1], "dog": [-1], "person": [-1]})
    (voc.root / "ImageSets/Main/dog_train.txt").write_text("001 maybe\n")
    with pytest.raises(DatasetError, match=r"dog_train.txt: line '001 maybe'"):
        read_voc(voc.root, "train", CLASSES)


def test_class_list_missing_an_image(voc):
    voc.add("001", 50, 50)
    voc.add("002", 50, 50)
    voc.split("train", ["001", "002"], {"cat": [1, 1], "dog": [-1, -1], "person": [-1, -1]})
    (voc.root / "ImageSets/Main/person_train.txt").write_text("001 -1\n")
    with pytest.raises(DatasetError, match=r"person_train.txt: has no label for image '002'"):
        read_voc(voc.root, "train", CLASSES)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_grayscale_rgba_cmyk_and_palette_images_become_rgb(tmp_path, mode):
    ext = "png" if mode in ("RGBA", "P") else "jpg"
    path = write_image(tmp_path / f"img.{ext}", 40, 30, mode=mode)
    arr = load_image(path)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def _tiff_unsigned(path):
    """Rewrite a little-endian TIFF's SampleFormat tag (339) to 1, unsigned: Pillow writes its mode I as signed."""
    import struct

    data = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for n in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * n
        if struct.unpack_from("<H", data, entry)[0] == 339:
            struct.pack_into("<H", data, entry + 8, 1)
    path.write_bytes(data)


def _eight_bit(values, top):
    return np.round(np.clip(np.asarray(values, np.float64) / top, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_images_are_scaled_by_their_type_range_not_their_own_maximum(tmp_path, suffix):
    values = np.array([[0, 1000, 4000], [32768, 60000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / f"a.{suffix}")
    dark = np.array([[0, 100, 200]], np.uint16)  # a dark image stays dark (its own maximum made it white)
    Image.fromarray(dark).save(tmp_path / f"dark.{suffix}")
    np.testing.assert_array_equal(load_image(tmp_path / f"a.{suffix}")[..., 0], _eight_bit(values, 65535))
    np.testing.assert_array_equal(load_image(tmp_path / f"dark.{suffix}")[..., 1], _eight_bit(dark, 65535))


def test_32_bit_tiffs_are_scaled_by_their_range_without_wrapping(tmp_path):
    signed = np.array([[-5, 0, 2**30, 2**31 - 1]], np.int32)
    Image.fromarray(signed).save(tmp_path / "s.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "s.tif")[..., 0], _eight_bit(signed, 2**31 - 1))
    unsigned = np.array([[0, 2**31, 3 * 2**30, 2**32 - 1]], np.uint32)  # above 2^31: negative as Pillow reads it
    Image.frombytes("I", (4, 1), unsigned.tobytes(), "raw", "I;32").save(tmp_path / "u.tif")
    _tiff_unsigned(tmp_path / "u.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "u.tif")[..., 2], _eight_bit(unsigned, 2**32 - 1))


def test_float_tiffs_map_their_unit_range_to_8_bits_clipped(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0, -0.5, 3.0, np.nan]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(out[..., 0], [[0, 64, 128, 255, 0, 255, 0]])
    assert out.shape == (1, 7, 3) and (out[..., 0] == out[..., 2]).all()


def test_thumbnails_of_16_bit_and_float_images_are_not_black(tmp_path):
    from patchnet.data import thumbnail

    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert np.array(thumbnail(tmp_path / "a.png", 4))[0, 0, 0] == _eight_bit([40000], 65535)[0]
    assert np.array(thumbnail(tmp_path / "f.tif", 4))[0, 0, 0] == 128


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png") == 255).all()


def test_exif_rotation_is_honoured(tmp_path, voc):
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of the stored pixels
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (60, 30, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top
    assert image_size(tmp_path / "rot.jpg") == (30, 60)


def test_voc_record_uses_the_displayed_size_of_an_exif_rotated_image(voc, caplog):
    path = voc.add("001", 60, 30, [("cat", 1, 1, 20, 20)])
    img = Image.open(path)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif)
    voc.split("train", ["001"])
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        r = read_voc(voc.root, "train", CLASSES).records[0]
    assert (r.width, r.height) == (30, 60)
    assert "real size differs" in caplog.text


def test_corrupt_image_raises_a_dataset_error_naming_it(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match="bad.jpg: cannot"):
        load_image(bad)


def write_coco(root, images, annotations, categories, split="train"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    for img in images:
        write_image(root / split / img["file_name"], img["width"], img["height"])
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_coco_reader(tmp_path):
    cats = [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]
    images = [
        {"id": 10, "file_name": "a.jpg", "width": 50, "height": 40},
        {"id": 11, "file_name": "b.jpg", "width": 30, "height": 30},
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [5, 6, 10, 20], "iscrowd": 0, "area": 200},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1, "area": 900},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25},
    ]
    write_coco(tmp_path, images, anns, cats)
    ds = open_split(DataConfig(format="coco", root=str(tmp_path), classes=[]), "train")
    assert ds.classes == ["cat", "dog"]  # ordered by category id
    r = ds.records[0]
    np.testing.assert_allclose(r.boxes, [[5, 6, 15, 26], [0, 0, 30, 30]])
    assert r.box_classes.tolist() == [0, 1] and r.box_difficult.tolist() == [False, True]
    assert r.labels.tolist() == [1, 0]  # dog only as a crowd: difficult-only
    assert ds.records[1].labels.tolist() == [-1, 1]
    # a subset of the categories
    sub = read_coco(tmp_path / "annotations" / "instances_train.json", tmp_path / "train", ["dog"])
    assert sub.classes == ["dog"] and sub.records[0].box_classes.tolist() == [0]


def test_coco_errors(tmp_path):
    cats = [{"id": 1, "name": "cat"}]
    write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 20}], [], cats)
    ann = tmp_path / "annotations" / "instances_train.json"
    with pytest.raises(DatasetError, match="classes \\['dog'\\] are not among its categories: cat"):
        read_coco(ann, tmp_path / "train", ["dog"])
    with pytest.raises(DatasetError, match="no annotation names a category, so there is no class to learn"):
        read_coco(ann, tmp_path / "train")
    (tmp_path / "train" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="names image 'a.jpg' but .* does not exist"):
        read_coco(ann, tmp_path / "train", ["cat"])
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match="instances_train.json: not valid JSON"):
        read_coco(ann, tmp_path / "train")
    with pytest.raises(DatasetError, match="does not exist"):
        read_coco(tmp_path / "nope.json", tmp_path)


def test_open_split_requires_a_root():
    with pytest.raises(DatasetError, match="data.root is empty"):
        open_split(DataConfig(format="voc", root=""), "train")


def test_demo_dataset_is_deterministic_and_readable(tmp_path):
    from patchnet.data.demo import DEMO_CLASSES, make_demo

    a = make_demo(tmp_path / "a", seed=3, splits={"train": 6, "test": 3})
    b = make_demo(tmp_path / "b", seed=3, splits={"train": 6, "test": 3})
    da, db = read_voc(a, "train", DEMO_CLASSES), read_voc(b, "train", DEMO_CLASSES)
    assert len(da) == 6 and len(read_voc(a, "test", DEMO_CLASSES)) == 3
    for ra, rb in zip(da.records, db.records):
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(load_image(ra.path), load_image(rb.path))
    assert sum(len(r.boxes) for r in da.records) >= 6
    assert all((r.labels == 1).any() or (r.labels == 0).any() for r in da.records)


# --------------------------------------------------------------------------- image folders and CSV lists

from patchnet.data import image_label_statistics, read_csv_list, read_folder  # noqa: E402


def _folder(tmp_path, spec: dict[str, int], split="train"):
    for n, (cls, count) in enumerate(spec.items()):
        (tmp_path / "folder" / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(tmp_path / "folder" / split / cls / f"{i}.jpg", 40, 30, seed=10 * n + i)
    return tmp_path / "folder"


def test_image_folder_is_single_label_without_boxes(tmp_path):
    root = _folder(tmp_path, {"kitchen": 2, "bedroom": 3})
    ds = read_folder(root, "train")
    assert ds.classes == ["bedroom", "kitchen"] and len(ds) == 5
    assert ds.single_label and not ds.has_boxes
    assert (ds.labels() == 1).sum(1).tolist() == [1] * 5
    assert ds.records[0].labels.tolist() == [1, -1] and ds.records[-1].labels.tolist() == [-1, 1]
    assert "5 images" in image_label_statistics(ds) and "single-label" in image_label_statistics(ds)


def test_image_folder_warns_about_an_empty_class_folder_and_names_bad_splits(tmp_path, caplog):
    root = _folder(tmp_path, {"kitchen": 2})
    (root / "train" / "attic").mkdir()
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = read_folder(root, "train")
    assert "class folder attic holds no images" in caplog.text and ds.classes == ["attic", "kitchen"]
    with pytest.raises(DatasetError, match="splits here: train"):
        read_folder(root, "val")
    with pytest.raises(DatasetError, match=r"classes kitchen are not in data.classes .*data.classes: \[\]"):
        read_folder(root, "train", ["attic", "bedroom"])


def _csv(tmp_path, lines: list[str]):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.jpg", 32, 32, seed=i)
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_list_is_multi_label_and_allows_images_of_no_class(tmp_path):
    path = _csv(tmp_path, ["path,labels", "imgs/0.jpg,cat;dog", "imgs/1.jpg,dog", "imgs/2.jpg,"])
    ds = read_csv_list(path)
    assert ds.classes == ["cat", "dog"] and not ds.single_label and not ds.has_boxes
    assert ds.labels().tolist() == [[1, 1], [-1, 1], [-1, -1]]
    assert open_split(DataConfig(format="csv", root=str(tmp_path), classes=[]), "train").labels().shape == (3, 2)


def test_csv_errors_name_the_line(tmp_path):
    path = _csv(tmp_path, ["imgs/0.jpg,cat", "imgs/9.jpg,dog"])
    with pytest.raises(DatasetError, match=r"train.csv, line 2: image 'imgs/9.jpg' does not exist"):
        read_csv_list(path)
    path = _csv(tmp_path, ["imgs/0.jpg,cat", "imgs/1.jpg,horse"])
    with pytest.raises(DatasetError, match=r"line 2: unknown class 'horse'; classes: cat, dog"):
        read_csv_list(path, ["cat", "dog"])
    path = _csv(tmp_path, ["imgs/0.jpg,cat,extra"])
    with pytest.raises(DatasetError, match="line 1: expected 'image_path,label1;label2'"):
        read_csv_list(path)


def test_voc_with_boxes_ignored_keeps_the_image_labels(voc):
    voc.add("001", 100, 80, [("cat", 11, 21, 50, 60)])
    voc.split("train", ["001"], {"cat": [1], "dog": [-1], "person": [0]})
    ds = open_split(DataConfig(format="voc", root=str(voc.root), classes=CLASSES, boxes=False), "train")
    assert not ds.has_boxes and ds.records[0].labels.tolist() == [1, -1, 0]
