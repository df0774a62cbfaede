"""Orchestration layer: suite specs (TOML), the runner (`bench run`) and sweeps (`bench sweep`).

The only part of `bench` that imports the model packages `baselines` and `e2e`.
"""
