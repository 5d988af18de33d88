"""What people look at: figures, heatmaps, annotated predictions."""
