"""Frames and where they come from: decoding and validation, image conversion, line sources,
MVTec AD / VisA / folder datasets, and synthetic lines with known defects."""
