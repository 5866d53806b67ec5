"""One folder per detector kind, all of the same shape: `config.py` (its `DetectorSettings`),
`detector.py` (its `Detector`), `paper.py` (the paper's reference figures), then its parts.
The registry (`rareclip_core.registry`) lists them by kind."""
