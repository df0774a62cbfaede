"""End-to-end paradigm: patch sources, MRIS sampling, the joint trainer, gather/scatter GMA."""
