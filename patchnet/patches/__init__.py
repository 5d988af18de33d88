"""The patch plan of an image: the paper's multi-scale square grid and the labels of its patches."""
