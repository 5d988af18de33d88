"""Reading weight files safely (``torch.load(..., weights_only=True)``), and naming the weights a trunk holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .spec import BackboneError, BackboneSpec


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(
            f"weight file {path} does not exist; set backbone.weights to a state_dict file, "
            "'imagenet' for the packaged or torchvision weights, or 'random' (tests only)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"{path}: not a loadable state_dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, expected a state_dict")
    return state


def load_strict(module: nn.Module, state: dict, path: Path, name: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"{path}: does not match backbone {name}: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


_DIGESTS: dict[str, str] = {}


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256, computed once per file and process."""
    key = str(path.resolve())
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


def weights_id(spec: BackboneSpec, weights: str) -> str:
    """A string that changes whenever the weights do: the file's SHA-256 for files."""
    if weights == "random":
        return f"{spec.name}:random"
    if weights == "imagenet":
        return spec.imagenet_id(spec)
    return f"{spec.name}:{file_digest(Path(weights))}"
