"""GMA: end-to-end training on whole slides with gather/scatter over many processes.

- `config`: `GMAConfig` and the job files a rank reads;
- `core`: one gather/scatter step (topologies, encoder and aggregator sides);
- `loop`: the epoch loop every rank runs (model selection, checkpoints, results);
- `trainer`: `train_gma`, which starts torchrun (or runs the chunked mode in-process);
- `launch`: torchrun process management, rank events and errors;
- `check`: `bench check-gma`, gradients of N ranks vs one process;
- `entry` / `__main__`: `python -m e2e.gma --job FILE | --config FILE.toml`.
"""
