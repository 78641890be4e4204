"""ferlab: train, compare, explain and deploy facial-emotion classifiers."""

__version__ = "0.1.0"
