"""Nearest-neighbour retrieval by L2 distance between L2-normalised features, and a page to browse it.

The page follows the tasks of the "Do deep features retrieve X?" tool: browse the collection's
neighbourhoods, explore a query's neighbours, and explore and compare distance distributions.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .linear import l2_normalize  # noqa: E402


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


def precision_at_k(neighbours: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Per class: the mean over queries showing the class of the share of their neighbours showing it.

    NaN for a class no query shows.
    """
    hits = labels[neighbours] == 1  # (Q, k, C)
    share = hits.mean(1)  # (Q, C)
    showing = query_labels == 1
    with np.errstate(invalid="ignore"):
        return np.where(showing.any(0), (share * showing).sum(0) / np.maximum(showing.sum(0), 1), np.nan)


def _thumb(path: Path, size: int = 150) -> str:
    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _histogram(dist_row: np.ndarray, neighbour_d: np.ndarray, title: str) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    ax.hist(dist_row, bins=40, range=(0, 2), color="#4878a8")
    for d in neighbour_d:
        ax.axvline(d, color="#d62728", lw=0.8)
    ax.set_xlabel("L2 distance to the query (normalised features)", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:20px;color:#222}} h2{{margin-top:32px}}
.row{{display:flex;flex-wrap:wrap;align-items:flex-start;gap:8px}} figure{{margin:0;text-align:center;font-size:11px}}
figure img{{border:1px solid #ccc}} .q img{{border:3px solid #1f77b4}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ddd;padding:2px 8px;font-size:12px;text-align:right}} .cmp{{display:flex;gap:24px}}
</style></head><body><h1>{title}</h1><p>{summary}</p>
<h2>Compare two queries' distance distributions</h2><div class="cmp">
<div><select id="a" onchange="show('a')">{options}</select><br><img id="ia"></div>
<div><select id="b" onchange="show('b')">{options_b}</select><br><img id="ib"></div></div>
{table}<h2>Neighbourhoods</h2>{sections}
<script>const H={hist_js};function show(s){{document.getElementById('i'+s).src=H[document.getElementById(s).value];}}
show('a');show('b');</script></body></html>"""


def write_page(out: Path, title: str, collection_paths: list[Path], collection_ids: list[str], queries: list[dict],
               dist: np.ndarray, neighbours: np.ndarray, classes: list[str] | None = None,
               precision: np.ndarray | None = None, k: int = 8) -> Path:
    """A self-contained HTML page (thumbnails and plots inlined) for the given queries."""
    sections, hists = [], {}
    for qi, q in enumerate(queries):
        nd = dist[qi, neighbours[qi]]
        hists[str(qi)] = _histogram(dist[qi], nd, f"query {q['name']}")
        cells = [f'<figure class="q"><img src="{_thumb(q["path"])}"><figcaption>query<br>{html.escape(q["name"])}'
                 f"</figcaption></figure>"]
        for j, d in zip(neighbours[qi], nd):
            cells.append(f'<figure><img src="{_thumb(collection_paths[j])}"><figcaption>{html.escape(collection_ids[j])}'
                         f"<br>d = {d:.3f}</figcaption></figure>")
        sections.append(f'<h3>{html.escape(q["name"])}</h3><div class="row">{"".join(cells)}'
                        f'<figure><img src="{hists[str(qi)]}"><figcaption>distances to all {dist.shape[1]} images; '
                        f"red: the {k} neighbours</figcaption></figure></div>")
    options = "".join(f'<option value="{i}">{html.escape(q["name"])}</option>' for i, q in enumerate(queries))
    options_b = "".join(f'<option value="{i}"{" selected" if i == min(1, len(queries) - 1) else ""}>'
                        f'{html.escape(q["name"])}</option>' for i, q in enumerate(queries))
    table = ""
    if precision is not None and classes is not None:
        rows = "".join(f"<tr><th>{html.escape(c)}</th><td>{'n/a' if np.isnan(p) else f'{100 * p:.1f}'}</td></tr>"
                       for c, p in zip(classes, precision))
        table = (f"<h2>What do these features retrieve? Mean precision@{k} per class</h2>"
                 f"<p>Every image of the collection as a query (itself left out); for the queries showing a "
                 f"class, the share of their {k} neighbours that show it too.</p><table>{rows}"
                 f"<tr><th>mean</th><td>{100 * np.nanmean(precision):.1f}</td></tr></table>")
    page = PAGE.format(title=html.escape(title), summary=f"{len(queries)} queries against {dist.shape[1]} images, "
                       f"L2 distance between L2-normalised features.", options=options, options_b=options_b,
                       table=table, sections="".join(sections), hist_js=json.dumps(hists))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def retrieval_page(recipe, split: str, reduce: str, out, query_ids: list[str], query_images: list, num_queries: int,
                   k: int, what: str):
    """Features of a split, precision@k of every image as a query, and the HTML page of the chosen queries.

    Queries are image ids of the split, image files, or (neither given) ``num_queries`` drawn by the seed.
    Returns the split's features and the per-class precision@k.
    """
    from .cache import feature_codec
    from .datasets import DatasetError, load_image, open_split
    from .extract import build_extractor
    from .linear import split_features

    dataset = open_split(recipe.data, split)
    extractor = build_extractor(recipe)
    codec = feature_codec(recipe, extractor)  # query images are stored as the collection is
    f = split_features(recipe, dataset, extractor, reduce, codec=codec)
    paths = {rec.image_id: rec.path for rec in dataset.records}
    row = {i: n for n, i in enumerate(f.ids)}
    # every image as a query, itself left out: what do these features retrieve?
    every = nearest(distances(f.features, f.features), k, exclude=np.arange(len(f.ids)))
    precision = precision_at_k(every, f.labels, f.labels)
    chosen: list[dict] = []
    for q in query_ids:
        if q not in row:
            raise DatasetError(f"query {q!r} is not an image of {dataset.name}")
        chosen.append({"name": q, "path": paths[q], "row": row[q]})
    for p in query_images:
        feats = codec.unproject(codec.roundtrip(extractor(load_image(p))))
        chosen.append({"name": p.name, "path": p, "feature": feats.mean(0) if reduce == "mean" else feats.max(0)})
    if not chosen:
        pick = np.random.default_rng(recipe.train.seed).choice(len(f.ids), min(num_queries, len(f.ids)), replace=False)
        chosen = [{"name": f.ids[i], "path": paths[f.ids[i]], "row": int(i)} for i in sorted(pick)]
    qf = np.stack([f.features[q["row"]] if "row" in q else q["feature"] for q in chosen])
    dist = distances(qf, f.features)
    neighbours = nearest(dist, k, exclude=np.array([q.get("row", -1) for q in chosen]))
    write_page(out, f"patchnet retrieval: {dataset.name} ({recipe.backbone.name}, {what})",
               [paths[i] for i in f.ids], f.ids, chosen, dist, neighbours, f.classes, precision, k)
    return f, precision
