"""Files real users have and files an attacker could hand over: each case built in a temporary folder, with the
exact outcome asserted (a clear error, a counted skip, a conversion), the user's files unchanged and nothing
written outside the output folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchnet.checkpoint import CheckpointError
from patchnet.cli import app
from patchnet.data import DatasetError, ImageTooLarge, load_image, open_split, read_coco, read_csv_list, read_folder
from patchnet.features.extract import build_extractor
from patchnet.files import OutputPathError, UniqueNames, atomic_write, output_path, safe_name
from patchnet.recipe import DataConfig, RecipeError, recipe_from_dict
from patchnet.store import CacheError, FeatureStore, verify_cache
from patchnet.training.trainer import train

from conftest import CLASSES, build, four_voc, tiny_recipe, write_image

runner = CliRunner()
TOOLS = Path(__file__).parent.parent / "tools"


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with a few bytes of data (a lying header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _run(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)


# --------------------------------------------------------------------------- 1. the demo generator


def test_demo_format_refuses_a_real_dataset_and_changes_no_byte_of_it(small_voc):
    before = tree(small_voc)
    result = runner.invoke(
        app,
        [
            "inspect",
            "--data",
            str(small_voc),
            "--format",
            "demo",
            "--split",
            "train",
            "--out",
            str(small_voc.parent / "x.png"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "not made by the demo generator" in result.output and "--format voc" in result.output
    assert str(small_voc) in result.output and "Traceback" not in result.output
    assert tree(small_voc) == before


def test_demo_generator_writes_into_an_empty_folder_and_rewrites_only_its_own(tmp_path):
    from patchnet.data.demo import STAMP, make_demo

    root = make_demo(tmp_path / "demo", seed=1, splits={"train": 2, "test": 1})
    assert (root / STAMP).is_file() and len(list((root / "JPEGImages").iterdir())) == 3
    make_demo(root, seed=2, splits={"train": 2, "test": 1})  # its own folder: regenerated for the new seed
    assert (root / STAMP).read_text().startswith("1 2 ")
    (tmp_path / "empty").mkdir()
    make_demo(tmp_path / "empty", seed=1, splits={"train": 1, "test": 1})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not made by the demo generator"):
        open_split(DataConfig(format="demo", root=str(tmp_path / "mine")), "train")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "mine").iterdir())) == 1


def test_an_interrupted_demo_generation_is_redone_and_concurrent_ones_take_turns(tmp_path, monkeypatch):
    import threading

    from patchnet.data import demo

    calls = {"n": 0}
    real = demo.make_image

    def dies_after_two(rng):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(rng)

    monkeypatch.setattr(demo, "make_image", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo(tmp_path / "d", splits={"train": 3, "test": 1})
    monkeypatch.setattr(demo, "make_image", real)
    root = demo.make_demo(tmp_path / "d", splits={"train": 3, "test": 1})  # its own half-made folder: redone
    assert len(list((root / "JPEGImages").iterdir())) == 4 and not (root / demo.STAMP).read_text().startswith("inc")
    results, errors = [], []

    def generate():
        try:
            results.append(demo.make_demo(tmp_path / "e", splits={"train": 4, "test": 2}))
        except Exception as e:  # pragma: no cover - the failure this test looks for
            errors.append(e)

    threads = [threading.Thread(target=generate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(list((tmp_path / "e" / "JPEGImages").iterdir())) == 6


# --------------------------------------------------------------------------- 2. names that would escape --out


@pytest.mark.parametrize(
    "name",
    [
        "../../ESCAPED/a.png",
        "x/../../TP_PWNED",
        "..",
        ".hidden",
        "a\0b",
        "/etc/passwd",
        "C:\\Windows\\x",
        "con",
        "é" * 300,
        "猫" * 95,
        "😀" * 70,
        "$x_$",
    ],
)
def test_safe_name_has_no_separator_no_dot_prefix_no_nul_and_a_bounded_length(name, tmp_path):
    s = safe_name(name)
    assert s and "/" not in s and "\\" not in s and "\0" not in s and not s.startswith(".")
    assert len(s.encode()) <= 160
    assert s != name  # each of these had to change, so it carries a hash of the original
    assert atomic_write(output_path(tmp_path, name, ".png"), b"x").read_bytes() == b"x"  # the disk takes it


def test_safe_names_of_different_names_differ_even_on_a_case_insensitive_disk(tmp_path):
    assert safe_name("a/b") != safe_name("a_b") and safe_name("cat_1") == "cat_1"
    names = UniqueNames()
    got = [names(n) for n in ["IMG_1", "img_1", "IMG_1", "a/b", "a_b"]]
    assert got[0] == got[2] == "IMG_1" and len({g.lower() for g in got}) == 4
    assert output_path(tmp_path, "../../x", ".png").parent == tmp_path
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path.parent)
    with pytest.raises(OutputPathError, match="outside its output folder"):
        output_path(tmp_path / "out", "link", "/x")  # a link inside --out that points out of it
    assert output_path(tmp_path / "out", "link", ".png").name == "link.png"
    crafted = UniqueNames()  # a name built to look like another's hashed name still gets a file of its own
    got = [crafted(n) for n in [f"cat-{safe_name('Cat/').split('-')[-1]}", "Cat/", "cat/"]]
    assert len({g.lower() for g in got}) == 3


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A model trained on a CSV list whose image ids and class names try to leave the output folder."""
    tmp = tmp_path_factory.mktemp("escape")
    data = tmp / "data"
    escaped = tmp / "ESCAPED" / "a.png"
    write_image(escaped, 64, 48, seed=1)
    for i in range(3):
        write_image(data / f"{i}.jpg", 64, 48, seed=i + 2)
    rows = [
        "path,labels",
        "../ESCAPED/a.png,x/../../TP_PWNED",
        "0.jpg,dog",
        "1.jpg,x/../../TP_PWNED;$x_$",
        "2.jpg,$x_$",
    ]
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    recipe = tiny_recipe(
        tmp,
        data,
        "data.format=csv",
        "data.classes=[]",
        "data.val_split=",
        "train.supervision=images",
        "pool.name=topk",
        "train.epochs=1",
        "train.holdout=0",
    )
    train(recipe, progress=False)
    return tmp, recipe


@pytest.mark.slow  # a subprocess or several processes
def test_heatmaps_and_top_patches_of_hostile_ids_and_classes_stay_inside_out(csv_run):
    tmp, recipe = csv_run
    before = {p for p in tree(tmp) if not p.startswith(("out", "cache", "runs"))}
    ckpt = recipe.run_dir / "last.pt"
    r = _run(
        TOOLS / "render_heatmaps.py",
        "--checkpoint",
        ckpt,
        "--split",
        "train",
        "--no-grid",
        "--top",
        "3",
        "--out",
        tmp / "out" / "h",
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    r2 = _run(
        TOOLS / "top_patches.py",
        "--checkpoint",
        ckpt,
        "--split",
        "train",
        "--n",
        "2",
        "--out",
        tmp / "out" / "t",
        cwd=tmp,
    )
    assert r2.returncode == 0, r2.stderr
    after = {p for p in tree(tmp) if not p.startswith(("out", "cache", "runs"))}
    assert after == before  # nothing written outside --out (no ESCAPED/..., no TP_PWNED)
    heat = sorted(p.name for p in (tmp / "out" / "h").iterdir())
    assert len(heat) == 4 * 3 and all(n.endswith(".png") and not n.startswith(".") for n in heat)
    assert len({n.lower() for n in heat}) == len(heat)
    sheets = sorted(p.name for p in (tmp / "out" / "t").iterdir())
    assert len(sheets) == 3 and all(n.startswith("top2_") for n in sheets)


# --------------------------------------------------------------------------- 3. decompression bombs and huge images


def test_a_lying_png_header_is_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    with pytest.raises(ImageTooLarge, match="bomb.png: refused: its header claims more than 179 M pixels"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "big.png").write_bytes(png_header(10_000, 6_000))  # 60 M: over the default 50 M
    with pytest.raises(ImageTooLarge, match=r"big.png: 10000x6000 is 60.0 M pixels, over data.max_pixels \(50.0 M\)"):
        load_image(tmp_path / "big.png", 50_000_000)


def test_huge_images_in_a_dataset_are_a_counted_skip(tmp_path, caplog):
    base = tmp_path / "f" / "train"
    write_image(base / "cat" / "ok.jpg", 40, 30)
    write_image(base / "dog" / "ok.jpg", 40, 30, seed=1)
    (base / "cat" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (base / "dog" / "pano.png").write_bytes(png_header(10_000, 6_000))
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = read_folder(tmp_path / "f", "train")
    assert sorted(r.image_id for r in ds.records) == ["cat/ok.jpg", "dog/ok.jpg"]
    assert len(ds.fixes["too_large"]) == 2 and "2 images exceed data.max_pixels" in caplog.text
    # a genuine panorama is read once the limit is raised
    cfg = DataConfig(format="folder", root=str(tmp_path / "f"), classes=[], max_pixels=60_000_000)
    assert len(open_split(cfg, "train")) == 3
    with pytest.raises(RecipeError, match="data.max_pixels must lie in"):
        recipe_from_dict({}, ["data.max_pixels=500000000"])


# --------------------------------------------------------------------------- 4. two runs on one cache key

RACE = """
import hashlib, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
import torch
from conftest import build, tiny_recipe
from patchnet.data import open_split
from patchnet.features.extract import build_extractor

torch.set_num_threads(1)
recipe = tiny_recipe(Path({tmp!r}), Path({root!r}), "cache.chunk=1")
extractor = build_extractor(recipe)
calls = []


class Slow:  # slow enough that the two processes overlap
    def __getattr__(self, name):
        return getattr(extractor, name)

    def extract(self, image):
        calls.append(1)
        time.sleep(0.5)
        return extractor.extract(image)


dataset = open_split(recipe.data, "train")
while len(sys.argv) > 1 and not Path(sys.argv[1]).exists():  # the second process starts when told to
    time.sleep(0.02)
store = build(recipe, dataset, Slow())
print(store.path, len(calls), hashlib.sha1(store.rows.stored[:].tobytes()).hexdigest())
"""


@pytest.mark.slow  # a subprocess or several processes
def test_two_processes_on_one_cache_key_both_finish_with_identical_features(tmp_path, small_voc):
    script = tmp_path / "race.py"
    script.write_text(RACE.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), root=str(small_voc)))
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in ([], [str(go)])
    ]
    deadline = time.time() + 120  # the second goes once the first holds the cache key's lock
    while time.time() < deadline and not any(p.read_text() for p in (tmp_path / "cache").glob(".locks/*.lock")):
        time.sleep(0.02)
    go.write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [o[0].split() for o in outs]
    assert results[0][0] == results[1][0] and results[0][2] == results[1][2]  # one cache, the same bytes
    assert [int(r[1]) for r in results] == [4, 0]  # the first computed it, the second read it
    assert "waiting for another process" in outs[1][1]
    store = FeatureStore(Path(results[0][0]))
    assert verify_cache(store.path) == "ok"
    assert not [p for p in store.path.rglob("*") if p.name.endswith(".tmp")] and not (store.path / "chunks").exists()
    recipe = tiny_recipe(tmp_path / "alone", small_voc)
    alone = build(recipe, open_split(recipe.data, "train"), build_extractor(recipe), progress=False)
    np.testing.assert_allclose(store.rows[:], alone.rows[:], rtol=5e-3, atol=2e-3)  # 1 thread against 2


# --------------------------------------------------------------------------- 5. a damaged cache


@pytest.fixture
def built(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc)
    ds = open_split(recipe.data, "train")
    ex = build_extractor(recipe)
    return recipe, ds, ex, build(recipe, ds, ex, progress=False)


def test_flipped_bytes_are_found_by_verify_and_on_the_first_open_after_a_restart(built, tmp_path):
    recipe, ds, ex, store = built
    f = store.path / "features.f16"
    data = bytearray(f.read_bytes())
    data[100:110] = b"\xff" * 10  # fp16 NaNs
    f.write_bytes(bytes(data))
    assert "features.f16 does not match its checksum" in verify_cache(store.path)
    result = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1 and "1 damaged" in result.output and store.path.name in result.output
    for stamp in store.path.glob("verified-*"):  # as after a crash and a restart
        stamp.unlink()
    with pytest.raises(CacheError, match=rf"{store.path}.*features.f16 does not match its checksum.*rm -r"):
        FeatureStore(store.path)
    result = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path / "cache"), "--delete-damaged"])
    assert result.exit_code == 0 and "deleted" in result.output and not store.path.exists()
    assert build(recipe, ds, ex, progress=False).num_patches == store.num_patches  # rebuilt


def test_nan_features_stop_an_evaluation_with_the_cache_folder_named(built):
    from patchnet.evaluation.scoring import evaluation_items, image_scores
    from patchnet.head.layers import AdaptationHead

    recipe, ds, _ex, store = built
    f = store.path / "features.f16"
    data = bytearray(f.read_bytes())
    data[0:2] = b"\x00\x7e"  # a NaN in the first feature of the first patch
    f.write_bytes(bytes(data))
    head = AdaptationHead(store.feature_dim, len(ds.classes), 8)
    with pytest.raises(CacheError, match=rf"{store.path} is damaged: the features of record 0 .*are not finite"):
        image_scores(head, FeatureStore(store.path), evaluation_items(store), recipe.pool, "power")
    f.write_bytes(bytes(data[:0]) + bytes([0, 0]) + bytes(data[2:]))  # the features mended, the head broken
    with torch.no_grad():
        head.fcb.bias[0] = float("nan")
    with pytest.raises(CheckpointError, match="the head's weights hold NaN or inf values"):
        image_scores(head, FeatureStore(store.path), evaluation_items(store), recipe.pool, "power")


@pytest.mark.parametrize("name", ["features.f16", "index.npz", "meta.json"])
def test_a_truncated_cache_file_names_the_folder_and_how_to_rebuild(built, name):
    store = built[3]
    f = store.path / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CacheError, match=rf"cache {store.path} is damaged: .*{name}.*rm -r {store.path}"):
        FeatureStore(store.path)


def test_a_garbage_chunk_left_by_a_killed_run_is_computed_again(tmp_path, small_voc, caplog):
    from patchnet.features.build import cache_fields, cache_spec
    from patchnet.store import keyed_folder

    recipe = tiny_recipe(tmp_path, small_voc)
    ds, ex = open_split(recipe.data, "train"), build_extractor(recipe)
    chunks = keyed_folder(tmp_path / "cache", cache_fields(ds, ex, 0, cache_spec(recipe, ex))) / "chunks"
    chunks.mkdir(parents=True)
    (chunks / "000000.npz").write_bytes(b"PK\x03\x04 garbage, as a half-written chunk")
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        store = build(recipe, ds, ex, progress=False)
    assert "chunk 000000.npz is damaged; computing it again" in caplog.text
    clean = tiny_recipe(tmp_path / "clean", small_voc)
    np.testing.assert_array_equal(store.rows[:], build(clean, ds, ex, progress=False).rows[:])


def test_writes_are_fsynced_before_the_rename_and_leave_no_temporary_file(tmp_path, monkeypatch):
    from patchnet.checkpoint import Checkpoint, save_checkpoint

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    save_checkpoint(Checkpoint({"w": torch.ones(2)}, {}, ["a"], 4), tmp_path / "run" / "last.pt")
    assert any(s.endswith(".tmp") for s in synced) and str(tmp_path / "run") in synced
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pt"]
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "run" / "last.pt", lambda f: (f.write(b"x"), 1 / 0))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pt"]  # the old file, intact
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["head"]["w"].sum() == 2


def test_an_unwritable_cache_folder_is_one_clear_error(tmp_path, small_voc):
    (tmp_path / "file").write_text("not a folder")
    recipe = tiny_recipe(tmp_path, small_voc, f"runtime.cache_dir={tmp_path / 'file' / 'cache'}")
    with pytest.raises(CacheError, match=r"cannot write feature cache .* Set runtime.cache_dir to a writable folder"):
        build(recipe, open_split(recipe.data, "train"), build_extractor(recipe), progress=False)


def test_a_warm_cache_in_a_read_only_folder_is_read(built, monkeypatch):
    recipe, ds, ex, store = built
    for stamp in store.path.glob("verified-*"):
        stamp.unlink()
    monkeypatch.setattr(
        "patchnet.store.integrity.atomic_write", lambda *a: (_ for _ in ()).throw(PermissionError(13, "ro"))
    )
    assert build(recipe, ds, ex, progress=False).num_patches == store.num_patches


# --------------------------------------------------------------------------- 6. COCO files from labelling tools


def _coco(root: Path, data: dict, name="annotations/instances_train.json", images_dir="train") -> Path:
    for img in data.get("images", []):
        if isinstance(img, dict) and isinstance(img.get("file_name"), str):
            write_image(root / images_dir / img["file_name"], 40, 30)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_coco_with_mixed_string_and_integer_ids_reads(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": "b7", "file_name": "b.jpg"}],
        "categories": [{"id": 1, "name": "cat"}, {"id": "2", "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": "1", "category_id": 1, "bbox": [1, 1, 10, 10]},
            {"id": 2, "image_id": "b7", "category_id": "2", "bbox": [2, 2, 5, 5]},
        ],
    }
    ds = read_coco(_coco(tmp_path, data), tmp_path / "train")
    assert ds.classes == ["cat", "dog"] and [r.image_id for r in ds.records] == ["1", "b7"]
    assert ds.records[0].labels.tolist() == [1, -1] and ds.records[1].labels.tolist() == [-1, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 1\) has no file_name"),
        (
            lambda d: d["annotations"][0].update(bbox=[1, 2]),
            r"annotations\[0\] \(id 5\): bbox must be \[x, y, width, height\]",
        ),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "3", None]), r"annotations\[0\].*four finite numbers"),
        (lambda d: d["annotations"][0].update(image_id=99), r"annotations\[0\] \(id 5\): refers to image id 99"),
        (
            lambda d: d["categories"].append({"id": 3, "name": "cat"}),
            r"categories\[0\] and categories\[1\] are both named 'cat'",
        ),
        (lambda d: d["images"].append({"id": 1, "file_name": "c.jpg"}), r"images\[0\] and images\[1\] share the id 1"),
        (lambda d: d.pop("images"), "not a COCO detection file"),
        (lambda d: d["categories"][0].update(id=None), r"categories\[0\] has no usable id"),
    ],
)
def test_coco_entries_that_cannot_be_used_are_refused_by_name(tmp_path, change, message):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}],
    }
    _coco(tmp_path, data)
    change(data)
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message):
        read_coco(tmp_path / "annotations" / "instances_train.json", tmp_path / "train")


def test_a_roboflow_export_trains_where_it_lies(tmp_path, caplog):
    data = {
        "categories": [
            {"id": 0, "name": "cells", "supercategory": "none"},
            {"id": 1, "name": "rbc", "supercategory": "cells"},
            {"id": 2, "name": "wbc", "supercategory": "cells"},
        ],
        "images": [
            {"id": 0, "file_name": "x_jpg.rf.1.jpg", "width": 40, "height": 30},
            {"id": 1, "file_name": "y_jpg.rf.2.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {
                "id": 0,
                "image_id": 0,
                "category_id": 1,
                "bbox": [1, 1, 20, 20],
                "area": 400,
                "segmentation": [],
                "iscrowd": 0,
            },
            {
                "id": 1,
                "image_id": 1,
                "category_id": 2,
                "bbox": [5, 5, 10, 10],
                "area": 100,
                "segmentation": [],
                "iscrowd": 0,
            },
        ],
    }
    _coco(tmp_path, data, "train/_annotations.coco.json", "train")
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = open_split(DataConfig(format="coco", root=str(tmp_path), classes=[]), "train")
    assert ds.classes == ["rbc", "wbc"] and "categories that no annotation uses were dropped" in caplog.text
    assert "'cells' (id 0)" in caplog.text
    named = DataConfig(format="coco", root=str(tmp_path), classes=[], annotations="{split}/_annotations.coco.json")
    assert open_split(named, "train").classes == ["rbc", "wbc"]
    # the other splits of a run take the training split's classes, also where one of them is never used
    data["annotations"] = data["annotations"][:1]
    _coco(tmp_path, data, "valid/_annotations.coco.json", "valid")
    assert open_split(named, "valid").classes == ["rbc"]
    assert open_split(named, "valid", classes=ds.classes).classes == ["rbc", "wbc"]


def test_the_linear_baseline_scores_coco_splits_that_use_different_categories(tmp_path):
    from patchnet.features.extract import build_extractor
    from patchnet.studies.linear import linear_baseline

    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "owl"}]
    for split, used in (("train", [1, 2, 3, 1, 2, 3]), ("val", [1, 3, 1, 3])):  # no dog in val
        images = [{"id": i, "file_name": f"{split}{i}.jpg"} for i in range(len(used))]
        anns = [{"id": i, "image_id": i, "category_id": c, "bbox": [2, 2, 20, 20]} for i, c in enumerate(used)]
        _coco(
            tmp_path,
            {"images": images, "categories": cats, "annotations": anns},
            f"annotations/instances_{split}.json",
            split,
        )
    recipe = tiny_recipe(tmp_path, tmp_path, "data.format=coco", "data.classes=[]", "patches.mode=whole")
    table, _ = linear_baseline(recipe, "train", "val", build_extractor, grid=(1.0,), progress=False)
    assert table.classes == ["cat", "dog", "owl"]  # val scored against the training split's classes


# --------------------------------------------------------------------------- 7. duplicate ids


def test_csv_duplicate_rows_are_dropped_and_conflicting_ones_refused(tmp_path, caplog):
    for i in range(2):
        write_image(tmp_path / f"{i}.jpg", 32, 32, seed=i)
    (tmp_path / "train.csv").write_text("0.jpg,cat\n1.jpg,dog\n0.jpg,cat\n./0.jpg,cat\n")
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = read_csv_list(tmp_path / "train.csv")
    assert [r.image_id for r in ds.records] == ["0.jpg", "1.jpg"] and len(ds.fixes["duplicate"]) == 2
    assert "2 duplicate entries" in caplog.text
    (tmp_path / "train.csv").write_text("0.jpg,cat\n1.jpg,dog\n0.jpg,dog\n")
    with pytest.raises(DatasetError, match=r"train.csv, lines 1 and 3: image '0.jpg' is listed twice with different"):
        read_csv_list(tmp_path / "train.csv")


def test_one_stem_with_two_extensions_is_two_images(tmp_path):
    write_image(tmp_path / "f" / "train" / "cat" / "a.jpg", 32, 32)
    write_image(tmp_path / "f" / "train" / "cat" / "a.png", 32, 32, seed=1)
    write_image(tmp_path / "f" / "train" / "dog" / "b.jpg", 32, 32, seed=2)
    ds = read_folder(tmp_path / "f", "train")
    assert [r.image_id for r in ds.records] == ["cat/a.jpg", "cat/a.png", "dog/b.jpg"]


def test_a_voc_list_naming_an_image_twice_reads_it_once(voc):
    voc.add("001", 50, 50, [("cat", 1, 1, 20, 20)])
    voc.split("train", ["001", "001"])
    ds = open_split(DataConfig(format="voc", root=str(voc.root), classes=CLASSES), "train")
    assert len(ds) == 1 and len(ds.fixes["duplicate"]) == 1


# --------------------------------------------------------------------------- 8. predict and heatmaps skip a bad file


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("voc_run")
    root = four_voc(tmp / "VOC", ["a", "b"])
    recipe = tiny_recipe(tmp, root, "train.epochs=1")
    train(recipe, progress=False)
    return tmp, recipe


def test_predict_skips_an_unreadable_file_writes_the_rest_and_exits_1(voc_run):
    tmp, recipe = voc_run
    good = Path(recipe.data.root) / "JPEGImages" / "a.jpg"
    (tmp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp / "bomb.png").write_bytes(png_header(100_000, 100_000))
    out = tmp / "p.json"
    result = runner.invoke(
        app,
        [
            "predict",
            "--checkpoint",
            str(recipe.run_dir / "best.pt"),
            str(tmp / "broken.jpg"),
            str(good),
            str(tmp / "bomb.png"),
            str(tmp / "missing.jpg"),
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "3 of 4 images could not be read" in result.output and "Traceback" not in result.output
    written = json.loads(out.read_text())
    assert list(written["images"]) == [str(good)]
    assert set(written["skipped"]) == {str(tmp / n) for n in ("broken.jpg", "bomb.png", "missing.jpg")}
    assert "cannot" in written["skipped"][str(tmp / "broken.jpg")]


@pytest.mark.slow  # a subprocess or several processes
def test_render_heatmaps_skips_an_unreadable_file_and_draws_the_others(voc_run):
    tmp, recipe = voc_run
    folder = tmp / "photos"
    folder.mkdir(exist_ok=True)
    write_image(folder / "ok.jpg", 80, 60)
    (folder / "bad.jpg").write_bytes(b"not an image")
    (folder / "._ok.jpg").write_bytes(b"macOS resource fork")  # hidden: not even tried
    r = _run(
        TOOLS / "render_heatmaps.py", "--checkpoint", recipe.run_dir / "best.pt", folder, "--out", tmp / "hm", cwd=tmp
    )
    assert r.returncode == 1, r.stderr
    assert [p.name for p in (tmp / "hm").iterdir()] == ["ok.png"]
    assert "bad.jpg" in r.stderr and "1 of 2 images could not be read" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- 9. CSV encodings and image folders


def test_csv_with_a_bom_reads_and_latin1_is_an_error_naming_the_line(tmp_path):
    write_image(tmp_path / "a.jpg", 32, 32)
    write_image(tmp_path / "b.jpg", 32, 32, seed=1)
    (tmp_path / "train.csv").write_bytes("path,labels\r\na.jpg,café\r\nb.jpg,thé\r\n".encode("utf-8-sig"))
    ds = read_csv_list(tmp_path / "train.csv")
    assert ds.classes == ["café", "thé"] and [r.image_id for r in ds.records] == ["a.jpg", "b.jpg"]
    (tmp_path / "train.csv").write_bytes("path,labels\na.jpg,cat\nb.jpg,café\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"train.csv, line 3: not UTF-8 \(byte 0xe9.*save it as UTF-8"):
        read_csv_list(tmp_path / "train.csv")
    (tmp_path / "train.csv").write_text("a.jpg,\nb.jpg, \n")
    with pytest.raises(DatasetError, match="no line names a class"):
        read_csv_list(tmp_path / "train.csv")


def test_image_folders_skip_hidden_entries_guard_link_loops_and_read_nested_images(tmp_path, caplog):
    base = tmp_path / "f" / "train"
    write_image(base / "cat" / "a.jpg", 32, 32)
    write_image(base / "cat" / "2019" / "july" / "b.jpg", 32, 32, seed=1)
    write_image(base / "dog" / "c.png", 32, 32, seed=2)
    (base / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (base / "cat" / "._a.jpg").write_bytes(b"\0\5\26\7 resource fork")
    write_image(base / "cat" / ".ipynb_checkpoints" / "a-checkpoint.jpg", 32, 32)
    (base / ".git").mkdir()
    (base / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (base / "dog" / "loop").symlink_to(base / "dog")
    with caplog.at_level(logging.WARNING, logger="patchnet"):
        ds = read_folder(tmp_path / "f", "train")
    assert ds.classes == ["cat", "dog"]
    assert [r.image_id for r in ds.records] == ["cat/a.jpg", "cat/2019/july/b.jpg", "dog/c.png"]
    assert "link loop" in caplog.text


# --------------------------------------------------------------------------- 10. smaller tracebacks


def test_dollar_signs_in_names_are_drawn_as_plain_text(tmp_path):
    from patchnet.outputs.heatmaps import render_heatmaps

    image = np.zeros((40, 60, 3), np.uint8)
    boxes = np.array([[0, 0, 40, 40], [20, 0, 60, 40]], np.float32)
    out = render_heatmaps(
        image,
        boxes,
        np.array([[0.2, 0.8], [0.6, 0.1]]),
        np.array([0.5, 0.5]),
        ["$x_$", "$\\frac{$"],
        [0, 1],
        tmp_path / "h.png",
    )
    assert out.read_bytes()[:4] == b"\x89PNG"


def _inspect(data: Path, out: Path):
    return runner.invoke(
        app,
        [
            "inspect",
            "--data",
            str(data),
            "--split",
            "train",
            "--out",
            str(out),
            "--set",
            "data.classes=[cat, dog, person]",
        ],
    )


def test_an_output_path_that_cannot_be_written_is_one_line(small_voc, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = _inspect(small_voc, tmp_path / "file" / "x.png")
    assert result.exit_code == 2 and "Traceback" not in result.output and "file" in result.output
    result = _inspect(small_voc, tmp_path / "x.foo")
    assert result.exit_code == 2 and "name the file with one of those suffixes" in result.output


def test_a_malformed_override_is_one_line(small_voc):
    result = runner.invoke(app, ["inspect", "--data", str(small_voc), "--split", "train", "--set", "train.lr=[1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "override 'train.lr=[1': the value '[1' is not valid YAML" in result.output


def test_a_run_name_that_leaves_the_output_folder_is_refused_and_old_names_still_load(tmp_path):
    for name in ("../../x", "/etc/x", "a/../../x"):
        with pytest.raises(RecipeError, match="runtime.output"):
            recipe_from_dict({"name": name, "runtime": {"output": str(tmp_path)}}).check_run_dir()
    # names of earlier runs (sub-folders, spaces) stay valid: their checkpoints load
    for name in ("voc07/resnet50", "my run", "exp(1)"):
        r = recipe_from_dict({"name": name, "runtime": {"output": str(tmp_path)}})
        assert r.check_run_dir() == tmp_path / name


def test_a_checkpoint_whose_head_does_not_fit_is_one_clear_error(voc_run, tmp_path):
    _tmp, recipe = voc_run
    state = torch.load(recipe.run_dir / "best.pt", weights_only=True)
    state["head"]["fca.0.weight"] = state["head"]["fca.0.weight"][:, :100]
    torch.save(state, tmp_path / "edited.pt")
    result = runner.invoke(
        app,
        ["predict", "--checkpoint", str(tmp_path / "edited.pt"), str(Path(recipe.data.root) / "JPEGImages" / "a.jpg")],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "edited.pt: its head does not fit the model its recipe builds" in result.output


def test_train_keeps_an_earlier_run_unless_told_to_overwrite_it(tmp_path, small_voc):
    from patchnet.recipe import save_recipe

    save_recipe(tiny_recipe(tmp_path, small_voc, "train.epochs=1"), tmp_path / "r.yaml")
    assert runner.invoke(app, ["train", "--recipe", str(tmp_path / "r.yaml")]).exit_code == 0
    last = tmp_path / "runs" / "tiny" / "last.pt"
    before = last.read_bytes()
    again = runner.invoke(app, ["train", "--recipe", str(tmp_path / "r.yaml")])
    assert again.exit_code == 2 and "already holds a run" in again.output and "--overwrite" in again.output
    assert last.read_bytes() == before
    assert runner.invoke(app, ["train", "--recipe", str(tmp_path / "r.yaml"), "--overwrite"]).exit_code == 0
