"""The methods `bild eval` compares, by name: each turns a prompt into text, token ids, a time and BiLD statistics.

A method is built once per run from a :class:`MethodContext` (the loaded pair, one shared engine and the user's
BiLD settings) and then called on every example, so every method sees the same loaded models and the same prompt
tokens. Methods that go through transformers' ``generate`` (the baseline users know, and its assisted generation)
report no BiLD statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
from transformers import GenerationConfig

from bild.config import BiLDConfig, GenerationResult, GenerationStats
from bild.decoding import BiLD
from bild.devices import input_device
from bild.models import LoadedModel, ModelPair

DEFAULT_DRAFT_WINDOW = 5  # draft tokens per large pass of the fixed-window speculative baseline


@dataclass(frozen=True)
class Request:
    """One example's prompt, encoded once by the harness (chat template applied when the large model has one)."""

    prompt: str
    prompt_ids: list[int]
    chat: bool


@dataclass(frozen=True)
class MethodOutput:
    text: str
    token_ids: list[int]  # new tokens, cut at (and without) the first end-of-sequence token
    time_s: float  # end-to-end time of the call
    stats: GenerationStats | None  # None for methods that run through transformers' generate


@dataclass(frozen=True)
class MethodContext:
    pair: ModelPair
    engine: BiLD
    config: BiLDConfig  # the user's thresholds and max_new_tokens
    draft_window: int = DEFAULT_DRAFT_WINDOW


class Method(Protocol):
    def __call__(self, request: Request) -> MethodOutput: ...


MethodFactory = Callable[[MethodContext], Method]
_REGISTRY: dict[str, tuple[MethodFactory, bool, str]] = {}  # name -> (factory, needs a small model, description)


def register_method(name: str, needs_small: bool, description: str) -> Callable[[MethodFactory], MethodFactory]:
    def decorate(factory: MethodFactory) -> MethodFactory:
        _REGISTRY[name] = (factory, needs_small, description)
        return factory

    return decorate


def method_names() -> list[str]:
    return list(_REGISTRY)


def describe_methods() -> str:
    return "\n".join(f"  {name:<18} {description}" for name, (_, _, description) in _REGISTRY.items())


def needs_small(name: str) -> bool:
    return _lookup(name)[1]


def build_method(name: str, context: MethodContext) -> Method:
    factory, small_needed, _ = _lookup(name)
    if small_needed and context.pair.small is None:
        raise ValueError(f"method {name!r} needs a small model")
    return factory(context)


def _lookup(name: str) -> tuple[MethodFactory, bool, str]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# ---- transformers generate -------------------------------------------------------------------------------------
def _hf_generate(large: LoadedModel, request: Request, max_new_tokens: int, assistant: LoadedModel | None,
                 **settings) -> MethodOutput:
    """Greedy `model.generate` on the large model, with `assistant_model` (its default settings) when given, and any
    further generation ``settings``."""
    tokenizer = large.tokenizer
    eos = list(large.eos_token_ids) or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=pad, **settings)
    extra = {"assistant_model": assistant.model} if assistant is not None else {}
    start = time.perf_counter()
    input_ids = torch.tensor([request.prompt_ids], device=input_device(large.model))  # (1, prompt_len)
    with torch.inference_mode():
        sequences = large.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, **extra
        )  # (1, prompt_len + new) decoder-only; (1, 1 + new) encoder-decoder
    skip = 1 if large.is_encoder_decoder else input_ids.shape[1]
    token_ids = cut_at_eos(sequences[0, skip:].tolist(), large.eos_token_ids)
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return MethodOutput(text=text, token_ids=token_ids, time_s=time.perf_counter() - start, stats=None)


@register_method("vanilla", needs_small=False, description="large model alone, greedy, transformers generate (baseline)")
def _vanilla(context: MethodContext) -> Method:
    return lambda request: _hf_generate(context.pair.large, request, context.config.max_new_tokens, None)


@register_method("hf-assisted", needs_small=True, description="transformers assisted generation, assistant_model=small, defaults")
def _hf_assisted(context: MethodContext) -> Method:
    return lambda request: _hf_generate(context.pair.large, request, context.config.max_new_tokens, context.pair.small)


@register_method("hf-prompt-lookup", needs_small=False, description="transformers prompt lookup decoding (prompt_lookup_num_tokens=10), no small model")
def _hf_prompt_lookup(context: MethodContext) -> Method:
    return lambda request: _hf_generate(context.pair.large, request, context.config.max_new_tokens, None,
                                        prompt_lookup_num_tokens=10)


# ---- the bild engine -------------------------------------------------------------------------------------------
def _from_result(result: GenerationResult, time_s: float, eos_ids: tuple[int, ...], tokenizer) -> MethodOutput:
    token_ids = cut_at_eos(result.token_ids, eos_ids)
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return MethodOutput(text=text, token_ids=token_ids, time_s=time_s, stats=result.stats)


def _engine_method(context: MethodContext, config: BiLDConfig, run: Callable[[Request, BiLDConfig], GenerationResult]) -> Method:
    eos_ids = context.pair.large.eos_token_ids

    def call(request: Request) -> MethodOutput:
        start = time.perf_counter()
        result = run(request, config)
        return _from_result(result, time.perf_counter() - start, eos_ids, context.engine.tokenizer)

    return call


def bild_method(context: MethodContext, **overrides) -> Method:
    """BiLD on the context's pair with the context's config, some fields replaced (e.g. the thresholds of a sweep)."""
    config = replace(context.config, **overrides)
    return _engine_method(context, config, lambda request, cfg: context.engine.generate_ids(request.prompt_ids, cfg))


@register_method("bild", needs_small=True, description="BiLD with the given thresholds")
def _bild(context: MethodContext) -> Method:
    return bild_method(context)


@register_method("bild-lossless", needs_small=True, description="BiLD with rollback threshold 0 (large model's greedy output)")
def _bild_lossless(context: MethodContext) -> Method:
    return bild_method(context, rollback_threshold=0.0)


@register_method("bild-fixed", needs_small=True, description="BiLD with the given thresholds, Algorithm 1 as published (policy fixed)")
def _bild_fixed(context: MethodContext) -> Method:
    return bild_method(context, policy="fixed")


@register_method("bild-no-lookup", needs_small=True, description="BiLD without lookup drafts (lookup 0)")
def _bild_no_lookup(context: MethodContext) -> Method:
    return bild_method(context, lookup=0)


@register_method("bild-lossless-no-lookup", needs_small=True, description="bild-lossless without lookup drafts")
def _bild_lossless_no_lookup(context: MethodContext) -> Method:
    return bild_method(context, rollback_threshold=0.0, lookup=0)


@register_method("bild-lossless-fixed", needs_small=True, description="bild-lossless under the fixed policy")
def _bild_lossless_fixed(context: MethodContext) -> Method:
    return bild_method(context, rollback_threshold=0.0, policy="fixed")


@register_method("speculative", needs_small=True, description="fixed draft window, exact-match verification (paper Table 3)")
def _speculative(context: MethodContext) -> Method:
    # Fallback threshold 0 never fires, so the small model drafts exactly `draft_window` tokens before each large
    # pass; rollback threshold 0 replaces the first token the large model disagrees with: greedy speculative decoding.
    return bild_method(context, fallback_threshold=0.0, rollback_threshold=0.0, max_small_steps=context.draft_window,
                       policy="fixed")


@register_method("bild-no-rollback", needs_small=True, description="ablation of Algorithm 1: rollback threshold infinity, no repetition guard")
def _bild_no_rollback(context: MethodContext) -> Method:
    return bild_method(context, rollback_threshold=math.inf, repeat_ngram=0, policy="fixed")


@register_method("bild-no-fallback", needs_small=True, description="ablation of Algorithm 1: N small steps, then one large pass")
def _bild_no_fallback(context: MethodContext) -> Method:
    return bild_method(context, fallback_threshold=0.0, policy="fixed")


@register_method("bild-early-exit", needs_small=False, description="BiLD drafting with the large model's own first layers (--small early-exit:K, else smollm2-early-exit)")
def _bild_early_exit(context: MethodContext) -> Method:
    from bild.drafters.early_exit import exit_for  # on the context's already loaded large model

    engine = BiLD(ModelPair(large=context.pair.large, small=exit_for(context.pair.large, context.pair.small)))
    return _engine_method(context, context.config, lambda request, cfg: engine.generate_ids(request.prompt_ids, cfg))


@register_method("small", needs_small=True, description="small model alone, greedy (quality floor)")
def _small(context: MethodContext) -> Method:
    return _engine_method(context, context.config, lambda request, cfg: context.engine.small_only(request.prompt, cfg, chat=request.chat))


@register_method("vanilla-loop", needs_small=False, description="large model alone through bild's own cache loop")
def _vanilla_loop(context: MethodContext) -> Method:
    return _engine_method(context, context.config, lambda request, cfg: context.engine.vanilla(request.prompt, cfg, chat=request.chat))


def cut_at_eos(token_ids: list[int], eos_ids: tuple[int, ...] | frozenset[int]) -> list[int]:
    """The tokens before the first end-of-sequence token."""
    for index, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:index]
    return list(token_ids)
