"""torchvision classifiers as frozen trunks: AlexNet (the paper's network, FC6/FC7), VGG16, ResNet-50,
MobileNetV3-Large and ConvNeXt-Tiny, with torchvision's weights from the hub cache, a download or a local file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import FlattenFC
from .spec import BackboneError, BackboneSpec, Stage, register
from .weights import load_strict, read_state_dict


def torchvision_model(name: str, weights: str) -> nn.Module:
    from torchvision import models

    model = models.get_model(name, weights=None)
    if weights == "random":
        return model
    if weights == "imagenet":
        enum = models.get_model_weights(name).DEFAULT
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # no network, a proxy, a partial file: say how to supply the file
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise BackboneError(
                f"cannot load ImageNet weights for {name}: {type(e).__name__}: {e}. They are not in the torch hub "
                f"cache ({cache}) and could not be downloaded. Copy {enum.url} to {cache}, "
                f"or set backbone.weights to the path of a state_dict file."
            ) from None
        model.load_state_dict(state)
        return model
    path = Path(weights)
    load_strict(model, read_state_dict(path), path, name)
    return model


def torchvision_modules(spec: BackboneSpec, weights: str) -> tuple[nn.Module, nn.Module]:
    """Trunk (image -> map) and head (pooled region -> feature) of a torchvision classifier."""
    m: Any  # the classifier's parts (features, classifier, layer1, ...) depend on the model
    name, m = spec.name, torchvision_model(spec.name, weights)
    if name == "alexnet":  # the paper's network: frozen C1-C5, FC6, FC7
        return m.features, FlattenFC(nn.Sequential(*list(m.classifier.children())[:6]))
    if name == "vgg16":
        return m.features, FlattenFC(nn.Sequential(*list(m.classifier.children())[:5]))
    if name == "resnet50":
        return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4), nn.Identity()
    if name == "mobilenet_v3_large":
        return m.features, nn.Sequential(m.classifier[0], m.classifier[1])  # Linear(960, 1280) + Hardswish
    if name == "convnext_tiny":
        return m.features, nn.Sequential(nn.Unflatten(1, (768, 1, 1)), m.classifier[0], nn.Flatten(1))  # LayerNorm2d
    raise AssertionError(name)


def _imagenet_id(spec: BackboneSpec) -> str:
    from torchvision import models

    return f"{spec.name}:{models.get_model_weights(spec.name).DEFAULT}"


def _tv(name: str, dim: int, stages: list[tuple], **kw) -> BackboneSpec:
    """``stages``: (name, trunk module, dim, stride[, head]) shallow to deep; FC6/FC7 follow from ``layers``."""
    fc = [Stage(layer, "", dim, 32, head=k) for layer, k in kw.get("layers", {}).items()]
    return BackboneSpec(
        name,
        "torchvision",
        torchvision_modules,
        _imagenet_id,
        dim,
        224,
        weight_source="torchvision's DEFAULT weights (hub cache or download)",
        stages=(*(Stage(*s) for s in stages), *fc),
        **kw,
    )


# alexnet/vgg16 head modules kept for each layer: (Dropout,) FC6, ReLU, Dropout, FC7, ReLU.
# Stages of alexnet/vgg16: the ReLU after the last convolution of each block (DeCAF's conv1..conv5).
for _spec in (
    _tv(
        "alexnet",
        4096,
        [
            ("conv1", "1", 64, 4),
            ("conv2", "4", 192, 8),
            ("conv3", "7", 384, 16),
            ("conv4", "9", 256, 16),
            ("conv5", "11", 256, 16),
        ],
        roi_size=6,
        offset=15.0,
        layers={"fc6": 3, "fc7": 6},
    ),
    _tv(
        "vgg16",
        4096,
        [
            ("conv1", "3", 64, 1),
            ("conv2", "8", 128, 2),
            ("conv3", "15", 256, 4),
            ("conv4", "22", 512, 8),
            ("conv5", "29", 512, 16),
        ],
        roi_size=7,
        layers={"fc6": 2, "fc7": 5},
    ),
    _tv(
        "resnet50",
        2048,
        [("layer1", "4", 256, 4), ("layer2", "5", 512, 8), ("layer3", "6", 1024, 16), ("layer4", "", 2048, 32)],
        shortcuts=("downsample",),
    ),
    _tv(
        "mobilenet_v3_large",
        1280,
        [
            ("stage1", "1", 16, 2),
            ("stage2", "3", 24, 4),
            ("stage3", "6", 40, 8),
            ("stage4", "10", 80, 16),
            ("stage5", "12", 112, 16),
            ("stage6", "15", 160, 32),
            ("conv_last", "", 960, 32),
            ("head", "", 1280, 32, -1),
        ],
    ),  # Linear(960, 1280) + Hardswish
    _tv(
        "convnext_tiny",
        768,
        [
            ("stage1", "1", 96, 4),
            ("stage2", "3", 192, 8),
            ("stage3", "5", 384, 16),
            ("stage4", "", 768, 32),
            ("head", "", 768, 32, -1),
        ],
    ),  # its LayerNorm
):
    register(_spec)
