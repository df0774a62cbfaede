"""CPath benchmark harness: two-stage vs end-to-end, under identical splits.

Layers, lowest first (README "Layout"; `tests/test_layers.py` keeps them true):
`bench.common` <- `bench.data` <- `bench.evaluation` <- `baselines` <- `e2e` <-
`bench.orchestration` <- `bench.cli`.
"""

__version__ = "0.1.0"
