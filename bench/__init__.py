"""CPath benchmark harness: two-stage vs end-to-end, under identical splits.

Core modules (slides, tiling, synthetic, cohort, splits, tasks, metrics, costs,
records) never import the model packages `baselines` or `e2e`; the runner, CLI
and sweeps sit on top of everything.
"""

__version__ = "0.1.0"
