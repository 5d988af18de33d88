"""The adaptation layers trained on the frozen features, their losses, the pooling of patch scores, the fusion with the
whole-image baseline and the calibration."""
