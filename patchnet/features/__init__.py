"""Patch features from the frozen trunk: extraction (exact, shared, whole), per-stage maps, and the features of a
split computed once into the store."""
