#!/usr/bin/env python
"""Hostile and messy input through every command: one table of what each case gets.

    python benchmarks/hostile.py                     # this checkout
    python benchmarks/hostile.py --repo ../old-main  # another checkout of patchnet, for a before/after table

Each case builds its files in a fresh folder (``user/``: the user's data, never to change; ``work/``:
the current folder of the commands, where runs, caches and outputs go), then runs the real commands
(``patchnet inspect``, ``train`` for one epoch of a tiny model, ``eval``, ``predict``, ``cache verify``,
``tools/render_heatmaps.py``, ``tools/top_patches.py``) as subprocesses and classifies each outcome:

- clear error: exit code 1 or 2 with one ``error:`` line or a summary, no traceback;
- counted skip: finished, with a logged count of what was skipped, dropped or recomputed;
- ok: finished without a word about the input (converted images included);
- TRACEBACK / WRONG: a traceback, or another outcome than the case expects.

Other rows check files after the commands (a run folder, a cache, decoded pixels, JSON); a few commands are
killed on purpose or see a simulated full disk (``patched``), their rows expecting ``exit -9`` or the error.

Beside it: whether any byte under ``user/`` changed, and whether a file appeared outside the output
folders (``work/out*``, ``work/cache``, ``work/runs``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "person"]
OUTPUTS = ("work/out", "work/cache", "work/runs", "work/recipe", "work/.cache")


# --------------------------------------------------------------------------- building files


def image(path: Path, w: int = 64, h: int = 48, seed: int = 0, mode: str = "RGB", **save) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode != "RGB" else img
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


def png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def voc(root: Path, ids=("a", "b", "c", "d")) -> Path:
    objs = {
        "a": ("cat", 5, 5, 40, 40),
        "b": ("dog", 10, 5, 60, 45),
        "c": ("person", 3, 10, 50, 48),
        "d": ("cat", 20, 10, 64, 48),
    }
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(ids):
        image(root / "JPEGImages" / f"{i}.jpg", seed=n)
        name, x1, y1, x2, y2 = objs[i]
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>64</width><height>48</height></size><object>"
            f"<name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object></annotation>"
        )
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids) + "\n")
    return root


def coco_file(root: Path, data: dict, name: str = "annotations/instances_train.json", images: str = "train") -> None:
    for img in data.get("images", []):
        if isinstance(img.get("file_name"), str):
            image(root / images / img["file_name"], seed=hash(img["file_name"]) % 100)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(data))


def coco_data() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
            {"id": 3, "file_name": "c.jpg", "width": 64, "height": 48},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 30, 30]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [5, 5, 40, 30]},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [10, 4, 30, 40]},
        ],
    }


def recipe(
    work: Path,
    name: str,
    fmt: str,
    root: Path,
    classes: list[str] | None = None,
    images: bool = False,
    chunk: int = 2,
    limit: int = 0,
) -> Path:
    """A tiny recipe (Lite0 at 32 px, two scales, one epoch) in work/recipe/<name>.yaml."""
    lines = [
        f"name: {name}",
        "data:",
        f"  format: {fmt}",
        f"  root: {root}",
        f"  classes: {json.dumps(classes if classes is not None else [])}",
        "  train_split: train",
        '  val_split: ""',
        f"  limit: {limit}",
        "patches: {scales: [1.0, 2.0], step: 0.5}",
        "backbone: {input_size: 32, precision: fp32}",
        "head: {hidden: 32}",
        "train: {epochs: 1, batch_size: 8, precision: fp32, holdout: 0, eval_every: 1"
        + (", supervision: images}" if images else "}"),
        "pool: {name: topk}" if images else "pool: {name: power}",
        "runtime: {device: cpu, workers: 0, cache_dir: cache, output: runs, heatmaps: 0}",
        "cache: {chunk: " + str(chunk) + "}",
    ]
    path = work / "recipe" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- running and judging


class Case:
    def __init__(self, root: Path, name: str, repo: Path):
        self.name, self.repo = name, repo
        self.dir = root / name
        self.user, self.work = self.dir / "user", self.dir / "work"
        self.user.mkdir(parents=True)
        self.work.mkdir(parents=True)
        self.rows: list[tuple] = []

    def snapshot(self) -> tuple[dict, set]:
        user = {
            str(p): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(self.user.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        others = {
            str(p.relative_to(self.dir))
            for p in self.dir.rglob("*")
            if p.is_file() and not str(p.relative_to(self.dir)).startswith(("user", *OUTPUTS))
        }
        return user, others

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": str(self.repo), "PYTHONWARNINGS": "ignore"}

    def run(
        self, label: str, args: list, expect: str, tool: str = "", timeout: int = 600, program: str = "", names=()
    ) -> str:
        """Run a command (``tool``: a script of tools/; ``program``: a Python snippet, see ``patched``) and add its
        row; ``names``: what its output must say besides (a file, a field, a pid)."""
        before = self.snapshot()
        cmd = [sys.executable, "-c", program] if program else [sys.executable, "-m", "patchnet.cli"]
        cmd = [sys.executable, str(self.repo / "tools" / tool)] if tool else cmd
        try:
            p = subprocess.run(
                cmd + [a if isinstance(a, bytes) else str(a) for a in args],
                cwd=self.work,
                env=self.env(),
                capture_output=True,
                text=True,
                errors="surrogateescape",  # bytes that are not UTF-8 come back as lone surrogates, to be found
                timeout=timeout,
            )
            code, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            code, text = -1, "timed out"
        after = self.snapshot()
        outcome = judge(code, text)
        changed = "changed" if after[0] != before[0] else "unchanged"
        outside = ", ".join(sorted(after[1] - before[1])) or "none"
        missing = [n for n in names if n not in text]
        verdict = "" if outcome == expect else " ✗ (expected " + expect + ")"
        verdict = verdict or (f" ✗ (does not say {missing[0]!r})" if missing else "")
        said = first_line(text, code).replace(str(self.dir) + "/", "").replace(str(self.dir), "")
        self.rows.append((self.name, label, outcome + verdict, changed, outside, said[:110]))
        return text

    def inspect(self, label: str, data: Path, fmt: str, expect: str, split: str = "train") -> str:
        args = ["inspect", "--data", data, "--format", fmt, "--split", split, "--out", "out/i.png"]
        return self.run(label, args, expect)

    def check(self, label: str, ok: bool, detail: str) -> None:
        """A row for a fact checked after the commands (files, their contents)."""
        self.rows.append((self.name, label, "ok" if ok else f"{detail} ✗ (expected ok)", "", "", detail[:110]))

    def start(self, args: list, log: Path | None = None) -> subprocess.Popen:
        """A command in the background, its output to ``log`` (else a pipe)."""
        with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as out:
            return subprocess.Popen(
                [sys.executable, "-m", "patchnet.cli", *map(str, args)],
                cwd=self.work,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def python(self, code: str, *args) -> str:
        """A snippet run with the checkout's patchnet: its output."""
        p = subprocess.run(
            [sys.executable, "-c", code, *map(str, args)], env=self.env(), capture_output=True, text=True, timeout=300
        )
        return p.stdout + p.stderr


def patched(setup: str) -> str:
    """A ``python -c`` program: ``setup`` (a monkeypatch: a full disk, a kill), then the command line as usual."""
    return setup + "\nimport sys\nsys.argv[0] = 'patchnet'\nfrom patchnet.cli import main\n\nmain()\n"


def judge(code: int, text: str) -> str:
    if "Traceback (most recent call last)" in text:
        return "TRACEBACK"
    if code == -1:
        return "HANG"
    counted = any(w in text for w in ("skipped", "dropped", "left out", "computing it again", "damaged", "deleted"))
    if code in (1, 2) and ("error:" in text or "could not be read" in text or "damaged" in text):
        return "counted skip" if code == 1 and "could not be read" in text else "clear error"
    if code == 0:
        return "counted skip" if counted else "ok"
    return f"exit {code}"


def first_line(text: str, code: int) -> str:
    """The line that says what happened: the error, the skip summary or the first warning."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for key in ("Error:", "error:", "could not be read", "WARNING:", "damaged", "deleted"):
        for ln in lines:
            if key in ln:
                return ln[:150]
    return (lines[-1][:150] if lines else "") if code else ""


# --------------------------------------------------------------------------- the cases


def build_cases(root: Path, repo: Path) -> list[Case]:
    cases = []

    def case(name):
        c = Case(root, name, repo)
        cases.append(c)
        return c

    # a clean model for predict and the tools
    c = case("clean model")
    data = voc(c.user / "VOC")
    r = recipe(c.work, "clean", "voc", data, CLASSES)
    c.run("train", ["train", "--recipe", r], "ok")
    clean = c.work / "runs" / "clean" / "last.pt"

    c = case("1 demo format on a real VOC folder")
    data = voc(c.user / "VOC")
    c.inspect("inspect --format demo", data, "demo", "clear error")
    demo_recipe = recipe(c.work, "d", "demo", c.work / "out" / "demo", limit=6)
    c.run("train (demo, generated in work/out/demo)", ["train", "--recipe", demo_recipe], "ok")
    c.run(
        "eval demo model --data <VOC>",
        ["eval", "--checkpoint", "runs/d/last.pt", "--data", data, "--split", "train", "--out", "out"],
        "clear error",
    )

    c = case("2 ids and classes that climb out")
    (c.user / "ESCAPED").mkdir()
    image(c.user / "ESCAPED" / "a.png", seed=1)
    for i in range(3):
        image(c.user / "x" / "y" / f"{i}.jpg", seed=i + 2)
    (c.user / "x" / "y" / "train.csv").write_text(
        "path,labels\n../../ESCAPED/a.png,x/../../TP_PWNED\n0.jpg,dog\n1.jpg,x/../../TP_PWNED;dog\n2.jpg,dog\n"
    )
    r = recipe(c.work, "esc", "csv", c.user / "x" / "y", images=True)
    c.inspect("inspect", c.user / "x" / "y", "csv", "ok")
    c.run("train", ["train", "--recipe", r], "ok")
    c.run(
        "render_heatmaps --split --no-grid",
        ["--checkpoint", "runs/esc/last.pt", "--split", "train", "--no-grid", "--out", "out/h"],
        "ok",
        tool="render_heatmaps.py",
    )
    c.run(
        "top_patches",
        ["--checkpoint", "runs/esc/last.pt", "--split", "train", "--n", "2", "--out", "out/t"],
        "ok",
        tool="top_patches.py",
    )

    c = case("3 decompression bomb and 60 MP PNG in a folder")
    for cls, n in (("cat", 2), ("dog", 2)):
        for i in range(n):
            image(c.user / "f" / "train" / cls / f"{i}.jpg", seed=i)
    (c.user / "f" / "train" / "cat" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (c.user / "f" / "train" / "dog" / "pano.png").write_bytes(png_header(10_000, 6_000))
    r = recipe(c.work, "bomb", "folder", c.user / "f", images=True)
    c.inspect("inspect", c.user / "f", "folder", "counted skip")
    c.run("train", ["train", "--recipe", r], "counted skip")
    c.run(
        "predict bomb.png + a good image",
        [
            "predict",
            "--checkpoint",
            clean,
            c.user / "f" / "train" / "cat" / "bomb.png",
            c.user / "f" / "train" / "cat" / "0.jpg",
            "--json",
            "out/p.json",
        ],
        "counted skip",
    )

    c = case("4 two runs on one cache key at once")
    data = voc(c.user / "VOC")
    r1, r2 = recipe(c.work, "one", "voc", data, CLASSES, chunk=1), recipe(c.work, "two", "voc", data, CLASSES, chunk=1)
    before = c.snapshot()
    procs = [c.start(["train", "--recipe", r]) for r in (r1, r2)]
    texts = [p.communicate(timeout=600)[0] for p in procs]
    outcomes = [judge(p.returncode, t) for p, t in zip(procs, texts)]
    after = c.snapshot()
    ok = all(o == "ok" for o in outcomes)
    c.rows.append(
        (
            c.name,
            "2 x train at once",
            ("ok" if ok else " / ".join(outcomes) + " ✗ (expected ok)"),
            "changed" if after[0] != before[0] else "unchanged",
            ", ".join(sorted(after[1] - before[1])) or "none",
            next((first_line(t, 1) for t in texts if "Traceback" in t), ""),
        )
    )

    c = case("5 damaged cache")
    data = voc(c.user / "VOC")
    r = recipe(c.work, "dmg", "voc", data, CLASSES)
    c.run("train", ["train", "--recipe", r], "ok")
    caches = [p for p in (c.work / "cache").iterdir() if (p / "features.f16").is_file()]
    f = caches[0] / "features.f16"
    raw = bytearray(f.read_bytes())
    raw[64:96] = b"\xff" * 32
    f.write_bytes(bytes(raw))
    c.run("flipped bytes: cache verify", ["cache", "verify", "--cache-dir", "cache"], "clear error")
    f.write_bytes(bytes(raw[: len(raw) // 2]))
    c.run(
        "truncated features.f16: eval",
        ["eval", "--checkpoint", "runs/dmg/last.pt", "--split", "train", "--out", "out"],
        "clear error",
    )
    # a build killed mid-way leaves a half-written chunk where an atomic write would not
    shutil.rmtree(caches[0])
    (caches[0] / "chunks").mkdir(parents=True)
    (caches[0] / "chunks" / "000000.npz").write_bytes(b"PK\x03\x04 half a chunk")
    c.run("garbage chunk of a killed build: train", ["train", "--recipe", r, "--overwrite"], "counted skip")

    c = case("6 COCO from labelling tools")
    d = coco_data()
    d["images"][1]["id"] = "b2"
    d["annotations"][1]["image_id"] = "b2"
    coco_file(c.user / "mixed", d)
    c.inspect("mixed string/int ids: inspect", c.user / "mixed", "coco", "ok")
    for label, change in (
        ("missing file_name", lambda d: d["images"][0].pop("file_name")),
        ("2-number bbox", lambda d: d["annotations"][0].update(bbox=[1, 2])),
        ("two categories named cat", lambda d: d["categories"].append({"id": 9, "name": "cat"})),
    ):
        d = coco_data()
        coco_file(c.user / label.replace(" ", "_"), d)
        change(d)
        (c.user / label.replace(" ", "_") / "annotations" / "instances_train.json").write_text(json.dumps(d))
        c.inspect(f"{label}: inspect", c.user / label.replace(" ", "_"), "coco", "clear error")
    d = coco_data()
    d["categories"].insert(0, {"id": 0, "name": "animals", "supercategory": "none"})
    coco_file(c.user / "roboflow", d, "train/_annotations.coco.json", "train")
    c.inspect("Roboflow export: inspect", c.user / "roboflow", "coco", "counted skip")
    c.run(
        "Roboflow export: train",
        ["train", "--recipe", recipe(c.work, "rf", "coco", c.user / "roboflow")],
        "counted skip",
    )

    c = case("7 duplicate ids")
    for i in range(3):
        image(c.user / "csv" / f"{i}.jpg", seed=i)
    (c.user / "csv" / "train.csv").write_text("0.jpg,cat\n1.jpg,dog\n0.jpg,cat\n2.jpg,dog\n")
    c.inspect("identical CSV rows: inspect", c.user / "csv", "csv", "counted skip")
    (c.user / "csv" / "val.csv").write_text("0.jpg,cat\n1.jpg,dog\n0.jpg,dog\n")
    c.inspect("conflicting CSV rows: inspect", c.user / "csv", "csv", "clear error", split="val")
    image(c.user / "f" / "train" / "cat" / "a.jpg", seed=1)
    image(c.user / "f" / "train" / "cat" / "a.png", seed=2)
    image(c.user / "f" / "train" / "dog" / "b.jpg", seed=3)
    image(c.user / "f" / "train" / "dog" / "c.jpg", seed=4)
    c.run(
        "a.jpg + a.png: train", ["train", "--recipe", recipe(c.work, "dup", "folder", c.user / "f", images=True)], "ok"
    )
    c.run(
        "a.jpg + a.png: heatmaps",
        ["--checkpoint", "runs/dup/last.pt", "--split", "train", "--out", "out/h"],
        "ok",
        tool="render_heatmaps.py",
    )
    heat = list((c.work / "out" / "h").glob("*.png")) if (c.work / "out" / "h").is_dir() else []
    c.rows.append(
        (
            c.name,
            "a.jpg + a.png: heatmap files",
            "ok" if len(heat) == 4 else f"{len(heat)} files for 4 images ✗ (expected ok)",
            "",
            "",
            "",
        )
    )

    c = case("8 an unreadable file among good ones")
    good = image(c.user / "p" / "good.jpg", seed=1)
    (c.user / "p" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    c.run(
        "predict",
        ["predict", "--checkpoint", clean, c.user / "p" / "broken.jpg", good, "--json", "out/p.json"],
        "counted skip",
    )
    c.run(
        "render_heatmaps <folder>",
        ["--checkpoint", clean, c.user / "p", "--out", "out/h"],
        "counted skip",
        tool="render_heatmaps.py",
    )

    c = case("9 CSV encodings and folders")
    for i in range(3):
        image(c.user / "csv" / f"{i}.jpg", seed=i)
    (c.user / "csv" / "train.csv").write_bytes("path,labels\n0.jpg,café\n1.jpg,thé\n".encode("latin-1"))
    c.inspect("Latin-1 CSV: inspect", c.user / "csv", "csv", "clear error")
    (c.user / "csv" / "bom.csv").write_bytes("path,labels\r\n0.jpg,café\r\n1.jpg,thé\r\n".encode("utf-8-sig"))
    c.inspect("Excel UTF-8 CSV with BOM: inspect", c.user / "csv", "csv", "ok", split="bom")
    (c.user / "csv" / "empty.csv").write_text("0.jpg,\n1.jpg,\n")
    c.inspect("no label at all: inspect", c.user / "csv", "csv", "clear error", split="empty")
    base = c.user / "f" / "train"
    image(base / "cat" / "a.jpg", seed=1)
    image(base / "cat" / "2019" / "b.jpg", seed=2)
    image(base / "dog" / "c.jpg", seed=3)
    image(base / "dog" / "d.jpg", seed=4)
    (base / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (base / "cat" / "._a.jpg").write_bytes(b"\0\5\26\7")
    (base / ".git").mkdir()
    (base / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (base / "dog" / "loop").symlink_to(base / "dog")
    c.run(
        "hidden entries, link loop, nested: train",
        ["train", "--recipe", recipe(c.work, "fold", "folder", c.user / "f", images=True)],
        "counted skip",
        timeout=120,
    )

    c = case("10 smaller tracebacks")
    for i in range(3):
        image(c.user / "csv" / f"{i}.jpg", seed=i)
    (c.user / "csv" / "train.csv").write_text("0.jpg,$x_$\n1.jpg,$\\frac{$\n2.jpg,$x_$\n")
    c.run(
        "$x_$ class names: train",
        ["train", "--recipe", recipe(c.work, "math", "csv", c.user / "csv", images=True)],
        "ok",
    )
    c.run(
        "$x_$ class names: heatmaps",
        ["--checkpoint", "runs/math/last.pt", "--split", "train", "--out", "out/h"],
        "ok",
        tool="render_heatmaps.py",
    )
    c.run(
        "--set train.lr=[1",
        ["train", "--recipe", recipe(c.work, "m2", "csv", c.user / "csv", images=True), "--set", "train.lr=[1"],
        "clear error",
    )
    import torch

    state = torch.load(clean, weights_only=True)
    state["head"]["fca.0.weight"] = state["head"]["fca.0.weight"][:, :100]
    (c.work / "out").mkdir(exist_ok=True)
    torch.save(state, c.work / "out" / "edited.pt")
    c.run(
        "head of the wrong size: predict",
        ["predict", "--checkpoint", "out/edited.pt", c.user / "csv" / "0.jpg"],
        "clear error",
    )
    (c.work / "out" / "file").write_text("a file where a folder should be")
    c.run(
        "unwritable cache folder: train",
        [
            "train",
            "--recipe",
            recipe(c.work, "ro", "csv", c.user / "csv", images=True),
            "--set",
            "runtime.cache_dir=out/file/cache",
        ],
        "clear error",
    )

    c = case("11 checkpoints that are not one")
    (c.work / "out").mkdir()
    state = torch.load(clean, weights_only=True)
    torch.save([1, 2], c.work / "out" / "list.pt")
    torch.save({k: v for k, v in state.items() if k != "classes"}, c.work / "out" / "no_classes.pt")
    raw = clean.read_bytes()
    (c.work / "out" / "cut.pt").write_bytes(raw[: len(raw) // 2])
    good = image(c.user / "a.jpg")
    for f, what in (("list.pt", "a list"), ("no_classes.pt", "no 'classes'"), ("cut.pt", "truncated")):
        names = (f"out/{f}", "classes") if f == "no_classes.pt" else (f"out/{f}",)
        c.run(
            f"{what}: eval", ["eval", "-c", f"out/{f}", "--split", "train", "--out", "out"], "clear error", names=names
        )
        c.run(f"{what}: predict", ["predict", "-c", f"out/{f}", good], "clear error", names=names)

    c = case("12 resume and the run folder")
    data = voc(c.user / "VOC")
    (data / "ImageSets/Main/train.txt").write_text("a\nb\nc\n")
    r, run_dir = recipe(c.work, "run", "voc", data, CLASSES), c.work / "runs" / "run"
    c.run("train (3 images)", ["train", "--recipe", r], "ok")  # best.pt and last.pt: no selection images
    (data / "ImageSets/Main/train.txt").write_text("a\nb\nc\nd\n")
    c.run(
        "image d added: train --resume",
        ["train", "--recipe", r, "--resume", "--epochs", "2"],
        "clear error",
        names=("1 training image added",),
    )
    before = sorted(p.name for p in run_dir.glob("*.pt"))
    die = patched("import os, patchnet.checkpoint as ck\nck.atomic_write = lambda *a: os.kill(os.getpid(), 9)\n")
    c.run("train --overwrite, killed at its 1st save", ["train", "--recipe", r, "--overwrite"], "exit -9", program=die)
    after = sorted(p.name for p in run_dir.glob("*.pt"))
    c.check("files after: no stale best.pt, last.pt", bool(before) and not after, f"{before} before, {after} after")
    (c.work / "out").mkdir()
    first = c.start(["train", "--recipe", r, "--overwrite", "--epochs", "2000"], log=c.work / "out" / "first.log")
    lock, deadline = run_dir / ".lock", time.time() + 300
    while first.poll() is None and time.time() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(first.pid):
            break
        time.sleep(0.2)
    c.run(
        "a second train --overwrite on the folder meanwhile",
        ["train", "--recipe", r, "--overwrite"],
        "clear error",
        names=(f"pid {first.pid}",),
    )
    first.send_signal(signal.SIGINT)
    try:
        first.wait(timeout=120)
    except subprocess.TimeoutExpired:
        first.kill()
        first.wait()
    full = (  # the third checkpoint write (epoch 2's best.pt) fails half-way, as on a full disk
        "import errno, patchnet.checkpoint as ck\nwrite, n = ck.atomic_write, [0]\n"
        "def half(f):\n    f.write(b'\\0' * 4096)\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "def full(path, fill):\n    n[0] += 1\n    return write(path, fill if n[0] < 3 else half)\n"
        "ck.atomic_write = full\n"
    )
    c.run(
        "disk full at the 3rd save (simulated): train",
        ["train", "--recipe", r, "--overwrite", "--epochs", "2"],
        "clear error",
        program=patched(full),
        names=("runs/run", "disk is full", "intact"),
    )
    try:
        last = torch.load(run_dir / "last.pt", weights_only=True)
        kept = f"last.pt of epoch {last['epoch']}"
    except Exception as e:
        last, kept = None, f"last.pt: {type(e).__name__}"
    left = sorted(p.name for p in run_dir.iterdir() if "tmp" in p.name)
    c.check("files after the full disk", bool(last) and last["epoch"] == 1 and not left, f"{kept}, temporary {left}")

    c = case("13 16-bit, 32-bit and float images")
    ramp = np.tile(np.linspace(0, 1, 64), (48, 1))  # 0 to half of each type's range: 0 to 128 in 8 bits
    deep = {
        "i16.png": (ramp * 32767).astype(np.uint16),  # mode I;16
        "i32.tif": (ramp * 2**30).astype(np.int32),  # mode I
        "f32.tif": (ramp * 0.5).astype(np.float32),  # mode F
    }
    for name, arr in deep.items():
        Image.fromarray(arr).save(c.user / name)
    files = [c.user / n for n in deep]
    c.run("predict --out", ["predict", "-c", clean, *files, "--out", "out/p"], "ok")
    code = "import sys\nfrom patchnet.data.images import load_image\nfor f in sys.argv[1:]:\n    a = load_image(f)\n"
    said = c.python(code + "    print(a.min(), a.max())", *files).split()
    for n, name in enumerate(deep):
        lo, hi = said[2 * n : 2 * n + 2] if len(said) == 2 * len(deep) else ("?", " ".join(said)[-80:])
        c.check(
            f"{name} decoded (0 to 128 expected)", lo in "012" and hi.isdigit() and 124 <= int(hi) <= 132, f"{lo}-{hi}"
        )

    c = case("14 a file name that is not UTF-8")
    cafe = os.fsencode(c.user) + b"/caf\xe9.jpg"
    image(Path(os.fsdecode(cafe)), seed=1)
    good = image(c.user / "good.jpg", seed=2)
    text = c.run("predict --out", ["predict", "-c", clean, cafe, good, "--out", "out/p"], "ok")
    bad = ["its output"] if any("\ud800" <= ch <= "\udfff" for ch in text) else []
    for f in ("predictions.json", "predictions.csv"):
        try:
            got = (c.work / "out" / "p" / f).read_bytes().decode("utf-8")
            got = json.dumps(json.loads(got), ensure_ascii=False).encode("utf-8") if f.endswith("json") else got
        except (OSError, ValueError) as e:  # not there, not UTF-8, not JSON, or a lone surrogate in it
            bad.append(f"{f} ({type(e).__name__})")
    c.check("output, predictions.json and .csv: UTF-8, no lone surrogates", not bad, ", ".join(bad) or "all UTF-8")

    c = case("15 a cache build killed, resumed with another chunk size")
    data = voc(c.user / "VOC")
    kill = (  # SIGKILL after the second chunk file is written
        "import os, signal, patchnet.store.build as b\nsave, n = b.save_chunk, [0]\n"
        "def save_then_die(*a, **k):\n    save(*a, **k)\n    n[0] += 1\n"
        "    if n[0] == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "b.save_chunk = save_then_die\n"
    )
    r = recipe(c.work, "chunks", "voc", data, CLASSES, chunk=1)
    c.run("train, chunk 1, killed after 2 of 4 chunks", ["train", "--recipe", r], "exit -9", program=patched(kill))
    r, fresh = recipe(c.work, "chunks", "voc", data, CLASSES, chunk=3), ["--set", "runtime.cache_dir=out/cache"]
    c.run("train again, chunk 3", ["train", "--recipe", r], "counted skip", names=("computing it again",))
    c.run("the same, fresh in another cache folder", ["train", "--recipe", r, "--overwrite", *fresh], "ok")
    diff = same_caches(c.work / "cache", c.work / "out" / "cache")
    c.check("resumed cache = fresh cache", not diff, diff or "same features and indexes")
    return cases


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays; floats to 1e-2 (features of a trunk pass computed twice)."""
    return a.shape == b.shape and (np.allclose(a, b, atol=1e-2) if a.dtype.kind == "f" else np.array_equal(a, b))


def same_caches(a: Path, b: Path) -> str:
    """'' where the complete caches under ``a`` and ``b`` hold the same files and features, else what differs."""
    pa, pb = ([p for p in d.iterdir() if (p / "meta.json").is_file()] if d.is_dir() else [] for d in (a, b))
    if len(pa) != 1 or len(pb) != 1 or pa[0].name != pb[0].name:
        return f"cache folders {[p.name for p in pa]} and {[p.name for p in pb]}"
    fa, fb = (sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) for d in (pa[0], pb[0]))
    if fa != fb:
        return f"files {fa} and {fb}"
    for f in (f for f in fa if not f.endswith(".json")):  # meta.json holds cache.chunk
        x, y, dtype = pa[0] / f, pb[0] / f, np.float16 if f.endswith(".f16") else np.uint8
        if f.endswith(".npz"):  # its zip entries carry their time: compared array by array
            with np.load(x) as u, np.load(y) as v:
                if u.files != v.files or not all(close(u[k], v[k]) for k in u.files):
                    return f"{f} differs"
        elif not close(np.fromfile(x, dtype), np.fromfile(y, dtype)):
            return f"{f} differs"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(REPO), help="the patchnet checkout to run (default: this one)")
    ap.add_argument("--keep", default="", help="keep the case folders here (default: a temporary folder)")
    args = ap.parse_args()
    sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8, as a command said it
    sys.path.insert(0, str(Path(__file__).parent))
    from common import table

    root = Path(args.keep or tempfile.mkdtemp(prefix="hostile-"))
    start = time.time()
    cases = build_cases(root, Path(args.repo).resolve())
    rows = [r for c in cases for r in c.rows]
    print(f"\npatchnet at {args.repo}; {len(rows)} commands in {(time.time() - start) / 60:.1f} min\n")
    print(table(rows, ("case", "command", "outcome", "user files", "new files outside the outputs", "what it said")))
    bad = [r for r in rows if "✗" in r[2] or r[3] == "changed" or r[4] not in ("none", "")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} as expected")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
