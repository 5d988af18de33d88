import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from patchnet.cli import app
from patchnet.recipe import VOC_CLASSES

from conftest import calibrated_model, four_voc, tiny_recipe

runner = CliRunner()


def test_inspect_prints_statistics_and_writes_a_png(small_voc, tmp_path):
    out = tmp_path / "labels.png"
    result = runner.invoke(
        app,
        [
            "inspect",
            "--data",
            str(small_voc),
            "--split",
            "train",
            "--out",
            str(out),
            "--set",
            "data.classes=[cat, dog, person]",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output
    for word in ("cat", "dog", "person", "background", "ignored", "positive"):
        assert word in result.output
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"


def test_inspect_reports_bad_input_in_one_line(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path), "--split", "train"])
    assert result.exit_code == 2
    assert "error:" in result.output and "found no dataset" in result.output and "a folder per class" in result.output
    assert "Traceback" not in result.output


def test_python_dash_m_runs_the_command_line():
    # torchrun launches `-m patchnet.cli` (README, DDP): the package needs its __main__
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "patchnet.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "train" in p.stdout and "localize" in p.stdout


# --------------------------------------------------------------------------- predict --out


@pytest.fixture(scope="module")
def predict_model(tmp_path_factory):
    """A tiny calibrated checkpoint and its images."""
    model, root = calibrated_model(tmp_path_factory.mktemp("predict"))
    return model, root / "JPEGImages"


def _predict(model, *args):
    return runner.invoke(app, ["predict", "--checkpoint", str(model.predictor.state_path), "--device", "cpu", *args])


def _rows(out):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_predict_out_writes_annotated_images_heatmaps_csv_and_json(predict_model, tmp_path):
    model, images = predict_model
    out = tmp_path / "out"
    files = [images / "a.jpg", images / "b.jpg"]
    result = _predict(model, *map(str, files), "--out", str(out))
    assert result.exit_code == 0, result.output
    expected = model.predict(files)
    # a heatmap per class judged present, or of the best class where none is
    found = [
        [c for c, f in zip(model.classes, row) if f] or [model.classes[int(prob.argmax())]]
        for row, prob in zip(expected.present, expected.probabilities)
    ]
    n_maps = sum(len(f) for f in found)
    assert (
        f"wrote 2 annotated images, {n_maps} heatmaps, predictions.csv and predictions.json to {out}" in result.output
    )
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "b.jpg"]
    assert f"{files[0]}: " in result.output and f"{files[1]}: " in result.output  # a line per image
    with Image.open(out / "a.jpg") as im:  # the 96x72 image enlarged so that its label is legible
        assert im.format == "JPEG" and im.size == (480, 360)
    assert _tree(out / "heatmaps") == sorted(f"{p.stem}_{c}.png" for p, cs in zip(files, found) for c in cs)
    rows = _rows(out)
    assert list(rows[0]) == ["file", "rank", "class", "probability", "score", "present", "annotated", "heatmap"]
    assert [r["file"] for r in rows] == [str(files[0])] * 3 + [str(files[1])] * 3
    for i, path in enumerate(files):
        mine = rows[3 * i : 3 * i + 3]
        assert [r["rank"] for r in mine] == ["1", "2", "3"]
        assert [float(r["probability"]) for r in mine] == sorted((float(r["probability"]) for r in mine), reverse=True)
        for r in mine:
            c = model.classes.index(r["class"])
            assert float(r["probability"]) == pytest.approx(expected.probabilities[i, c], abs=1e-6)
            assert float(r["score"]) == pytest.approx(expected.scores[i, c], abs=1e-6)
            assert r["present"] == str(bool(expected.present[i, c]))
            assert r["annotated"] == f"{path.stem}.jpg"
            assert r["heatmap"] == (f"heatmaps/{path.stem}_{r['class']}.png" if r["class"] in found[i] else "")
    doc = json.loads((out / "predictions.json").read_text())
    assert list(doc["images"]) == [str(p) for p in files] and doc["threshold"] is None and doc["skipped"] == {}
    assert doc["images"][str(files[0])]["cat"]["probability"] == pytest.approx(expected.probabilities[0, 0])
    for files_of in doc["outputs"].values():
        assert (out / files_of["annotated"]).is_file()
        assert all((out / f).is_file() for f in files_of["heatmaps"].values())


def test_predict_out_keeps_images_of_one_stem_apart(predict_model, tmp_path):
    model, images = predict_model
    for folder, src in (("x", "a.jpg"), ("y", "b.jpg")):
        (tmp_path / folder).mkdir()
        shutil.copy(images / src, tmp_path / folder / "img.jpg")
    out = tmp_path / "out"
    result = _predict(model, str(tmp_path / "x"), str(tmp_path / "y" / "img.jpg"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.jpg")) == ["x_img.jpg", "y_img.jpg"]  # neither overwrote the other
    assert {r["annotated"] for r in _rows(out)} == {"x_img.jpg", "y_img.jpg"}
    assert all(p.name.startswith(("x_img_", "y_img_")) for p in (out / "heatmaps").iterdir())


def test_input_names_tell_apart_paths_that_share_a_stem():
    from patchnet.outputs.results import input_names

    paths = [Path("x/img.jpg"), Path("y/img.png"), Path("z/other.jpg"), Path("x/img.jpg")]
    assert input_names(paths) == ["x_img", "y_img", "other", "x_img"]  # one path given twice: one name
    assert input_names([Path("p/A.jpg"), Path("p/a.png")]) == ["p/A.jpg", "p/a.png"]  # case aside, and same folder
    assert input_names([Path("img.jpg.png"), Path("img.jpg"), Path("img.png")]) == ["img.jpg", "img.jpg+", "img.png"]


def test_predict_out_skips_an_unreadable_image_and_writes_the_others(predict_model, tmp_path):
    model, images = predict_model
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    result = _predict(model, str(tmp_path / "broken.jpg"), str(images / "c.jpg"), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "1 of 2 images could not be read" in result.output and "Traceback" not in result.output
    assert "wrote 1 annotated images" in result.output
    assert [p.name for p in out.glob("*.jpg")] == ["c.jpg"]
    assert {r["file"] for r in _rows(out)} == {str(images / "c.jpg")}
    doc = json.loads((out / "predictions.json").read_text())
    assert list(doc["skipped"]) == [str(tmp_path / "broken.jpg")] and list(doc["outputs"]) == [str(images / "c.jpg")]


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_predict_threshold_decides_what_is_present_and_drawn(predict_model, tmp_path, threshold):
    model, images = predict_model
    out = tmp_path / "out"
    result = _predict(model, str(images / "d.jpg"), "--threshold", str(threshold), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert all(r["present"] == str(float(r["probability"]) >= threshold) for r in rows)
    drawn = sorted(r["class"] for r in rows if r["heatmap"])
    # 0: every class is present, and drawn; 1: none is, and the best class alone is drawn
    assert drawn == (sorted(model.classes) if threshold == 0.0 else [rows[0]["class"]])
    assert json.loads((out / "predictions.json").read_text())["threshold"] == threshold
    assert f"* = at or above {threshold:g}" in result.output


@pytest.mark.parametrize(
    "args, said",
    [
        (["--threshold", "1.5"], "a threshold is a probability and must lie in [0, 1], got 1.5"),
        (["--pool", "max", "--threshold", "0.5"], "carries no calibration for pooling max"),
        (["--device", "gpu"], "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_predict_refuses_bad_options_before_any_image(predict_model, tmp_path, args, said):
    model, images = predict_model
    result = runner.invoke(app, ["predict", "-c", str(model.predictor.state_path), str(images), *args])
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output
    assert "skipped" not in result.output


def test_predict_without_a_checkpoint_uses_the_shipped_model(predict_model, tmp_path):
    _, images = predict_model
    result = runner.invoke(app, ["predict", str(images / "a.jpg"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(rows) == 20 and {r["class"] for r in rows} == set(VOC_CLASSES)  # the VOC model's classes


def test_predict_of_a_folder_without_images_says_so(predict_model, tmp_path):
    model, _ = predict_model
    result = _predict(model, str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and f"no images in {tmp_path}" in result.output and ".jpg" in result.output
    assert not (tmp_path / "out").exists()


def test_predict_writes_nothing_outside_out(predict_model, tmp_path):
    model, images = predict_model
    odd = tmp_path / "in" / "..$x y.jpg"  # a name the sanitiser has to change
    odd.parent.mkdir()
    shutil.copy(images / "a.jpg", odd)
    before = _tree(tmp_path)
    out = tmp_path / "out"
    result = _predict(model, str(odd), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [p for p in _tree(tmp_path) if p not in before and not p.startswith("out")] == []
    assert all(not p.name.startswith(".") for p in out.rglob("*"))  # no hidden files, no temporary files left
    # a heatmaps folder that is a link to elsewhere is refused, and nothing is drawn there
    elsewhere, again = tmp_path / "elsewhere", tmp_path / "again"
    elsewhere.mkdir()
    again.mkdir()
    (again / "heatmaps").symlink_to(elsewhere, target_is_directory=True)
    result = _predict(model, str(images / "a.jpg"), "--out", str(again))
    assert result.exit_code == 2 and "outside its output folder" in result.output
    assert list(elsewhere.iterdir()) == [] and _tree(again) == ["heatmaps"]  # refused before any image


def test_predict_shows_a_file_name_that_is_not_utf8_escaped_and_writes_strict_json(predict_model, tmp_path):
    import os

    model, images = predict_model
    odd = tmp_path / "in" / (os.fsdecode(b"caf\xe9") + ".jpg")  # the byte is held as a lone surrogate
    broken = tmp_path / "in" / (os.fsdecode(b"bad\xff") + ".jpg")
    odd.parent.mkdir()
    shutil.copy(images / "a.jpg", odd)
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    result = _predict(model, str(odd.parent), "--out", str(out), "--json", str(tmp_path / "all.json"))
    assert result.exit_code == 1, result.output  # the broken image is skipped, the other written
    assert "Traceback" not in result.output and "caf\\xe9.jpg: " in result.output
    escaped = str(odd.parent / "caf\\xe9.jpg")
    assert [r["file"] for r in _rows(out)] == [escaped] * 3
    for path in (out / "predictions.json", tmp_path / "all.json"):
        doc = json.loads(path.read_text(encoding="utf-8"))
        decoded = json.dumps(doc, ensure_ascii=False)  # every string as read, lone surrogates kept raw
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in decoded)
        assert list(doc["images"]) == [escaped] and list(doc["skipped"]) == [str(odd.parent / "bad\\xff.jpg")]


def test_log_lines_naming_a_file_that_is_not_utf8_reach_a_strict_utf8_stream(capsys):
    import io
    import logging
    import os

    from patchnet.cli.common import PrintableLog

    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    logger = logging.getLogger("patchnet.test_printable")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    name = os.fsdecode(b"caf\xe9.jpg")
    logger.warning("skipped %s: cannot read", name)
    assert "Logging error" in capsys.readouterr().err  # the handler cannot write it as it is
    logger.addFilter(PrintableLog())
    logger.warning("skipped %s: cannot read", name)
    assert stream.buffer.getvalue().decode() == "skipped caf\\xe9.jpg: cannot read\n"


def test_predict_max_pixels_sets_the_image_limit(predict_model, tmp_path):
    model, images = predict_model
    image = images / "a.jpg"  # 96 x 72 = 6912 pixels
    result = _predict(model, str(image), "--max-pixels", "6000", "--json", str(tmp_path / "small.json"))
    assert result.exit_code == 1 and "over data.max_pixels" in result.output and "--max-pixels 6912" in result.output
    assert list(json.loads((tmp_path / "small.json").read_text())["skipped"]) == [str(image)]
    result = _predict(model, str(image), "--max-pixels", "6912")
    assert result.exit_code == 0, result.output
    result = _predict(model, str(image), "--max-pixels", "0")
    assert result.exit_code == 2 and "--max-pixels" in result.output and "Traceback" not in result.output


def test_eval_cache_dir_moves_the_feature_cache(predict_model, tmp_path):
    model, _images = predict_model
    ckpt = str(model.predictor.state_path)
    elsewhere = tmp_path / "elsewhere"
    result = runner.invoke(
        app, ["eval", "-c", ckpt, "--split", "val", "--cache-dir", str(elsewhere), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert any(p.is_file() for p in elsewhere.rglob("*"))  # the features were cached there
    again = runner.invoke(app, ["eval", "-c", ckpt, "--split", "val", "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "eval_val.json").read_text() == (tmp_path / "b" / "eval_val.json").read_text()  # same table


# --------------------------------------------------------------------------- the commands as one family


def _commands():
    """(name, click command) of every command of the app, sub-commands (cache verify) included."""
    import typer

    def walk(command, prefix):
        subs = getattr(command, "commands", None)
        if subs is None:
            yield prefix, command
            return
        for name, sub in subs.items():
            yield from walk(sub, f"{prefix} {name}".strip())

    return list(walk(typer.main.get_command(app), ""))


def _option_names(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"patchnet {version('patchnet')}"


def test_every_option_and_argument_of_every_command_has_help():
    missing = [
        f"{name} {p.name}" for name, command in _commands() for p in command.params if not (p.help or "").strip()
    ]
    assert not missing, f"without help: {missing}"


def test_help_shows_no_type_beside_flags_and_defaults_as_users_type_them():
    for name, _ in _commands():
        result = runner.invoke(app, [*name.split(), "--help"])
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, name
    result = runner.invoke(app, ["eval", "--help"])
    text = " ".join(result.output.replace("│", " ").split())  # the help's lines joined again
    assert "(default: the recipe's infer.map_prior)" in text and "-1.0" not in text
    flags = {p.name: p for p in dict(_commands())["eval"].params}
    assert flags["pointing"].is_flag and not flags["pointing"].secondary_opts  # a plain flag: no --no-pointing
    assert flags["fuse"].secondary_opts == ["--no-fuse"]


def test_one_name_per_concept_across_commands():
    commands = dict(_commands())
    # the split a command scores or reads is --split; a training split beside it is --train-split
    for name in ("eval", "features", "linear", "layers", "retrieve"):
        assert "--split" in _option_names(commands[name]), name
    for name in ("linear", "layers"):
        assert "--train-split" in _option_names(commands[name]), name
    # --pool pools patch scores (eval, predict); how image features are pooled is --features
    for name in ("features", "linear", "layers", "retrieve"):
        visible = {o for p in commands[name].params if not p.hidden for o in p.opts}
        assert "--features" in visible and "--pool" not in visible, name
    assert "--neighbours" in _option_names(commands["retrieve"])  # --k is eval's power of the power-k mean
    for name in ("eval", "localize"):
        assert {"--box-method", "--box-threshold"} <= _option_names(commands[name]), name
    for name in ("eval", "localize", "export", "features", "linear", "layers", "retrieve", "demo"):
        assert "--device" in _option_names(commands[name]), name


@pytest.mark.parametrize(
    "args",
    [
        ["features", "--split", "train", "--out", "f.npz"],
        ["linear"],
        ["layers"],
        ["retrieve", "--split", "train"],
    ],
    ids=lambda a: a[0],
)
def test_a_recipe_command_refuses_an_unknown_device_before_any_work(small_voc, tmp_path, args):
    from patchnet.recipe import save_recipe

    save_recipe(tiny_recipe(tmp_path, small_voc), tmp_path / "r.yaml")
    result = runner.invoke(app, [*args, "-r", str(tmp_path / "r.yaml"), "--device", "gpu"])
    assert result.exit_code == 2 and "unknown device 'gpu'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache").exists()  # no trunk ran


@pytest.fixture(scope="module")
def boxless_run(tmp_path_factory):
    """A tiny checkpoint trained without boxes (data.boxes: false) on a split that has them, calibrated."""
    from patchnet.training.trainer import train

    tmp = tmp_path_factory.mktemp("boxless")
    root = four_voc(tmp / "VOC", ["a", "b"])
    recipe = tiny_recipe(
        tmp,
        root,
        "data.boxes=false",
        "train.supervision=images",
        "pool.name=max",
        "train.epochs=1",
        "train.holdout=0.5",
    )
    train(recipe, progress=False)
    return recipe


def test_eval_pointing_and_localize_read_the_boxes_a_boxless_model_was_trained_without(boxless_run, tmp_path):
    recipe = boxless_run
    ckpt = str(recipe.run_dir / "last.pt")
    result = runner.invoke(
        app,
        ["eval", "-c", ckpt, "--split", "val", "--pointing", "--localize", "--device", "cpu", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "CorLoc" in result.output
    saved = json.loads((tmp_path / "eval_val.json").read_text())
    assert "pointing" in saved and saved["localization"]["pairs"] == 2
    # a split that really has no boxes is still refused, in one line
    from conftest import VocWriter

    w = VocWriter(tmp_path / "VOCnobox")
    for n, i in enumerate(("x", "y")):
        w.add(i, 96, 72, [], seed=n)
    w.split("val", ["x", "y"], {"cat": [1, -1], "dog": [-1, 1], "person": [-1, -1]})
    result = runner.invoke(
        app, ["eval", "-c", ckpt, "--data", str(w.root), "--split", "val", "--pointing", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--pointing needs boxes" in result.output and "has none" in result.output


def test_localize_prints_the_boxes_as_the_json_holds_them_with_scores_in_0_1(boxless_run, tmp_path):
    recipe = boxless_run
    images = Path(recipe.data.root) / "JPEGImages"
    out = tmp_path / "boxes.json"
    args = ["localize", str(images), "-c", str(recipe.run_dir / "last.pt"), "--device", "cpu", "--json", str(out)]
    result = runner.invoke(app, [*args, "--classes", "cat,dog", "--box-method", "map"])
    assert result.exit_code == 0, result.output
    assert "x y w h" in result.output and "COCO" in result.output
    boxes = json.loads(out.read_text())
    assert boxes and all(0.0 <= b["score"] <= 1.0 for b in boxes)
    printed = []  # "<path>: cat 0.812 at 10 12 50 40; cat 0.301 at ..."
    for line in result.output.splitlines():
        if line.startswith(str(images)):
            for part in line.split(": ", 1)[1].split("; "):
                cls, score, _, *xywh = part.split()
                printed.append((cls, float(score), [float(v) for v in xywh]))
    assert len(printed) == len(boxes)
    for (cls, score, xywh), b in zip(printed, boxes):
        assert cls == b["category"] and score == pytest.approx(b["score"], abs=1e-3)
        assert xywh == pytest.approx(b["bbox"], abs=0.5)  # printed to the pixel
    # the old option names still work
    old = runner.invoke(app, [*args, "--classes", "cat", "--method", "whole", "--threshold", "0.3"])
    assert old.exit_code == 0, old.output
    assert all(b["bbox"] == [0, 0, 96, 72] for b in json.loads(out.read_text()))
