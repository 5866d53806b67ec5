"""AdaptCLIP (AAAI 2026): zero- and few-shot anomaly detection with three small adapters on a
frozen CLIP (docs/algorithms/adaptclip.md)."""
