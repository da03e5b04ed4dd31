"""Measuring models and runs: text samples and held-out CE (text.py), images (images.py,
image_grid.py), and the memory of a training step (memory.py)."""
