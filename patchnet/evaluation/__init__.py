"""Scoring images, VOC AP and the other metrics, and boxes from score maps."""
