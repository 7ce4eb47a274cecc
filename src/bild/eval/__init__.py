"""Evaluation: datasets, metrics, the side-by-side method harness and threshold sweeps (`bild eval`, `bild sweep`)."""
