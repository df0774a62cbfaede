"""Two-stage paradigm: encoder registry, offline feature extraction, MIL aggregators, bag training."""
