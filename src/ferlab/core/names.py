"""Class names: one emotion, many spellings (``anger`` and ``angry``), compared and converted in one place.

>>> canonical("Anger"), same_class("happiness", "happy"), spelled_as("sadness", ["happy", "sad"])
('angry', True, 'sad')
"""

from __future__ import annotations

from collections.abc import Sequence

# names datasets use for one emotion -> the name most datasets use (evaluate's class maps, --labels files)
SYNONYMS = {
    "anger": "angry",
    "angry": "angry",
    "mad": "angry",
    "disgusted": "disgust",
    "disgust": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "neutral": "neutral",
    "calm": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "contempt": "contempt",
}


def canonical(label: str) -> str:
    """The name most datasets use for ``label``'s emotion (lower case; unknown names as they are, lower-cased)."""
    return SYNONYMS.get(label.lower(), label.lower())


def same_class(a: str, b: str) -> bool:
    """Two class names for one emotion (angry and anger: models trained on differently named folders)."""
    return canonical(a) == canonical(b)


def spelled_as(label: str, classes: Sequence[str]) -> str:
    """``label`` in the spelling of ``classes`` (anger -> angry for a model that says angry); else as it is."""
    return next((c for c in classes if same_class(c, label)), label)
