"""Drafters: the small models that write for the large one.

- :mod:`bild.drafters.little`: the default little models (a few of the large model's layers with trained deltas);
- :mod:`bild.drafters.early_exit`: the large model's own first layers with an exit head, sharing its KV cache;
- :mod:`bild.drafters.quantize`: int8 copies of a drafter's layers and head for CPU drafting.

Every drafter is an ordinary :class:`bild.models.LoadedModel`; one whose decoders share the large model's cache
(early exit) says so with ``make_decoders``, which returns decoders that implement :class:`bild.cache.Decoder`.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # the shipped drafters' weights (package data)
