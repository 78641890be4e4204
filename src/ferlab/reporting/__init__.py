"""Metrics, model cards as people read them, reports and cross-validation summaries."""
