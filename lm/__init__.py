"""lm: language models trained by maximum likelihood, in JAX.

Installed without extras (`pip install lm-mle`), `lm.losses` and `lm.masking` work on jax and
numpy alone. Everything else (models, data, trainer, command lines) needs the `train` extra;
importing it without that extra fails with a message that names the extra to install.
"""

import importlib.abc
import sys

# third-party packages by the extra (pyproject.toml) that installs them
_EXTRA_OF = {name: "train" for name in (
    "flax", "optax", "orbax", "etils", "grain", "array_record", "ml_collections", "wandb", "absl", "tqdm",
    "matplotlib", "tokenizers", "sentencepiece", "jinja2")}
_EXTRA_OF.update(torch="hf", transformers="hf")


class _NameTheExtra(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: asked only when no finder has the module. For a package of an
    extra imported by lm's own code, raise ModuleNotFoundError naming the extra."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if path is not None or top not in _EXTRA_OF:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        importer = frame.f_globals.get("__name__", "") if frame is not None else ""
        if importer != "lm" and not importer.startswith("lm."):
            return None
        extra = _EXTRA_OF[top]
        raise ModuleNotFoundError(
            f"{importer} needs {top!r}, which lm's {extra!r} extra installs: pip install 'lm-mle[{extra}]' "
            f"(from a checkout: pip install -e '.[{extra}]'). Without extras only lm.losses and lm.masking "
            "are usable.", name=top)


if not any(isinstance(f, _NameTheExtra) for f in sys.meta_path):
    sys.meta_path.append(_NameTheExtra())
