"""The trunk's feature map through ONNX Runtime's CPU kernels (``backbone.runtime: onnx``).

On CPUs without native bf16 the trunk runs in fp32, where ONNX Runtime's convolutions beat torch's
(``benchmarks/shared_throughput.py --runtimes torch onnx``). The fused trunk, normalisation included,
is exported once for every image size and kept beside the feature caches; its maps equal torch's
fp32 maps to float rounding, so the caches they fill are the same caches.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import atomic_write, digest
from .backbone import Backbone
from .lite import Conv2dSame
from .spec import BackboneError

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the exported graph changes: older files are then left unused


def onnx_available() -> bool:
    """Whether the trunk can be exported (the onnx package) and run (onnxruntime)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _FeatureMap(nn.Module):
    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.feature_map(x)


def export_feature_map(backbone: Backbone) -> bytes:
    """The backbone's ``feature_map`` (normalisation included) as ONNX for any image height and width."""
    model = _FeatureMap(backbone).float().eval()
    for m in model.modules():
        if isinstance(m, Conv2dSame):
            m.shape_free = True  # one explicit pad computed from the size: no branch on it in the graph
    example = (torch.rand(1, 3, 224, 320),)
    out = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the tracing exporter is deprecated but exports this trunk in seconds (torch.export's takes minutes)
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example,
                out,
                dynamo=False,
                input_names=["image"],
                output_names=["map"],
                dynamic_axes={"image": {2: "height", 3: "width"}, "map": {2: "rows", 3: "cols"}},
                opset_version=17,
            )
    except Exception as e:
        raise BackboneError(
            f"{backbone.name}: its trunk could not be exported to ONNX ({type(e).__name__}: {e}); "
            "set backbone.runtime=torch"
        ) from e
    finally:
        for m in model.modules():
            if isinstance(m, Conv2dSame):
                m.shape_free = False
    return out.getvalue()


class OnnxFeatureMap:
    """A fused backbone's ``feature_map`` run by an ONNX Runtime CPU session: float32 NCHW in and out."""

    def __init__(self, model: bytes | Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # its graph optimiser warns about unused initialisers
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {"image": x})[0])


def onnx_feature_map(backbone: Backbone, folder: str | Path) -> OnnxFeatureMap:
    """The ONNX Runtime ``feature_map`` of a fused backbone, exported into ``folder`` on first use (random
    weights, which differ at every build, are exported anew and never kept)."""
    if backbone.weights_id.endswith(":random"):
        return OnnxFeatureMap(export_feature_map(backbone))
    key = digest(
        {
            "version": EXPORT_VERSION,
            "backbone": backbone.name,
            "weights": backbone.weights_id,
            "feature_dim": backbone.feature_dim,
            "torch": torch.__version__.split("+")[0],
        }
    )
    path = Path(folder) / "trunks" / f"{backbone.name}-{key[:16]}.onnx"
    if not path.is_file():
        log.info("exporting the %s trunk to ONNX for ONNX Runtime: %s", backbone.name, path)
        atomic_write(path, export_feature_map(backbone))  # two processes at once: the last rename wins, both whole
    try:
        return OnnxFeatureMap(path)
    except Exception as e:  # a file cut short by a full disk, or damaged afterwards
        raise BackboneError(
            f"{path}: ONNX Runtime cannot load this exported trunk ({type(e).__name__}: {e}); "
            f"delete it to export it again (rm {path})"
        ) from e
