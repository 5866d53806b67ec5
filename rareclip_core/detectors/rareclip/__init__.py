"""RareCLIP (ICCV 2025): online zero-shot anomaly detection by patch and image rarity
(docs/algorithms/rareclip.md)."""
