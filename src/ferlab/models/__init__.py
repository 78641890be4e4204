"""The model registry and factory, checkpoints (model cards), summaries."""
