#!/usr/bin/env python
"""An int8 trunk through ONNX Runtime, measured against torch's fp32 and bf16 trunks (a probe: patchnet
does not run it yet).

The fused trunk is exported once for any image size (``Conv2dSame.shape_free``), quantised statically
by ONNX Runtime (per-channel int8 weights, QDQ, activations calibrated with MinMax on the pyramid levels
of ``--calibration`` devtrain images), and run on the pyramid levels of ``--images`` devval images
beside torch fp32 (channels_last and NCHW), torch bf16 (channels_last, where the CPU has native bf16) and ONNX
Runtime fp32, taking turns on every level image. Rows: ms per image (every level), speed against torch
fp32, and the relative L2 error of each level's mean-pooled map against torch fp32 (mean and worst).

    python benchmarks/int8_trunk.py --calibration 12 --images 6
    python benchmarks/int8_trunk.py --calibration 12 --images 6 --reduce-range   # a CPU without VNNI
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from patchnet.backbones import Conv2dSame
from patchnet.datasets import load_image, read_voc
from patchnet.dist import native_bf16
from patchnet.extract import build_extractor
from patchnet.recipe import VOC_CLASSES

from common import Timer, bench_parser, dev_recipe, machine, require_voc, table


def level_images(ex, image) -> list[np.ndarray]:
    """The trunk inputs of an image: each pyramid level, rescaled as the extractor rescales it (NCHW fp32)."""
    img = ex.prepare(image)
    h, w = img.shape[-2:]
    return [ex.rescale(img, lv.factor).contiguous().numpy() for lv in ex.plan(w, h).levels]


def export_trunk(backbone, path: Path) -> None:
    """The trunk with its normalisation, for any H x W, as ONNX."""
    model = _FeatureMap(backbone).eval()
    for m in model.modules():
        if isinstance(m, Conv2dSame):
            m.shape_free = True  # its path pads explicitly: pad_weight never applies
    h, w = torch.export.Dim("h", min=32, max=4096), torch.export.Dim("w", min=32, max=4096)
    example = torch.rand(1, 3, 224, 320)
    program = torch.onnx.export(
        model, (example,), dynamo=True, dynamic_shapes={"x": {2: h, 3: w}}, input_names=["image"], verbose=False
    )
    program.save(str(path))


class _FeatureMap(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.feature_map(x)


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--calibration", type=int, default=12, help="devtrain images whose levels calibrate int8")
    ap.add_argument("--images", type=int, default=6, help="devval images measured")
    ap.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit int8 weights: on CPUs without VNNI (AVX2 only) ONNX Runtime's u8s8 kernels otherwise saturate",
    )
    args = ap.parse_args()
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise SystemExit(f"this probe needs onnxruntime ({e}); pip install -e '.[dev]'") from e
    voc = require_voc(args.voc)
    with tempfile.TemporaryDirectory() as tmp:
        ex = build_extractor(dev_recipe(args, f"runtime.cache_dir={tmp}", after=("backbone.channels_last=false",)))
        backbone = ex.backbone.float().eval()
        train = read_voc(voc, "devtrain", VOC_CLASSES).records[: args.calibration]
        val = read_voc(voc, "devval", VOC_CLASSES).records[: args.images]
        fp32, pre, int8 = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
        with Timer() as t_export:
            export_trunk(backbone, fp32)
        calibration = (x for r in train for x in level_images(ex, load_image(r.path)))

        class Reader(CalibrationDataReader):
            def get_next(self):
                x = next(calibration, None)
                return None if x is None else {"image": x}

        with Timer() as t_quant:
            quant_pre_process(str(fp32), str(pre))
            quantize_static(
                str(pre),
                str(int8),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=args.reduce_range,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = {
            n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for n, p in (("ort fp32", fp32), ("ort int8", int8))
        }
        levels = [x for r in val for x in level_images(ex, load_image(r.path))]
        nchw = backbone
        cl = copy.deepcopy(backbone).to(memory_format=torch.channels_last)

        def torch_run(dtype, layout=torch.channels_last):
            net = cl if layout == torch.channels_last else nchw

            def run(x: np.ndarray) -> np.ndarray:
                t = torch.from_numpy(x).contiguous(memory_format=layout)
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    return net.feature_map(t).float().numpy()

            return run

        def ort_run(name):
            return lambda x: sessions[name].run(None, {"image": x})[0]

        paths = {
            "torch fp32 (channels_last)": torch_run(None),
            "torch fp32 (NCHW)": torch_run(None, torch.contiguous_format),
            "ort fp32": ort_run("ort fp32"),
        }
        if native_bf16():
            paths["torch bf16 (channels_last)"] = torch_run(torch.bfloat16)
        paths["ort int8"] = ort_run("ort int8")
        reference = [paths["torch fp32 (channels_last)"](x).mean((2, 3)) for x in levels]
        names = list(paths)
        seconds = dict.fromkeys(names, 0.0)
        errors: dict[str, list] = {name: [] for name in names}
        for run in paths.values():
            for x in levels[:2]:  # warm-up: kernels for the first shapes
                run(x)
        # the paths take turns on every level image, in an order that rotates: this machine's speed drifts
        for i, (x, ref) in enumerate(zip(levels, reference)):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                with Timer() as t:
                    out = paths[name](x)
                seconds[name] += t.seconds
                errors[name].append(np.linalg.norm(out.mean((2, 3)) - ref) / np.linalg.norm(ref))
    n, base = len(val), seconds["torch fp32 (channels_last)"]
    print(f"\nmachine: {machine()}, onnxruntime {ort.__version__}")
    print(
        f"{n} devval images ({len(levels)} level images), levels {ex.patches.levels}; int8 calibrated on the "
        f"levels of {len(train)} devtrain images; export {t_export.seconds:.0f} s, "
        f"quantisation {t_quant.seconds:.0f} s\n"
    )
    print(
        table(
            [
                (
                    name,
                    f"{1000 * s / n:.0f}",
                    f"{base / s:.2f}",
                    f"{np.mean(errors[name]):.4f}",
                    f"{max(errors[name]):.4f}",
                )
                for name, s in seconds.items()
            ],
            ("trunk", "ms/image", "x torch fp32", "pooled rel. error, mean", "worst"),
        )
    )


if __name__ == "__main__":
    main()
