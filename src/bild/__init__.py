"""bild: Big Little Decoder for Hugging Face models (a small model writes, a large model checks).

    from bild import BiLD, BiLDConfig, load_pair
    engine = BiLD(load_pair())
    print(engine.generate("Explain photosynthesis.", BiLDConfig(max_new_tokens=64)).text)
"""

from bild.config import BiLDConfig, GenerationResult, GenerationStats, SamplingConfig
from bild.decoding import BiLD, StreamChunk
from bild.models import (
    DEFAULT_LARGE,
    DEFAULT_SMALL,
    LoadedModel,
    ModelLoadError,
    ModelPair,
    VocabularyMismatchError,
    load_model,
    load_pair,
)

__all__ = [
    "BiLD",
    "BiLDConfig",
    "DEFAULT_LARGE",
    "DEFAULT_SMALL",
    "GenerationResult",
    "GenerationStats",
    "LoadedModel",
    "ModelLoadError",
    "ModelPair",
    "SamplingConfig",
    "StreamChunk",
    "VocabularyMismatchError",
    "load_model",
    "load_pair",
]
