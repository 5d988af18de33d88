"""patchnet: multi-scale, patch-based transfer learning on a frozen ImageNet CNN (Oquab et al., CVPR 2014).

    import patchnet
    model = patchnet.load("checkpoints/demo/best.pt")
    model.predict("photo.jpg")

``load`` gives a ``patchnet.api.Model``; the modules below it follow the data flow (docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Model

__all__ = ["load"]
__version__ = "0.1.0"


def load(
    checkpoint, device: str | None = None, pool: str | None = None, fuse: bool = True, precision: str | None = None
) -> Model:
    """A trained checkpoint (``best.pt`` or ``last.pt``) ready to predict, draw score maps and localise
    (``patchnet.api.Model``). Importing ``patchnet`` alone loads no torch; ``load`` does."""
    from .api import load as _load

    return _load(checkpoint, device=device, pool=pool, fuse=fuse, precision=precision)
