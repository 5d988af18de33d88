import json
import re
import shutil

import numpy as np
import pytest

from patchnet.data import ImageRecord
from patchnet.head.pooling import l2_normalize
from patchnet.studies.linear import SplitFeatures
from patchnet.studies.retrieve import (
    all_neighbours,
    box_area,
    class_colours,
    collection_page,
    distances,
    embed_2d,
    main_class,
    nearest,
    precision_at_k,
)

from conftest import write_image


def test_l2_distances_and_ranking_on_hand_built_vectors():
    index = np.array([[1.0, 0, 0], [0, 2.0, 0], [3.0, 3.0, 0], [0, 0, 5.0]])
    query = np.array([[2.0, 0.1, 0]])
    d = distances(query, index)
    # normalised: q ~ (0.9988, 0.0499, 0); distances follow the angle, not the length
    want = np.linalg.norm(l2_normalize(query) - l2_normalize(index), axis=1)
    np.testing.assert_allclose(d[0], want)
    assert nearest(d, 3)[0].tolist() == [0, 2, 1]
    np.testing.assert_allclose(d[0, 3], np.sqrt(2))
    # leaving an index out (the query itself, when it is in the collection)
    assert nearest(d, 2, exclude=np.array([0]))[0].tolist() == [2, 1]


def test_precision_at_k_by_hand():
    labels = np.array([[1, -1], [1, -1], [-1, 1], [1, 1]])
    neighbours = np.array([[1, 2], [0, 3], [3, 0], [0, 1]])  # of each image as a query
    p = precision_at_k(neighbours, labels, labels)
    # class 0 queries: 0 -> 1/2, 1 -> 2/2, 3 -> 2/2; class 1 queries: 2 -> 1/2, 3 -> 0/2
    np.testing.assert_allclose(p, [(0.5 + 1 + 1) / 3, (0.5 + 0) / 2])


def test_all_neighbours_in_chunks_match_nearest():
    x = np.random.default_rng(0).normal(size=(23, 5))
    idx, d = all_neighbours(x, 4, chunk=7)
    full = distances(x, x)
    want = nearest(full, 4, exclude=np.arange(23))
    assert idx.tolist() == want.tolist()
    np.testing.assert_allclose(d, np.take_along_axis(full, want, 1))
    assert all_neighbours(x[:3], 8)[0].shape == (3, 2)  # never more neighbours than other images


def _clusters(n=30, d=64, seed=0):
    """Two clusters, far apart after L2 normalisation: the first half around +mu, the second around -mu."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    side = np.repeat([1.0, -1.0], n // 2)
    return side[:, None] * mu + 0.3 * rng.normal(size=(n, d)), side


def test_embed_2d_one_point_per_image_and_keeps_clusters_apart():
    x, side = _clusters()
    xy = embed_2d(x, seed=0, pca_dims=8)  # 64 -> 8 dims by PCA first
    assert xy.shape == (30, 2) and np.isfinite(xy).all()
    assert xy.min() >= 0 and xy.max() <= 1 and np.isclose((xy.max(0) - xy.min(0)).max(), 1)
    # every point's nearest point on the map is of its own cluster
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(30) * 9
    assert (side[d.argmin(1)] == side).all()
    assert embed_2d(x[:1]).shape == (1, 2)


def test_main_class_largest_box_else_first_label_and_colours():
    labels = np.array([[1, 1, -1], [-1, 1, 1], [0, -1, -1], [-1, -1, 1]])
    assert main_class(labels).tolist() == [0, 1, -1, 2]
    recs = [
        ImageRecord(
            "a",
            None,
            100,
            100,
            np.array([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 90, 90]], np.float32),
            np.array([0, 1, 0]),
            np.array([False, False, True]),
            labels[0],
        ),
        ImageRecord(
            "b",
            None,
            100,
            100,
            np.array([[0, 0, 20, 10], [0, 0, 10, 10]], np.float32),
            np.array([1, 2]),
            np.array([False, False]),
            labels[1],
        ),
    ]
    area = box_area(recs, 3)  # the difficult box of class 0 does not count
    np.testing.assert_allclose(area, [[100, 2500, 0], [0, 200, 100]])
    assert main_class(labels[:2], area).tolist() == [1, 1]
    colours = class_colours(20)
    assert len(set(colours)) == 20 and all(re.fullmatch("#[0-9a-f]{6}", c) for c in colours)
    assert len(set(class_colours(80))) == 80


def _page(tmp_path, ids=("a", "b", "c", "d", "e", "</script><b>x")):
    x, side = _clusters(n=len(ids), d=16)
    paths = [write_image(tmp_path / f"{n}.jpg", 90 + 7 * n, 60, seed=n) for n in range(len(ids))]
    labels = np.where(np.stack([side > 0, side < 0, np.arange(len(ids)) == 0], 1), 1, -1).astype(np.int8)
    f = SplitFeatures(list(ids), x.astype(np.float32), labels, ["cat", "dog", "person"])
    queries = [{"name": "a", "path": paths[0], "row": 0}, {"name": "new", "path": paths[1], "feature": x[1] + 0.1}]
    out = tmp_path / "page.html"
    area = np.where(labels == 1, 1.0, 0.0)
    area[0] = [50, 0, 100]  # image a: person has the larger box
    collection_page(out, "t", paths, f, queries, k=3, area=area)
    text = out.read_text()
    blob = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', text, re.S).group(1)
    return text, json.loads(blob), f, labels


def test_page_holds_each_thumbnail_once_and_the_neighbourhoods(tmp_path):
    text, m, f, _labels = _page(tmp_path)
    n = len(f.ids)
    assert m["ids"] == f.ids and len(m["x"]) == len(m["y"]) == n  # the id with "</script>" survived, escaped
    assert len(m["thumbs"]) == n and len(set(m["thumbs"])) == n
    for t in m["thumbs"]:
        assert t.startswith("data:image/jpeg;base64,") and text.count(t) == 1
    want = nearest(distances(f.features, f.features), 3, exclude=np.arange(n))
    assert m["neighbours"] == want.tolist()
    np.testing.assert_allclose(
        m["distances"], np.take_along_axis(distances(f.features, f.features), want, 1), atol=1e-3
    )
    # colours follow the labels: the main class, the largest box among the image's classes
    assert m["main"] == [2, 0, 0, 1, 1, 1] and m["classes"] == ["cat", "dog", "person"]
    assert m["labels"][0] == [0, 2] and m["colours"] == class_colours(3)
    # one self-contained file: nothing fetched from elsewhere
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|url\(|@import|<link|<script[^>]*\bsrc=", text)
    assert all(v.startswith("data:") for v in re.findall(r'\bsrc="([^"]*)"', text))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_page_draws_the_map_and_opens_a_neighbourhood_in_chromium(tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    _text, m, f, _ = _page(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "page.html").as_uri())
        page.wait_for_function("window.mapDrawn === true", timeout=10000)
        x, y = page.evaluate("mapPoint(5)")  # the image drawn last, on top of any it overlaps
        box = page.locator("#map").bounding_box()
        page.mouse.click(box["x"] + 1 + x, box["y"] + 1 + y)
        captions = page.locator("#hood figcaption").all_inner_texts()
        browser.close()
    assert not errors
    assert [c.split("\n")[0] for c in captions] == ["query " + f.ids[5]] + [f.ids[j] for j in m["neighbours"][5]]


def test_page_renders_from_the_templates_shipped_as_package_data(tmp_path):
    from pathlib import Path

    import tomllib

    import patchnet

    root = Path(patchnet.__file__).parent
    shipped = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    templates = sorted(p.relative_to(root).as_posix() for p in (root / "templates").iterdir())
    assert templates and all(any(Path(t).match(glob) for glob in shipped["patchnet"]) for t in templates)
    text, m, _f, _ = _page(tmp_path)
    # every slot filled: the title, the map's data and script, the comparison's histograms
    assert "${" not in text and text.startswith("<!doctype html>") and text.endswith("</body></html>")
    assert "<title>t</title>" in text and "const H={" in text and "window.mapDrawn=true" in text
    assert len(m["ids"]) == 6 and "nearest neighbours (click one of them to go on)" in text


def test_a_file_name_that_is_not_utf8_is_shown_escaped_on_the_page(tmp_path):
    import os

    name = os.fsdecode(b"caf\xe9")  # Python holds the byte as a lone surrogate
    path = write_image(tmp_path / f"{name}.jpg", 50, 40)
    assert path.is_file()
    x, _side = _clusters(n=4, d=16)
    labels = np.array([[1, -1], [1, -1], [-1, 1], [-1, 1]], np.int8)
    f = SplitFeatures([name, "b", "c", "d"], x.astype(np.float32), labels, ["cat", name])
    out = tmp_path / "page.html"
    collection_page(out, name, [path] * 4, f, [{"name": path.name, "path": path, "feature": x[0]}], k=2)
    text = out.read_text(encoding="utf-8")  # strict UTF-8
    assert "caf\\xe9.jpg" in text and "<title>caf\\xe9</title>" in text
    blob = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', text, re.S).group(1)
    data = json.loads(blob)
    assert data["ids"][0] == "caf\\xe9" and data["classes"][1] == "caf\\xe9"
    assert not re.search(r"\\ud[89a-f]", blob)  # no lone surrogate, escaped or not
