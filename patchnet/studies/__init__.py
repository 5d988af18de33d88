"""The views of transfer: the linear baseline, per-layer transfer, units and retrieval."""
