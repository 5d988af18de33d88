#!/usr/bin/env python
"""Size and load time of the retrieval page (with its map of thumbnails) at 500 and 5000 images.

The collection is synthetic: demo-style images (patchnet.data.demo) and features made from their labels
(a random direction per class, summed over the image's classes, plus noise), so that the t-SNE map has
clusters to show. The page is built by the same function as `patchnet retrieve`, then opened in
headless Chromium (Debian's `chromium`, driven by playwright: `pip install -e .[bench]`; no browser is
downloaded) and timed until the load event and until the map is drawn (every thumbnail decoded and
drawn: `window.mapDrawnAt`), both in ms since navigation start, then the time to redraw the whole map
(a tiny zoom step: from the wheel event to the end of the frame that draws it), the median of --repeats
fresh tabs.

    python benchmarks/retrieval_page.py                    # N = 500 and 5000 (about 5 min on 2 CPU cores)
    python benchmarks/retrieval_page.py --sizes 500 --repeats 1
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from patchnet.data.demo import DEMO_CLASSES, make_image
from patchnet.studies.linear import SplitFeatures
from patchnet.studies.retrieve import collection_page

from common import Timer, bench_parser, machine, table

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def synthetic_collection(folder: Path, n: int, dims: int = 1280, seed: int = 0):
    """n demo images written to ``folder``, their features, labels and box areas per class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    c = len(DEMO_CLASSES)
    labels, area, paths = -np.ones((n, c), np.int8), np.zeros((n, c)), []
    for i in tqdm(range(n), desc="images", unit="img"):
        img, objects = make_image(rng)
        paths.append(folder / f"{i:05d}.jpg")
        img.save(paths[-1], quality=90)
        for name, (x1, y1, x2, y2), difficult in objects:
            if not difficult:
                labels[i, DEMO_CLASSES.index(name)] = 1
                area[i, DEMO_CLASSES.index(name)] += (x2 - x1) * (y2 - y1)
    direction = rng.normal(size=(c, dims))
    features = (labels == 1) @ direction + 0.7 * rng.normal(size=(n, dims))
    ids = [p.stem for p in paths]
    return paths, SplitFeatures(ids, features.astype(np.float32), labels, list(DEMO_CLASSES)), area


REDRAW = """async () => {
  const cv = document.getElementById('map'), t = performance.now();
  cv.dispatchEvent(new WheelEvent('wheel', {deltaY: -1, clientX: 400, clientY: 300, bubbles: true, cancelable: true}));
  await new Promise(r => requestAnimationFrame(r));  // runs after the map's own frame callback
  return performance.now() - t;
}"""


def load_times(page: Path, chromium: str, repeats: int) -> tuple[float, float, float]:
    """Median ms from navigation start to the load event and to the drawn map, and of a redraw, over fresh tabs."""
    from playwright.sync_api import sync_playwright

    loads, drawn, redraw = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        for _ in range(repeats):
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(page.resolve().as_uri(), wait_until="load", timeout=300_000)
            tab.wait_for_function("window.mapDrawn === true", timeout=300_000)
            loads.append(tab.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
            drawn.append(tab.evaluate("window.mapDrawnAt"))
            redraw.append(statistics.median(tab.evaluate(REDRAW) for _ in range(5)))
            tab.close()
        browser.close()
    return statistics.median(loads), statistics.median(drawn), statistics.median(redraw)


def main() -> None:
    ap = bench_parser(__doc__, voc=False, recipe=None, sets=False)  # a synthetic collection: no VOC, no recipe
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    ap.add_argument("--k", type=int, default=8, help="neighbours per image, as `patchnet retrieve --neighbours`")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/patchnet_retrieval_bench"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    if not args.chromium:
        raise SystemExit("chromium not found: install Debian's chromium (apt-get install chromium) or pass --chromium")
    rows = []
    for n in args.sizes:
        paths, f, area = synthetic_collection(args.work / "images", n)
        out = args.work / f"retrieval_{n}.html"
        queries = [{"name": f.ids[i], "path": paths[i], "row": i} for i in range(min(8, n))]
        with Timer() as build:
            collection_page(out, f"synthetic collection of {n}", paths, f, queries, args.k, area)
        load, drawn, redraw = load_times(out, args.chromium, args.repeats)
        mb = out.stat().st_size / 2**20
        rows.append(
            (
                n,
                f"{mb:.1f}",
                f"{1024 * mb / n:.2f}",
                f"{build.seconds:.0f}",
                f"{load:.0f}",
                f"{drawn:.0f}",
                f"{redraw:.0f}",
            )
        )
        print(rows[-1], flush=True)
    print(f"\n{machine()}; {args.chromium} headless, software rendering; median of {args.repeats} loads\n")
    print(table(rows, ("images", "page MB", "KB per image", "build s", "load event ms", "map drawn ms", "redraw ms")))


if __name__ == "__main__":
    main()
