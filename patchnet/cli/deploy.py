"""Using a trained model on new images and shipping it: ``patchnet localize`` and ``patchnet export``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from ..data import DatasetError
from ..files import UniqueNames, atomic_write, json_text, output_path, printable
from .common import BoxMethodOpt, BoxThresholdOpt, DeviceOpt, Skipped, VerboseOpt, app, check_device, session

OldMethodOpt = Annotated[str | None, typer.Option("--method", hidden=True, help="The old name of --box-method.")]
OldThresholdOpt = Annotated[
    float | None, typer.Option("--threshold", hidden=True, help="The old name of --box-threshold.")
]
CocoJsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Boxes in the COCO results format: bbox x, y, width, height in pixels."),
]


@app.command()
def localize(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A best.pt or last.pt.")],
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated classes (default: those judged present).")
    ] = None,
    method: BoxMethodOpt = None,
    threshold: BoxThresholdOpt = None,
    old_method: OldMethodOpt = None,
    old_threshold: OldThresholdOpt = None,
    json_out: CocoJsonOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the images with their boxes drawn.")] = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
):
    """Boxes of the classes in each image, from its patches' scores (patchnet.evaluation.localize), printed as the JSON
    writes them: x y w h in pixels from the image's top-left corner (COCO's bbox), and a score in [0, 1]: the
    image's calibrated probability of the class (its pooled score squashed into [0, 1] where the checkpoint has
    no calibration) times the box region's share of the map's peak.
    An image that cannot be read is skipped with a warning, the others written, and the exit code is then 1."""
    with session(verbose):
        from ..api import load
        from ..data import image_files, load_image
        from ..evaluation.localize import box_options
        from ..outputs.draw import draw_detections

        check_device(device)
        model = load(checkpoint, device=device)
        method = method or old_method
        threshold = old_threshold if threshold is None else threshold
        method, threshold = box_options(model.recipe.infer, method, threshold, model.predictor.detector is not None)
        wanted = [c.strip() for c in classes.split(",")] if classes else None
        if wanted is not None:
            model.class_indices(wanted)  # once, before any image
        files = image_files(images)
        skipped, results, names = Skipped(len(files)), [], UniqueNames()
        stems = Counter(path.stem for path in files)
        typer.echo("image: class score at x y w h (pixels from the top-left corner, COCO's bbox; score in [0, 1])")
        for path in files:
            # an image's name in the outputs: its stem, or its whole path where two images share a stem
            name = path.stem if stems[path.stem] == 1 else str(path)
            try:
                found = model.localize(path, wanted, method, threshold)
            except DatasetError as e:
                skipped.add(str(path), e)
                continue
            coco = [_coco_result(name, d, model.classes) for d in found]
            typer.echo(printable(f"{path}: " + "; ".join(f"{r['category']} {_box_text(r)}" for r in coco)))
            results += coco
            if out is not None:
                draw_detections(load_image(path), found, model.classes, output_path(out, name, ".png", names))
        if json_out:
            atomic_write(json_out, json_text(results, indent=1))
            typer.echo(f"wrote {len(results)} boxes to {json_out} (COCO results format; category_id = class index + 1)")
        skipped.finish()


def _box_text(result: dict) -> str:
    """A box as localize prints it: its score, then its COCO bbox (x y w h) to the pixel."""
    return f"{result['score']:.3f} at {' '.join(f'{v:.0f}' for v in result['bbox'])}"


def _coco_result(name: str, d, classes: list[str]) -> dict:
    x1, y1, x2, y2 = d.box
    image_id: int | str = int(name) if name.isdigit() else name
    return {
        "image_id": image_id,
        "category_id": d.class_index + 1,
        "category": classes[d.class_index],
        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
        "score": round(d.score, 6),
    }


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A best.pt or last.pt.")],
    size: Annotated[str, typer.Option(help="The images' size the program takes, WIDTHxHEIGHT, e.g. 500x375.")],
    out: Annotated[Path, typer.Option(help="The torch.export program (.pt2).")] = Path("model.pt2"),
    onnx: Annotated[Path | None, typer.Option(help="Also write it as ONNX here (onnxscript needed).")] = None,
    image: Annotated[Path | None, typer.Option(help="An image to check the program against the API on.")] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where the program is traced and its weights live: cpu (it then runs on any machine) or cuda.",
        ),
    ] = "cpu",
    verbose: VerboseOpt = False,
):
    """The trained model (trunk in shared mode, head, pooling, fusion, calibration) as one program for a fixed
    image size, which plain torch runs: torch.export.load(path).module()(image)."""
    with session(verbose):
        import numpy as np

        from ..api import as_image
        from ..errors import PatchnetError
        from ..export import export as write

        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            width = height = 0
        if width < 1 or height < 1:
            raise PatchnetError(f"--size must be WIDTHxHEIGHT in positive pixels, e.g. 500x375; got {size!r}")
        check_device(device)
        model, _ = write(checkpoint, width, height, out, onnx, device=device)
        typer.echo(
            f"wrote {out}" + (f" and {onnx}" if onnx else "") + f": {len(model.classes)} classes, "
            f"(1, 3, {height}, {width}) RGB in [0, 1] -> probabilities, scores, patch values"
        )
        if image is not None:
            from PIL import Image

            from ..export import check_export

            array = np.array(Image.fromarray(as_image(image)).resize((width, height), Image.Resampling.BILINEAR))
            r = check_export(checkpoint, out, array, onnx, device=device)
            typer.echo(
                f"{image} at {width}x{height}: max |program - API| = {r['program_diff']:.2e}"
                + (f", max |ONNX Runtime - API| = {r['onnx_diff']:.2e}" if onnx else "")
                + f"; median ms per image: program {r['program_ms']:.0f}"
                + (f", ONNX Runtime {r['onnx_ms']:.0f}" if onnx else "")
                + f", API fp32 {r['api_fp32_ms']:.0f}, API at the recipe's precision {r['api_ms']:.0f}"
            )
