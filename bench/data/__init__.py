"""Data layer: the work folder's layout, slides (OpenSlide), tissue tiling, synthetic cohorts,
cohorts (labels + slides) and patient-level split files.

Imports only `bench.common`; never a task, metric or model.
"""
