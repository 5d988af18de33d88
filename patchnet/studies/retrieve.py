"""Nearest-neighbour retrieval by L2 distance between L2-normalised features, and a page to browse it.

The page follows the tasks of the "Do deep features retrieve X?" tool: browse the collection's
neighbourhoods (a t-SNE map of thumbnails; a click shows an image's neighbours), explore a query's
neighbours, and explore and compare distance distributions.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from importlib import resources
from pathlib import Path
from string import Template
from typing import cast

import matplotlib
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data import DatasetError, load_image, open_split, thumbnail
from ..features.build import cache_spec
from ..features.extract import build_extractor
from ..files import atomic_write, json_text, printable
from ..head.pooling import l2_normalize
from ..outputs.figures import figure_bytes, new_figure, plain
from .linear import split_features

log = logging.getLogger("patchnet")


def distances(queries: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(Q, N) L2 distances between L2-normalised rows."""
    q, x = l2_normalize(queries.astype(np.float64)), l2_normalize(index.astype(np.float64))
    sq = (q * q).sum(1)[:, None] + (x * x).sum(1)[None] - 2 * q @ x.T
    return np.sqrt(np.clip(sq, 0, None))


def nearest(dist: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(Q, k) indices of the k smallest distances per row; ``exclude[q]`` (e.g. the query itself) is skipped."""
    d = dist.copy()
    if exclude is not None:
        ok = exclude >= 0
        d[np.flatnonzero(ok), exclude[ok]] = np.inf
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def all_neighbours(features: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) indices and distances of every row's k nearest other rows, in chunks of rows to bound memory."""
    n = len(features)
    k = min(k, n - 1)
    idx, dist = np.empty((n, k), np.int64), np.empty((n, k))
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        d = distances(features[rows], features)
        idx[rows] = nearest(d, k, exclude=rows)
        dist[rows] = np.take_along_axis(d, idx[rows], 1)
    return idx, dist


def embed_2d(features: np.ndarray, seed: int = 0, pca_dims: int = 50) -> np.ndarray:
    """(N, 2) t-SNE map of the L2-normalised features (PCA to ``pca_dims`` first, as usual), in [0, 1]².

    The larger extent spans [0, 1] and the other is centred in it, so that the map keeps its shape.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 2:
        return np.full((n, 2), 0.5)
    x = l2_normalize(features.astype(np.float32))
    if x.shape[1] > pca_dims and n > pca_dims:
        x = PCA(pca_dims, random_state=seed).fit_transform(x)
    # t-SNE needs a perplexity below the number of points
    xy = TSNE(
        2, perplexity=min(30.0, max(1.0, (n - 1) / 3)), init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(x)
    xy -= xy.min(0)
    xy /= max(xy.max(), 1e-12)
    return xy + (1 - xy.max(0)) / 2


def box_area(records, num_classes: int) -> np.ndarray:
    """(N, C) total area of each image's non-difficult boxes per class."""
    out = np.zeros((len(records), num_classes))
    for n, rec in enumerate(records):
        keep = ~rec.box_difficult
        wh = rec.boxes[keep, 2:] - rec.boxes[keep, :2]
        out[n] = np.bincount(rec.box_classes[keep], weights=wh[:, 0] * wh[:, 1], minlength=num_classes)
    return out


def main_class(labels: np.ndarray, area: np.ndarray | None = None) -> np.ndarray:
    """Per image the class it is coloured by: of its classes (label 1) the one with the largest box area,
    without boxes the first; -1 for an image without a class."""
    key = np.where(labels == 1, 0.0 if area is None else area, -np.inf)
    return np.where((labels == 1).any(1), key.argmax(1), -1)


def class_colours(num_classes: int) -> list[str]:
    """One colour per class: matplotlib's tab20 with its ten strong hues first, turbo beyond 20 classes."""
    from matplotlib.colors import ListedColormap, to_hex

    if num_classes <= 20:
        tab = cast(tuple, cast(ListedColormap, matplotlib.colormaps["tab20"]).colors)  # a tuple of RGB tuples
        return [to_hex(c) for c in (tab[0::2] + tab[1::2])[:num_classes]]
    return [to_hex(matplotlib.colormaps["turbo"](i / (num_classes - 1))) for i in range(num_classes)]


def precision_at_k(neighbours: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Per class: the mean over queries showing the class of the share of their neighbours showing it.

    NaN for a class no query shows.
    """
    hits = labels[neighbours] == 1  # (Q, k, C)
    share = hits.mean(1)  # (Q, C)
    showing = query_labels == 1
    with np.errstate(invalid="ignore"):
        return np.where(showing.any(0), (share * showing).sum(0) / np.maximum(showing.sum(0), 1), np.nan)


def _thumb(path: Path, size: int = 150, quality: int = 80) -> str:
    """A JPEG data URI of the image's thumbnail; a grey square (logged) for an image that cannot be read."""
    try:
        img = thumbnail(path, size)
    except DatasetError as e:
        log.warning("thumbnail: %s; shown as a grey square", e)
        img = Image.new("RGB", (size, size), (128, 128, 128))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def browse_data(
    paths: list[Path],
    ids: list[str],
    xy: np.ndarray,
    neighbours: np.ndarray,
    neighbour_d: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    main: np.ndarray,
    thumb: int = 64,
) -> dict:
    """The map's data for the page: each image's thumbnail once (a small JPEG), its map position, its
    classes and main class, and its neighbours with their distances (indices into the same lists)."""
    return {
        "ids": list(ids),
        "x": np.round(xy[:, 0], 4).tolist(),
        "y": np.round(xy[:, 1], 4).tolist(),
        "thumbs": [_thumb(p, thumb, quality=70) for p in tqdm(paths, desc="thumbnails", unit="img", leave=False)],
        "neighbours": neighbours.tolist(),
        "distances": np.round(neighbour_d, 3).tolist(),
        "classes": list(classes),
        "colours": class_colours(len(classes)),
        "labels": [np.flatnonzero(row == 1).tolist() for row in labels],
        "main": main.tolist(),
    }


def _png(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(figure_bytes(fig, "png", 80)).decode()


def _histogram(dist_row: np.ndarray, neighbour_d: np.ndarray, title: str) -> str:
    fig, axes = new_figure(figsize=(4.2, 2.4))
    ax = axes[0, 0]
    ax.hist(dist_row, bins=40, range=(0, 2), color="#4878a8")
    for d in neighbour_d:
        ax.axvline(d, color="#d62728", lw=0.8)
    ax.set_xlabel("L2 distance to the query (normalised features)", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.set_title(plain(title), fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


# The page's HTML, CSS and JavaScript: string.Template files shipped as package data (pyproject). The map is one
# <canvas>; each thumbnail is decoded once into an ImageBitmap (an <img> would be decoded again at every frame
# once there are thousands) and drawn at its t-SNE position, only when inside the view. window.mapDrawn turns
# true (mapDrawnAt: ms since navigation) once every thumbnail is drawn.
PAGE, MAP = "retrieval.html", "retrieval_map.html"


def _template(name: str) -> Template:
    """A template of the page, from ``patchnet/templates``."""
    return Template((resources.files("patchnet") / "templates" / name).read_text("utf-8").removesuffix("\n"))


def _browse_section(data: dict) -> str:
    # "<" escaped so that no image id can close the script element
    blob = json_text(data, separators=(",", ":")).replace("<", "\\u003c")
    k = len(data["neighbours"][0]) if data["neighbours"] else 0
    return _template(MAP).substitute(n=len(data["ids"]), k=k, data=blob)


def write_page(
    out: Path,
    title: str,
    collection_paths: list[Path],
    collection_ids: list[str],
    queries: list[dict],
    dist: np.ndarray,
    neighbours: np.ndarray,
    classes: list[str] | None = None,
    precision: np.ndarray | None = None,
    k: int = 8,
    browse: dict | None = None,
) -> Path:
    """A self-contained HTML page (thumbnails and plots inlined) for the given queries, with the map of
    ``browse`` (from ``browse_data``) when given."""
    sections, hists = [], {}
    for qi, q in enumerate(queries):
        nd = dist[qi, neighbours[qi]]
        hists[str(qi)] = _histogram(dist[qi], nd, f"query {q['name']}")
        sections.append(
            _query_section(q, hists[str(qi)], collection_paths, collection_ids, neighbours[qi], nd, dist.shape[1], k)
        )
    options = "".join(f'<option value="{i}">{_text(q["name"])}</option>' for i, q in enumerate(queries))
    options_b = "".join(
        f'<option value="{i}"{" selected" if i == min(1, len(queries) - 1) else ""}>{_text(q["name"])}</option>'
        for i, q in enumerate(queries)
    )
    page = _template(PAGE).substitute(
        title=_text(title),
        summary=f"{len(queries)} queries against {dist.shape[1]} images, L2 distance between L2-normalised features.",
        options=options,
        options_b=options_b,
        browse=_browse_section(browse) if browse else "",
        table=_precision_table(classes, precision, k) if precision is not None and classes is not None else "",
        sections="".join(sections),
        hist_js=json_text(hists),
    )
    return atomic_write(Path(out), page)


def _text(name: object) -> str:
    """A name (an image id, a file name, a class) as page text: printable, HTML-escaped."""
    return html.escape(printable(name))


def _query_section(
    q: dict, hist: str, paths: list[Path], ids: list[str], neighbours: np.ndarray, nd: np.ndarray, total: int, k: int
) -> str:
    """A query, its neighbours with their distances, and its histogram of distances."""
    cells = [
        f'<figure class="q"><img src="{_thumb(q["path"])}"><figcaption>query<br>{_text(q["name"])}'
        "</figcaption></figure>"
    ]
    for j, d in zip(neighbours, nd):
        cells.append(
            f'<figure><img src="{_thumb(paths[j])}"><figcaption>{_text(ids[j])}<br>d = {d:.3f}</figcaption></figure>'
        )
    return (
        f'<h3>{_text(q["name"])}</h3><div class="row">{"".join(cells)}'
        f'<figure><img src="{hist}"><figcaption>distances to all {total} images; '
        f"red: the {k} neighbours</figcaption></figure></div>"
    )


def _precision_table(classes: list[str], precision: np.ndarray, k: int) -> str:
    rows = "".join(
        f"<tr><th>{_text(c)}</th><td>{'n/a' if np.isnan(p) else f'{100 * p:.1f}'}</td></tr>"
        for c, p in zip(classes, precision)
    )
    return (
        f"<h2>What do these features retrieve? Mean precision@{k} per class</h2>"
        f"<p>Every image of the collection as a query (itself left out); for the queries showing a "
        f"class, the share of their {k} neighbours that show it too.</p><table>{rows}"
        f"<tr><th>mean</th><td>{100 * np.nanmean(precision):.1f}</td></tr></table>"
    )


def collection_page(
    out, title: str, paths: list[Path], f, queries: list[dict], k: int, area: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """The page of a collection's features ``f`` (a SplitFeatures) and the queries; returns precision@k per class.

    A query is ``{"name", "path"}`` with either ``"row"`` (an image of the collection) or ``"feature"``.
    """
    # every image as a query, itself left out: what do these features retrieve? (also the map's neighbourhoods)
    every, every_d = all_neighbours(f.features, k)
    precision = precision_at_k(every, f.labels, f.labels)
    dist, neighbours = np.zeros((0, len(f.ids))), np.zeros((0, k), np.int64)
    if queries:
        qf = np.stack([f.features[q["row"]] if "row" in q else q["feature"] for q in queries])
        dist = distances(qf, f.features)
        neighbours = nearest(dist, k, exclude=np.array([q.get("row", -1) for q in queries]))
    browse = browse_data(
        paths, f.ids, embed_2d(f.features, seed), every, every_d, f.labels, f.classes, main_class(f.labels, area)
    )
    write_page(out, title, paths, f.ids, queries, dist, neighbours, f.classes, precision, k, browse)
    return precision


def retrieval_page(
    recipe, split: str, reduce: str, out, query_ids: list[str], query_images: list, num_queries: int, k: int, what: str
):
    """Features of a split, precision@k of every image as a query, and the HTML page of the chosen queries.

    Queries are image ids of the split, image files, or (neither given) ``num_queries`` drawn by the seed.
    Returns the split's features and the per-class precision@k.
    """
    dataset = open_split(recipe.data, split)
    extractor = build_extractor(recipe)
    codec = cache_spec(recipe, extractor).codec  # query images are stored as the collection is
    f = split_features(recipe, dataset, extractor, reduce, codec=codec)
    records = {rec.image_id: rec for rec in dataset.records}
    row = {i: n for n, i in enumerate(f.ids)}
    chosen: list[dict] = []
    for q in query_ids:
        if q not in row:
            raise DatasetError(f"query {q!r} is not an image of {dataset.name}")
        chosen.append({"name": q, "path": records[q].path, "row": row[q]})
    for p in query_images:
        feats = codec.unproject(codec.roundtrip(extractor(load_image(p, recipe.data.max_pixels))))
        chosen.append({"name": p.name, "path": p, "feature": feats.mean(0) if reduce == "mean" else feats.max(0)})
    if not chosen:
        pick = np.random.default_rng(recipe.train.seed).choice(len(f.ids), min(num_queries, len(f.ids)), replace=False)
        chosen = [{"name": f.ids[i], "path": records[f.ids[i]].path, "row": int(i)} for i in sorted(pick)]
    rows = [records[i] for i in f.ids]
    precision = collection_page(
        out,
        f"patchnet retrieval: {dataset.name} ({recipe.backbone.name}, {what})",
        [r.path for r in rows],
        f,
        chosen,
        k,
        box_area(rows, len(f.classes)),
        recipe.train.seed,
    )
    return f, precision
