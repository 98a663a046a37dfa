"""Judging: aligned activations of two captures -> per-layer metrics -> report.

``align`` (SGM block <-> diffusers module, generated from the key map), ``metrics`` (the two
per-layer statistics, first divergence, the one assertion helper), ``tolerances`` (the one
table, per backend and dtype), ``image_metrics`` and ``report`` (report.json and pictures).
Nothing here runs a model: :mod:`lora_parity.compare` captures the sides and calls the judge.
"""
