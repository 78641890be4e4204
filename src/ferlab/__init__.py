"""ferlab: train, compare, explain and deploy facial-emotion classifiers.

>>> import ferlab
>>> ferlab.analyze("photo.jpg")          # the shipped ferplus model; see ferlab.api   # doctest: +SKIP
"""

from ferlab.core.errors import FerlabError
from ferlab.core.version import __version__


def __getattr__(name: str):  # the API's imports (torch) load on first use, not on ``import ferlab``
    if name == "analyze":
        from ferlab.apps.api import analyze

        return analyze
    raise AttributeError(f"module 'ferlab' has no attribute {name!r}")


__all__ = ["FerlabError", "analyze", "__version__"]
