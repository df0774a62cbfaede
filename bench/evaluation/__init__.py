"""Evaluation layer: tasks (heads, losses, scores), metrics and bootstrap intervals, costs,
the training kit both paradigms share (devices, optimisers, checkpoints, model selection,
fold bags), run records, sweep results and leaderboards.

Imports `bench.common` and `bench.data` only; never a model package (`baselines`, `e2e`).
"""
