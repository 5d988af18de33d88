"""Frozen ImageNet trunks: a registry from name to a ``Backbone`` that carries its own preprocessing.

- ``spec``: ``BackboneSpec`` (every fact about one backbone) and the registry;
- ``backbone``: the ``Backbone`` module (trunk + head, normalisation inside, frozen);
- ``lite``, ``torchvision``, ``timm``: the families, each registering its specs;
- ``weights``: reading weight files safely and naming the weights a trunk holds.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from . import lite, timm, torchvision  # noqa: F401  (each registers its specs)
from .backbone import Backbone, FlattenFC
from .lite import Conv2dSame, EfficientNetLiteTrunk
from .spec import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    BackboneSpec,
    Stage,
    Unlock,
    backbone_spec,
    check_layer,
    check_patch_mode,
    unlock_split,
)
from .weights import weights_id

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneError",
    "BackboneSpec",
    "Conv2dSame",
    "EfficientNetLiteTrunk",
    "FlattenFC",
    "Stage",
    "Unlock",
    "backbone_spec",
    "build_backbone",
    "check_layer",
    "check_patch_mode",
    "unlock_split",
    "weights_id",
]


def build_backbone(name: str, weights: str = "imagenet", input_size: int = 0, layer: str = "") -> Backbone:
    """The frozen backbone ``name``; ``weights`` is imagenet, random (tests) or a state_dict path.

    ``layer`` picks FC6 or FC7 (the default) as the feature of alexnet and vgg16.
    """
    spec = backbone_spec(name)
    check_layer(spec, layer)
    trunk, head = spec.builder(spec, weights)
    backbone = Backbone(
        name,
        trunk,
        head,
        feature_dim=spec.feature_dim,
        input_size=spec.input_size,
        stride=spec.stride,
        roi_size=spec.roi_size,
        mean=spec.mean,
        std=spec.std,
        weights_id=weights_id(spec, weights),
        offset=spec.offset,
        stages=spec.stages,
    )
    if layer:
        backbone.head.fc = cast(nn.Sequential, backbone.head.fc)[: spec.layers[layer]]  # FlattenFC's FC6/FC7
        backbone.weights_id += f":{layer}"
    if input_size:
        backbone.input_size = input_size
    return backbone
