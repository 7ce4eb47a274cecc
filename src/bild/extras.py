"""Optional parts of bild and the packages they need (``pip install 'bild[eval]'`` and so on).

The core install is the engine; evaluation, serving and Hugging Face datasets come with extras. Modules that need an
extra call :func:`require` before importing its packages, so a missing one is a one-line message naming the pip
command instead of a ModuleNotFoundError from deep inside an import chain.
"""

from __future__ import annotations

import importlib.util

# extra -> the import names of the packages it brings (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "eval": ("sacrebleu", "rouge_score", "matplotlib"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "datasets": ("datasets",),
    "ray": ("ray",),
}


class MissingExtraError(ImportError):
    """An optional part of bild is used without its extra installed; the message names the pip command."""


def missing(extra: str) -> list[str]:
    """The packages of ``extra`` that are not installed (empty when it is complete)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, feature: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless every package of ``extra`` is installed."""
    absent = missing(extra)
    if absent:
        what = feature or f"bild.{extra}"
        raise MissingExtraError(
            f"{what} needs the '{extra}' extra (missing: {', '.join(absent)}): pip install 'bild[{extra}]'"
        )
