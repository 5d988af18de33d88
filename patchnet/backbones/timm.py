"""Any timm model as the frozen trunk: ``backbone.name: timm/<model name>``.

The spec comes from the model itself (feature size, stride, map layout) and its ``pretrained_cfg``
(input size, mean, std); the feature is timm's own pre-logits vector applied to the mean of the
patch's region of the ``forward_features`` map.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .spec import BackboneError, BackboneSpec, Stage, register_prefix


def _timm():
    """The timm package, imported only when a timm backbone is asked for."""
    try:
        import timm
    except ImportError:
        raise BackboneError("timm/<name> backbones need the timm package: pip install 'timm>=1.0'") from None
    return timm


class TimmTrunk(nn.Module):
    """A timm model's ``forward_features`` as a (B, C, h, w) map, whatever layout the model returns.

    ``layout``: nchw (CNNs), nhwc (Swin-like models) or tokens (ViT-like models: the class and
    register tokens are dropped and the patch tokens laid out on their grid).
    """

    model: Any  # a timm model: forward_features and forward_head are timm's (no common base declares them)

    def __init__(self, model: nn.Module, layout: str, stride: int):
        super().__init__()
        self.model, self.layout, self.stride = model, layout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_features(x)
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        if self.layout == "tokens":  # a padded image has a partial last row and column of patches
            h, w = -(-x.shape[-2] // self.stride), -(-x.shape[-1] // self.stride)
            tokens = out[:, getattr(self.model, "num_prefix_tokens", 0) :]
            return tokens.transpose(1, 2).reshape(len(out), -1, h, w)
        return out

    def fuse(self) -> None:
        """Fold the branches of re-parameterisable models (RepVGG, MobileOne, FastViT); others are unchanged."""
        from timm.utils import reparameterize_model

        reparameterize_model(self.model, inplace=True)


class TimmHead(nn.Module):
    """The model's own ``forward_head(x, pre_logits=True)`` applied to a pooled (N, C) region.

    The vector goes in as a one-cell map (or as identical tokens, one per class/register token plus
    one patch token), which every global pooling returns unchanged; what follows the pooling
    (ConvNeXt's LayerNorm, MobileNetV3's 1x1 head convolution, a ViT's fc_norm) then runs as in timm.
    """

    def __init__(self, trunk: TimmTrunk):
        super().__init__()
        self.trunk = [trunk]  # a plain list, not a submodule: the model's parameters belong to the trunk

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk[0]
        if trunk.layout == "nchw":
            x = v[:, :, None, None]
        elif trunk.layout == "nhwc":
            x = v[:, None, None, :]
        else:
            x = v[:, None].expand(-1, getattr(trunk.model, "num_prefix_tokens", 0) + 1, -1)
        return trunk.model.forward_head(x, pre_logits=True)


def _timm_hub_cache(tagged: str) -> Path:
    from huggingface_hub import constants

    hub_id = _timm().models.get_pretrained_cfg(tagged).hf_hub_id or f"timm/{tagged}"
    return Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"


def timm_modules(spec: BackboneSpec, weights: str) -> tuple[nn.Module, nn.Module]:
    """Trunk and head of ``timm.create_model``; weights from the Hugging Face cache or a local file."""
    timm, tagged, overlay = _timm(), spec.timm_name, None
    if weights not in ("random", "imagenet"):
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(
                f"weight file {path} does not exist; set backbone.weights to a .safetensors or .pth "
                f"file of {tagged}, 'imagenet' for timm's pretrained weights, or 'random' (tests only)"
            )
        overlay = {"file": str(path)}  # timm reads it (torch.load with weights_only=True) and adapts it
    try:
        # With its own classifier the weights load strictly (num_classes=0 would let a wrong file pass
        # as random weights); the classifier goes afterwards.
        model = timm.create_model(
            tagged, pretrained=weights != "random", pretrained_cfg_overlay=overlay, **spec.timm_kwargs
        )
    except Exception as e:
        if weights == "random":
            raise
        if overlay:
            raise BackboneError(
                f"{path}: cannot be loaded as timm model {tagged}: {type(e).__name__}: {str(e)[:300]}"
            ) from None
        raise BackboneError(  # no network and no cached file, or no weights for this tag
            f"cannot load timm's pretrained weights for {tagged}: {type(e).__name__}: {e}. They are read from the "
            f"Hugging Face cache ({_timm_hub_cache(tagged)}) or downloaded into it. Fill the cache on a machine "
            f"with network (python -c \"import timm; timm.create_model('{tagged}', pretrained=True)\") and copy "
            "it here (HF_HOME points at another one), or set backbone.weights to the path of the model's "
            "weight file (model.safetensors or a .pth state_dict)."
        ) from None
    model.reset_classifier(0)
    trunk = TimmTrunk(model, spec.layout, spec.stride)
    return trunk, TimmHead(trunk)


def _imagenet_id(spec: BackboneSpec) -> str:  # the tag names the weights: resnet18.a1_in1k
    return f"{spec.name}:{spec.timm_name}"


@functools.cache
def timm_spec(name: str) -> BackboneSpec:
    """A timm model's spec, from a copy built without weights on the meta device (on the CPU if that fails)."""
    timm, arch = _timm(), name[len("timm/") :]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise BackboneError(
            f"unknown timm model {arch!r} in backbone {name!r}"
            + (f"; close names: {', '.join(close)}" if close else "")
            + "; list them with python -c \"import timm; print(timm.list_models('resnet*'))\" "
            "(pretrained=True lists those with weights)"
        )
    for device in ("meta", "cpu"):  # meta: no memory, no time; a few models only run on real tensors
        try:
            return _probe_timm(name, arch, torch.device(device))
        except BackboneError:
            raise
        except Exception as e:
            if device == "cpu":
                raise BackboneError(
                    f"backbone {name}: timm cannot create or run {arch}: {type(e).__name__}: {e}"
                ) from None
    raise AssertionError


def _probe_timm(name: str, arch: str, device: torch.device) -> BackboneSpec:
    model, kwargs, layout, stride = _probe_layout(arch, device)
    cfg = cast(dict[str, Any], model.pretrained_cfg)  # timm's, not an nn.Module attribute
    size = cfg["input_size"][1]
    with torch.no_grad():
        trunk = TimmTrunk(model, layout, stride)
        try:  # any other size, not a multiple of the stride: what shared mode feeds it
            trunk(torch.zeros(1, 3, size + stride + 1, size + 2 * stride + 3, device=device))
            fixed = False
        except Exception:
            fixed = True
        feature = TimmHead(trunk)(trunk(torch.zeros(1, 3, size, size, device=device)).mean(dim=(2, 3)))
    if feature.ndim != 2:
        raise BackboneError(
            f"backbone {name}: timm's forward_head gives a {tuple(feature.shape)} output, not one "
            "vector per image; choose another model"
        )
    tagged = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else arch  # resnet18 -> resnet18.a1_in1k
    # a CNN's stages are timm's feature_info entries (maps); a token model has the feature only
    info = getattr(model, "feature_info", None) if layout == "nchw" else None
    stages = [
        Stage(i["module"].replace(".", "_"), f"model.{i['module']}", i["num_chs"], i["reduction"]) for i in (info or [])
    ]
    stages.append(Stage("head", "", feature.shape[1], stride, head=-1))
    shortcuts = ("downsample",) if type(model).__name__ == "ResNet" else ()  # beside the main path in timm's ResNets
    return BackboneSpec(
        name,
        "timm",
        timm_modules,
        _imagenet_id,
        feature.shape[1],
        size,
        stride=stride,
        stages=tuple(stages),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        fixed_size=fixed,
        weight_source=f"timm's pretrained weights {tagged} (Hugging Face cache or download)",
        timm_name=tagged,
        timm_kwargs=kwargs,
        layout=layout,
        shortcuts=shortcuts,
    )


def _probe_layout(arch: str, device: torch.device) -> tuple[nn.Module, dict, str, int]:
    """A weightless copy of a timm model, the arguments it was made with, what ``forward_features`` returns
    (nchw, nhwc or tokens) and the stride of its map."""
    timm = _timm()

    def create(**kwargs):
        with device:
            return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)

    model, kwargs = create(), {}
    size = model.pretrained_cfg["input_size"][1]
    with torch.no_grad():
        out = model.forward_features(torch.zeros(1, 3, size, size, device=device))
    layout = {3: "tokens", 4: "nchw" if out.shape[1] == model.num_features else "nhwc"}[out.ndim]
    if layout == "tokens":  # a ViT resamples its position embedding for other sizes when asked to
        try:
            kwargs = {"dynamic_img_size": True, "dynamic_img_pad": True}
            model = create(**kwargs)
        except TypeError:  # not supported: a fixed size
            kwargs = {}
    info = getattr(model, "feature_info", None)
    if info:
        stride = info[-1]["reduction"]
    else:  # from the map's size, or a token model's patch embedding
        stride = model.patch_embed.patch_size[0] if layout == "tokens" else size // out.shape[1 + (layout == "nchw")]
    return model, kwargs, layout, stride


register_prefix("timm/", timm_spec)
