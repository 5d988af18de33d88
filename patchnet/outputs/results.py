"""What ``patchnet predict --out`` stores: per image an annotated copy and a heatmap of each class found, then
``predictions.csv`` and ``predictions.json`` for all images.

The folder it fills::

    <out>/<name>.jpg                     the image with its top classes and probabilities, classes found ticked
    <out>/heatmaps/<name>_<class>.png    where the class was found (the same figure as tools/render_heatmaps.py)
    <out>/predictions.csv                one row per image and class, best class first
    <out>/predictions.json               the same, keyed by the image's path, with the files written for it

``<name>`` is the image's stem, or where two inputs share one, its folder and stem; every file name comes
from it through ``files.output_path`` (the sanitiser), and every file is written atomically inside ``<out>``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np

from ..api import Explanation
from ..files import UniqueNames, atomic_write, check_inside, json_text, output_path, printable
from .draw import draw_detections, label_image
from .heatmaps import write_heatmaps

CSV_COLUMNS = ["file", "rank", "class", "probability", "score", "present", "annotated", "heatmap"]


def input_names(paths: list[Path]) -> list[str]:
    """Each input's name in the outputs: its stem; where stems clash (case aside), its folder and stem
    (``holiday_IMG_0001``); where those clash too, its whole path. Two different paths never share a name."""
    names = [p.stem for p in paths]
    for level in (_folder_and_stem, str):
        counts = Counter(n.lower() for n in names)
        owners: dict[str, set[Path]] = {}
        for n, p in zip(names, paths):
            owners.setdefault(n.lower(), set()).add(p)
        # a name shared only by one path given twice is no clash: the same image gives the same files
        names = [level(p) if counts[n.lower()] > 1 and len(owners[n.lower()]) > 1 else n for n, p in zip(names, paths)]
    # a name still another path's (a stem that is another input's whole path) grows a '+' until it is its own
    taken: dict[str, Path] = {}
    for i, (n, p) in enumerate(zip(names, paths)):
        while taken.setdefault(n, p) != p:
            n += "+"
        names[i] = n
    return names


def _folder_and_stem(path: Path) -> str:
    return f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem


class PredictionFolder:
    """The output folder of ``patchnet predict --out``: ``add`` writes an image's annotated copy and heatmaps as
    it comes, ``finish`` the CSV and JSON of them all."""

    def __init__(self, out: Path, classes: list[str], top: int = 3):
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("heatmaps", "boxes"):  # a link to elsewhere is refused before any image is scored
            check_inside(out, out / sub)
        self.out, self.classes, self.top = out, classes, top
        self.rows: list[list[str]] = []
        self.outputs: dict[str, dict] = {}  # input path -> files written for it, relative to out
        self.annotated: set[Path] = set()
        self.heatmaps: set[Path] = set()
        self.boxes: set[Path] = set()
        self._images, self._maps, self._boxes = UniqueNames(), UniqueNames(), UniqueNames()
        self._map_keys: dict[str, tuple[str, str]] = {}  # file key -> (image name, class) it was made for

    def add(self, path: Path, name: str, explained: Explanation) -> None:
        """Write the annotated copy and the heatmaps of one image, and keep its CSV rows."""
        p = explained.predictions
        scores = p.scores[0]
        probs = None if p.probabilities is None else p.probabilities[0]
        present = np.zeros(len(self.classes), bool) if p.present is None else p.present[0]
        shown = scores if probs is None else probs
        order = [int(c) for c in np.argsort(-shown, kind="stable")]
        # the label lists the top classes, and any class found below them
        labelled = [c for rank, c in enumerate(order) if rank < self.top or present[c]]
        drawn = label_image(explained.image, [(self.classes[c], f"{shown[c]:.2f}", bool(present[c])) for c in labelled])
        annotated = output_path(self.out, name, ".jpg", self._images)
        atomic_write(annotated, lambda f: drawn.save(f, "JPEG", quality=90))
        self.annotated.add(annotated)
        maps: dict[str, str] = {}
        for cls, values in explained.maps.items():
            c = self.classes.index(cls)
            target = self._map_path(name, cls)
            write_heatmaps(
                explained.image,
                [values],
                [cls],
                [float(scores[c])],
                target,
                None if probs is None else [float(probs[c])],
                cols=1,
            )
            self.heatmaps.add(target)
            maps[cls] = target.relative_to(self.out).as_posix()
        drawn_name = annotated.relative_to(self.out).as_posix()
        self.outputs[str(path)] = {"annotated": drawn_name, "heatmaps": maps}
        if explained.boxes:  # the detection head's boxes (train.detector), drawn and listed
            target = output_path(self.out / "boxes", name, ".png", self._boxes)
            target.parent.mkdir(exist_ok=True)
            draw_detections(explained.image, explained.boxes, self.classes, target)
            self.boxes.add(target)
            self.outputs[str(path)]["boxes"] = target.relative_to(self.out).as_posix()
            self.outputs[str(path)]["detections"] = [d.to_dict(self.classes) for d in explained.boxes]
        for rank, c in enumerate(order, 1):
            self.rows.append(
                [
                    printable(path),
                    str(rank),
                    self.classes[c],
                    "" if probs is None else f"{probs[c]:.6f}",
                    f"{scores[c]:.6f}",
                    "" if p.present is None else str(bool(present[c])),
                    drawn_name,
                    maps.get(self.classes[c], ""),
                ]
            )

    def _map_path(self, name: str, cls: str) -> Path:
        """heatmaps/<name>_<class>.png; a key that another (image, class) pair already made ('a_b' + 'c' against
        'a' + 'b_c') grows a '+' until it is its own."""
        key = f"{name}_{cls}"
        while self._map_keys.setdefault(key, (name, cls)) != (name, cls):
            key += "+"
        # checked against out too: a heatmaps link that points elsewhere would pass the check of its own folder
        return check_inside(self.out, output_path(self.out / "heatmaps", key, ".png", self._maps))

    def finish(self, document: dict) -> tuple[Path, Path]:
        """Write predictions.csv (the rows kept) and predictions.json (``document`` with the files written)."""
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(CSV_COLUMNS)
        w.writerows(self.rows)
        csv_path = atomic_write(output_path(self.out, "predictions", ".csv"), text.getvalue())
        json_path = output_path(self.out, "predictions", ".json")
        atomic_write(json_path, json_text({**document, "outputs": self.outputs}, indent=1))
        return csv_path, json_path

    def summary(self) -> str:
        """What was written where, in one line."""
        return (
            f"wrote {len(self.annotated)} annotated images, {len(self.heatmaps)} heatmaps, "
            + (f"{len(self.boxes)} images with boxes, " if self.boxes else "")
            + f"predictions.csv and predictions.json to {self.out}"
        )
