"""ferlab's version, read by the package, its checkpoints and its build."""

__version__ = "0.3.0"
