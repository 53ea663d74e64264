"""The pretraining job that runs on the Ray cluster (see README.md in this package)."""
