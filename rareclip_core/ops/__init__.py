"""Tensor maths shared by the detectors: patch-grid maps, row gathers and row windows, training losses."""
