"""Dual-Image Enhanced CLIP with test-time adaptation (Zhang et al., arXiv 2405.04782): text
scores joined with a visual reference from the line's own earlier frames, refined per frame by
a linear adapter trained on pseudo-anomalies (docs/algorithms/dual-image-clip.md)."""
