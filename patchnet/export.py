"""The trained model as one program for a fixed image size, to serve without patchnet.

``FixedSizeModel`` is the whole path of one image of W x H pixels, in plain torch operations: the
rescaling of each pyramid level, the frozen trunk (shared mode: one pass per level), each patch's
mean over its region of the map, the storage round trip the head was trained on (fp16, 8-bit codes,
the PCA projection), the adaptation head, the pooling, the fused max-pool classifier and the
calibration. ``export`` writes it with ``torch.export`` (``torch.export.load(path).module()`` runs it
with plain torch) and, where the ops allow, as ONNX. A ``.pt2`` archive can hold pickled objects, and
unpickling runs code: load only programs you made (``load_program`` reads them as safely as torch allows).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .api import load
from .backbones.lite import Conv2dSame
from .backbones.regions import region_weights
from .errors import PatchnetError
from .evaluation.predictor import Predictor
from .evaluation.scoring import InferOptions
from .features.extract import map_cells
from .files import atomic_write
from .head.pooling import patch_values, pool


class ExportError(PatchnetError, ValueError):
    """A model that cannot be exported as asked."""


class FixedSizeModel(nn.Module):
    """A checkpoint's whole scoring of one W x H image: (1, 3, H, W) RGB in [0, 1] -> probabilities (C,) (or, without
    a calibration, the scores), scores (C,) and the (N, C) patch values of the score maps."""

    # buffers, registered in __init__ (the pca_, fusion_ and cal_ ones only where the checkpoint has them)
    order: torch.Tensor
    pca_mean: torch.Tensor
    pca_components: torch.Tensor
    fusion_coef: torch.Tensor
    fusion_intercept: torch.Tensor
    fusion_head_mean: torch.Tensor
    fusion_head_std: torch.Tensor
    fusion_linear_mean: torch.Tensor
    fusion_linear_std: torch.Tensor
    cal_a: torch.Tensor
    cal_b: torch.Tensor

    def __init__(self, predictor: Predictor, width: int, height: int):
        super().__init__()
        ex = predictor.extractor
        plan = ex.plan(width, height)
        if ex.backbone.roi_size:
            raise ExportError(
                f"export pools each patch as a mean over its region of the map; {ex.backbone.name}'s FC head "
                "takes a RoI grid (alexnet, vgg16): export an EfficientNet-Lite, ResNet or timm model"
            )
        if plan.mode != "shared" or plan.cropped:
            raise ExportError(
                "export runs shared mode (one trunk pass per pyramid level) without exact crops; this checkpoint "
                f"uses patches.mode={plan.mode} (exact_up_to crops {len(plan.cropped)} scales)"
            )
        self.width, self.height, self.classes = width, height, list(predictor.classes)
        self.backbone, self.head = ex.backbone.float().eval(), predictor.head.float().eval()
        self.sizes, self.antialias, order = [], [], []
        starts = np.cumsum([0] + [len(g.boxes) for g in plan.grids])
        for n, level in enumerate(plan.levels):
            size = (max(1, round(height * level.factor)), max(1, round(width * level.factor)))
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in level.grids])
            boxes = torch.from_numpy(plan.boxes[rows]).float()
            cells = map_cells(ex.backbone, boxes, size[1] / width, size[0] / height)
            h, w = _map_size(ex.backbone, size)
            self.register_buffer(f"weights{n}", region_weights(cells, h, w))  # each patch's mean as a product
            self.sizes.append(size)
            self.antialias.append(level.factor < 1)
            order.append(rows)
        self.register_buffer("order", torch.from_numpy(np.argsort(np.concatenate(order), kind="stable")))
        self._codec(predictor)
        self._scoring(predictor)
        self.requires_grad_(False)  # a program for inference

    def _codec(self, predictor: Predictor) -> None:
        codec = predictor.codec
        self.int8, self.project = codec.int8, codec.components is not None
        if self.project:
            self.register_buffer("pca_mean", torch.from_numpy(codec.mean))
            self.register_buffer("pca_components", torch.from_numpy(codec.components))

    def _scoring(self, predictor: Predictor) -> None:
        self.pool_name, self.pool_cfg = predictor.pool, predictor.recipe.pool
        self.fused, self.calibrated = predictor.fusion is not None, predictor.calibration is not None
        if predictor.fusion is not None:
            f = predictor.fusion
            for name in ("coef", "intercept", "head_mean", "head_std", "linear_mean", "linear_std", "weight"):
                self.register_buffer(f"fusion_{name}", torch.as_tensor(getattr(f, name), dtype=torch.float64))
        if predictor.calibration is not None:
            c = predictor.calibration
            self.register_buffer("cal_a", torch.as_tensor(c.a, dtype=torch.float64))
            self.register_buffer("cal_b", torch.as_tensor(c.b, dtype=torch.float64))

    def stored(self, features: torch.Tensor) -> torch.Tensor:
        """The features as the head read them in training: through fp16, the projection and the 8-bit codes."""
        x = features.half().float()
        if self.project:
            x = (x - self.pca_mean) @ self.pca_components.T
        if self.int8:
            low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
            step = torch.where(high > low, (high - low) / 255, torch.ones_like(high))
            x = ((x - low) / step).round().clamp(0, 255) * step + low
        elif self.project:
            x = x.half().float()
        return x

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = []
        for n, (size, antialias) in enumerate(zip(self.sizes, self.antialias)):
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=antialias)
            fmap = self.backbone.feature_map(scaled)[0].flatten(1)  # (C, h w)
            parts.append(self.backbone.head(getattr(self, f"weights{n}") @ fmap.T))
        features = torch.cat(parts)[self.order]
        stored = self.stored(features)
        logits = self.head(stored)
        scores = pool(patch_values(logits, self.pool_name).double(), [len(stored)], self.pool_cfg, self.pool_name)[0]
        power = self.pool_name == "power"
        values = logits.float().softmax(-1)[:, :-1] if power else patch_values(logits, "max").sigmoid()
        if self.fused:
            trunk = stored @ self.pca_components + self.pca_mean if self.project else stored
            scores = self._fuse(scores, trunk.double().amax(0))
        if self.calibrated:
            x = scores if self.fused else self._feature(scores)
            return torch.sigmoid((self.cal_a * x + self.cal_b).clamp(-60, 60)), scores, values
        return scores, scores, values

    def _feature(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.clamp(min=1e-300).log() if self.pool_name == "power" else scores

    def _fuse(self, scores: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        decision = self.fusion_coef @ (pooled / pooled.norm().clamp(min=1e-12)) + self.fusion_intercept
        head = (self._feature(scores) - self.fusion_head_mean) / self.fusion_head_std
        return head + self.fusion_weight * (decision - self.fusion_linear_mean) / self.fusion_linear_std


def _map_size(backbone, size: tuple[int, int]) -> tuple[int, int]:
    with torch.no_grad():
        fmap = backbone.feature_map(torch.zeros(1, 3, *size, device=next(backbone.parameters()).device))
    return int(fmap.shape[-2]), int(fmap.shape[-1])


def export(
    checkpoint: str | Path,
    width: int,
    height: int,
    out: str | Path,
    onnx: str | Path | None = None,
    device: str = "cpu",
):
    """Write the checkpoint's ``FixedSizeModel`` for W x H images with ``torch.export`` (and as ONNX when
    ``onnx`` is given), traced on ``device``, where its weights then live; returns the model and its program."""
    predictor = Predictor(checkpoint, InferOptions(device=device, precision="fp32"))
    target = predictor.extractor.device
    model = FixedSizeModel(predictor, width, height).to(target).eval()
    example = (torch.rand(1, 3, height, width, device=target),)
    with torch.no_grad():
        program = torch.export.export(model, example)
    atomic_write(out, lambda f: torch.export.save(program, f))
    if onnx is not None:
        for module in model.modules():  # padded depthwise weights come out of the ONNX exporter dangling
            if isinstance(module, Conv2dSame):
                module.pad_weight = False
        # the exporter's optimisers log every rewrite at INFO
        quiet = {name: logging.getLogger(name) for name in ("onnx_ir", "onnxscript")}
        levels = {name: q.level for name, q in quiet.items()}
        for q in quiet.values():
            q.setLevel(logging.WARNING)
        try:
            onnx_program = torch.onnx.export(
                model,
                example,
                input_names=["image"],
                output_names=["probabilities", "scores", "patch_values"],
                dynamo=True,
                verbose=False,
            )
        except Exception as e:  # an op ONNX lacks, or the exporter's packages missing
            raise ExportError(
                f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
                f"torch.export program {out} was written"
            ) from None
        finally:
            for name, q in quiet.items():
                q.setLevel(levels[name])
        assert onnx_program is not None  # dynamo=True returns the program
        atomic_write(onnx, onnx_program.model_proto.SerializeToString())
    return model, program


# constants that torch.export.load unpickles in full (TorchScript objects, opaque Python objects)
UNPICKLED_CONSTANTS = ("custom_obj", "opaque_obj")


@contextlib.contextmanager
def _weights_only_loads():
    """Every ``torch.load`` in the block with ``weights_only=True``, whatever its caller asks (torch.export.load
    asks for full unpickling of pickled weights and falls back to it for sample inputs)."""
    saved = {
        name: os.environ.pop(name, None)
        for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """A program ``export`` wrote (``.pt2``), read back with ``torch.export.load``; ``.module()`` runs it.

    Load only programs you made (or got from someone you trust): a ``.pt2`` archive can hold pickled objects, and
    unpickling runs code. This loader is as safe as torch allows: it refuses an archive holding constants that
    torch unpickles in full (TorchScript or opaque objects, which ``export`` never writes), and reads every
    pickled tensor with ``torch.load(weights_only=True)``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            configs = [n for n in archive.namelist() if n.endswith("_constants_config.json")]
            unsafe = [
                f"{key} ({meta.get('path_name')})"
                for n in configs
                for key, meta in json.loads(archive.read(n)).get("config", {}).items()
                if str(meta.get("path_name", "")).startswith(UNPICKLED_CONSTANTS)
            ]
    except (OSError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        raise ExportError(f"{path}: not a torch.export program that patchnet export writes ({e})") from None
    if unsafe:
        raise ExportError(
            f"{path}: refused: it holds objects that loading would unpickle, which can run code "
            f"({', '.join(unsafe[:3])}); patchnet export never writes them: load only programs you made"
        )
    try:
        with _weights_only_loads():
            return torch.export.load(str(path))
    except Exception as e:  # a pickled payload weights_only refuses, or a damaged archive
        first = (str(e).splitlines() or [""])[0][:200]
        raise ExportError(
            f"{path}: cannot load it as a program ({type(e).__name__}: {first}); load only programs you made "
            "with patchnet export"
        ) from None


def _best_ms(run, repeats: int) -> float:
    run()  # the first call pays for lazy set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def check_export(
    checkpoint: str | Path,
    program: str | Path,
    image: np.ndarray,
    onnx: str | Path | None = None,
    repeats: int = 5,
    device: str = "cpu",
) -> dict[str, float]:
    """The written program (and ONNX file, run by onnxruntime) against the API on one (H, W, 3) uint8 image of the
    exported size: max absolute difference of the outputs, and median milliseconds per image of each; the program
    and the API on ``device`` (the program's, as exported)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    module = load_program(program).module()
    api = load(checkpoint, device=device, precision="fp32")  # the precision the program runs at
    reference = api.predict(image)
    want = reference.probabilities if reference.probabilities is not None else reference.scores
    out = {"api_fp32_ms": _best_ms(lambda: api.predict(image), repeats)}
    default = load(checkpoint, device=device)  # the trunk at the recipe's precision (bf16 where native)
    out["api_ms"] = _best_ms(lambda: default.predict(image), repeats)
    on = api.predictor.extractor.device
    with torch.no_grad():
        x_on = x.to(on)
        got = module(x_on)[0].cpu().numpy()

        def run() -> None:
            module(x_on)
            if on.type == "cuda":
                torch.cuda.synchronize(on)

        out["program_ms"] = _best_ms(run, repeats)
    out["program_diff"] = float(np.abs(got - want[0]).max())
    if onnx is not None:
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("checking the ONNX file needs onnxruntime: pip install 'patchnet[onnx]'") from None

        session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        out["onnx_diff"] = float(np.abs(session.run(None, feed)[0] - want[0]).max())
        out["onnx_ms"] = _best_ms(lambda: session.run(None, feed), repeats)
    return out
