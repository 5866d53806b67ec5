"""AFR-CLIP (Yuan et al., arXiv 2503.12910): zero-shot anomaly detection by rectifying a
stateless text embedding with the image's own features (docs/algorithms/afrclip.md)."""
