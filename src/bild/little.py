"""The default little models for SmolLM2-135M-Instruct: six of the large model's layers with trained low-rank deltas.

A little model is an ordinary ``LlamaForCausalLM`` (so it also works as ``assistant_model`` in transformers' assisted
generation) with ``num_hidden_layers`` layers of the large model's shape, initialised from some of the large model's
own layers, on top of the large model's frozen embedding matrix and tied head (the same tensor object, not a copy).
Only what is not shared is stored, in fp16: the layers (or, with ``delta_rank`` > 0, only their low-rank deltas) and
the norms (``src/bild/weights/<variant>.safetensors`` plus ``<variant>.json``, which names the layers). The shipped
recipe is ``bild.little_train.LittleConfig``. Importing this module registers the names ``smollm2-little``
(aligned: trained on the large model's greedy outputs) and ``smollm2-little-unaligned`` (trained on the real text's
own next tokens).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from bild.quantize import quantize_decoder_layers, quantize_output_layer
from bild.models import DEFAULT_LARGE, LoadedModel, ModelLoadError, load_model, register_model
from bild.textsource import Docstring, iter_docstrings, iter_package_docstrings, paragraphs

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
VARIANTS = {"smollm2-little": "aligned", "smollm2-little-unaligned": "unaligned"}
DRAFT_VOCAB_KEY = "draft_vocab"  # int32 token ids in a little model's safetensors (bild.quantize.DraftHead)


# ---------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptExample:
    """An instruction-style prompt built from one stdlib docstring and a reference answer taken from the real text."""

    prompt: str
    reference: str  # real text (the docstring's own words) used as the unaligned model's target
    source: str  # dotted name of the documented object


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text, flags=re.S)
    return (match.group(1) if match else text).strip()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _example(doc: Docstring, rng: random.Random, max_chars: int) -> PromptExample | None:
    """One prompt of a randomly chosen kind for a docstring; None when the docstring has no prose paragraph."""
    prose = paragraphs(doc.text, min_chars=60)
    if not prose:
        return None
    paragraph = _clip(rng.choice(prose), max_chars)
    body = _clip("\n\n".join(prose[:3]), max_chars)
    name = doc.dotted_name
    kind = rng.randrange(7)
    if kind == 0:
        return PromptExample(f"Summarize in one sentence:\n\n{paragraph}", _first_sentence(paragraph), name)
    if kind == 1:
        return PromptExample(f"Explain what `{name}` does, based on its documentation:\n\n{body}", prose[0], name)
    if kind == 2:
        return PromptExample(f"Rewrite this more simply:\n\n{paragraph}", paragraph, name)
    if kind == 3:
        return PromptExample(f"What is `{name}` used for in Python? Answer briefly.", _first_sentence(prose[0]), name)
    if kind == 4:
        return PromptExample(f"Explain this to a beginner:\n\n{paragraph}", paragraph, name)
    if kind == 5:
        return PromptExample(f"List the key points of this text:\n\n{body}", body, name)
    return PromptExample(f"Read this documentation and give a short answer: what does it describe?\n\n{paragraph}",
                         _first_sentence(paragraph), name)


def build_prompts(count: int, seed: int = 0, max_chars: int = 700, max_rounds: int = 3) -> list[PromptExample]:
    """``count`` prompts from the docstrings of the training stdlib modules (never the eval-reserved ones).

    The first round gives one prompt per docstring (3,333 with Python 3.13's stdlib); when more are asked for, later
    rounds ask about the same docstrings again with a freshly drawn prompt kind. Prefix-stable: the first n prompts
    are the same for every ``count`` >= n, so a calibration file can grow by resuming.
    """
    examples = _prompts_about(list(iter_docstrings(split="train", min_chars=80)), count, seed, max_chars, max_rounds)
    logger.info("built %d prompts from training stdlib docstrings", len(examples))
    return examples


def build_package_prompts(package: str, count: int, seed: int = 0, max_chars: int = 700) -> list[PromptExample]:
    """``count`` prompts (the same seven kinds) about the docstrings of an installed package, one per docstring.

    More text that is new to the little model, beside the stdlib's: its prompts about new modules are what BiLD
    drafts for. Prefix-stable like :func:`build_prompts`.
    """
    examples = _prompts_about(list(iter_package_docstrings(package, min_chars=80)), count, seed, max_chars, 1)
    logger.info("built %d prompts from %s docstrings", len(examples), package)
    return examples


def _prompts_about(docs: list[Docstring], count: int, seed: int, max_chars: int, max_rounds: int
                   ) -> list[PromptExample]:
    """Up to ``count`` prompts about the docs in a seeded order, round after round, skipping docs without prose."""
    rng = random.Random(seed)
    rng.shuffle(docs)
    examples: list[PromptExample] = []
    for _ in range(max_rounds):
        for doc in docs:
            if len(examples) == count:
                break
            example = _example(doc, rng, max_chars)
            if example is not None:
                examples.append(example)
    return examples


@functools.lru_cache(maxsize=None)
def prompts_per_round() -> int:
    """How many prompts one round of :func:`build_prompts` gives: prompt ``i`` is about the same docstring as ``i``
    plus any multiple of this (3,333 with Python 3.13's stdlib; the seed only reorders, so any seed counts)."""
    return len(build_prompts(10**9, max_rounds=1))


# ---------------------------------------------------------------------------------------------------- the model


class LowRankDelta(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank delta: ``y = x W^T + (x D^T) U^T`` (LoRA, Hu et al. 2021).

    Written here rather than taken from peft: all the little models need is to train the delta and then merge it into
    a plain ``nn.Linear`` at load time, so the result stays an ordinary LlamaForCausalLM (and an assistant_model).
    """

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))  # (rank, in)
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank))  # (out, rank): the delta starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T) @ self.up.T

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += self.up @ self.down
        return self.base


def _linear_slots(model: LlamaForCausalLM):
    """(parent module, attribute name) of every linear layer inside the decoder layers (attention and MLP)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, (torch.nn.Linear, LowRankDelta)):
                    yield parent, name


def merge_low_rank(model: LoadedModel) -> LoadedModel:
    """Fold every low-rank delta into its linear layer (in place): an ordinary LlamaForCausalLM again."""
    for parent, name in _linear_slots(model.model):
        child = getattr(parent, name)
        if isinstance(child, LowRankDelta):
            setattr(parent, name, child.merged().requires_grad_(True))
    return model


def build_little(large: LoadedModel, init_layers: tuple[int, ...], delta_rank: int = 0) -> LoadedModel:
    """A LlamaForCausalLM with ``len(init_layers)`` decoder layers copied from the large model's ``init_layers``.

    The embedding module and the tied head are the large model's own objects (shared, not copied); the final norm is
    copied from the large model and trainable. ``delta_rank`` > 0 freezes the copied linear layers and gives each a
    trainable low-rank delta of that rank (:class:`LowRankDelta`): only the deltas and the norms are then trained
    and stored, so more layers fit the same storage budget.
    """
    source = large.model
    if not isinstance(source, LlamaForCausalLM):
        raise ModelLoadError(f"little models are built on a Llama large model, got {type(source).__name__}")
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = len(init_layers)
    config.layer_types = None if not hasattr(config, "layer_types") else ["full_attention"] * len(init_layers)
    with torch.device("meta"):  # no memory for an embedding matrix we replace right away
        model = LlamaForCausalLM(config)
    model.model.embed_tokens = source.model.embed_tokens
    model.lm_head = source.lm_head
    model.model.layers = torch.nn.ModuleList(copy.deepcopy(source.model.layers[i]) for i in init_layers)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index  # each layer writes its own KV-cache slot
    model.model.norm = copy.deepcopy(source.model.norm)
    model.model.rotary_emb = copy.deepcopy(source.model.rotary_emb)
    model.generation_config = copy.deepcopy(source.generation_config)
    if delta_rank > 0:
        for parent, name in _linear_slots(model):
            setattr(parent, name, LowRankDelta(getattr(parent, name), delta_rank))
    model.eval()
    return LoadedModel(f"little{list(init_layers)}", model, large.tokenizer, False, large.is_chat)


def own_state(model: LoadedModel) -> dict[str, torch.Tensor]:
    """The little model's weights that are not the large model's shared embedding/head, in fp16."""
    return {
        name: tensor.detach().to(torch.float16).contiguous()
        for name, tensor in model.model.state_dict().items()
        if not name.startswith(("model.embed_tokens", "lm_head")) and not _is_frozen_copy(name)
    }


def _is_frozen_copy(name: str) -> bool:
    """A linear weight under a low-rank delta: the large model's own, rebuilt at load time, never stored."""
    return ".base." in name


def save_little(model: LoadedModel, variant: str, init_layers: tuple[int, ...], report: dict, out_dir: Path,
                delta_rank: int = 0, draft_vocab: torch.Tensor | None = None) -> Path:
    """``<variant>.safetensors`` (fp16, only the little model's own weights; the draft vocabulary's token ids when
    given, see :class:`bild.quantize.DraftHead`) and ``<variant>.json`` (how to rebuild)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = own_state(model)
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB_KEY] = draft_vocab.to(torch.int32).contiguous()
    save_file(tensors, out_dir / f"{variant}.safetensors", metadata={"format": "pt"})
    meta = {"variant": variant, "large": DEFAULT_LARGE, "init_layers": list(init_layers), "delta_rank": delta_rank,
            "report": report}
    (out_dir / f"{variant}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir / f"{variant}.safetensors"


def load_little(
    variant: str, large: LoadedModel | None = None, weights_dir: Path = WEIGHTS_DIR, int8: bool = True,
    int8_layers: bool = False,
) -> LoadedModel:
    """Rebuild a shipped little model on top of the (given or freshly loaded) default large model.

    int8 (on a CPU): a per-channel int8 copy of the shared head restricted to the draft vocabulary stored with the
    weights (see bild.quantize), which cuts the decode step from about 30% of the large model's to about 20%; the
    large model keeps its fp32 original. int8_layers: int8 copies of the decoder layers too (cheaper still, but 1.5
    points less agreement and slower BiLD at the paper's thresholds: benchmarks/drafting-forms-ab.log). int8=False:
    the fp32 model as trained.
    """
    weights, meta_path = weights_dir / f"{variant}.safetensors", weights_dir / f"{variant}.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ModelLoadError(f"little model weights {weights} are missing; build them with `make little`")
    large = large or load_model(DEFAULT_LARGE)
    if large.model.config.hidden_size != 576 or large.model.config.vocab_size != 49152:
        raise ModelLoadError(f"the little models are built for {DEFAULT_LARGE}; large model {large.name!r} differs")
    meta = json.loads(meta_path.read_text())
    little = build_little(large, tuple(meta["init_layers"]), meta.get("delta_rank", 0))
    stored = load_file(weights)
    draft_vocab = stored.pop(DRAFT_VOCAB_KEY, None)  # (size,) int32 token ids, absent in weights saved without one
    state = {name: tensor.float() for name, tensor in stored.items()}
    missing, unexpected = little.model.load_state_dict(state, strict=False)
    if unexpected or any(not (name.startswith(("model.embed_tokens", "lm_head")) or _is_frozen_copy(name))
                         for name in missing):
        raise ModelLoadError(f"{weights} does not match the little architecture (missing {missing}, extra {unexpected})")
    merge_low_rank(little)
    if int8 and little.model.device.type == "cpu":
        if int8_layers:
            quantize_decoder_layers(little.model)
        quantize_output_layer(little.model, draft_vocab)
    name = next(name for name, v in VARIANTS.items() if v == variant)
    return LoadedModel(name, little.model, large.tokenizer, False, large.is_chat)


# ---------------------------------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class DecodeCost:
    """Per-token decode step time of both models, measured interleaved in one run (min over rounds)."""

    large_ms: float
    small_ms: float
    steps: int  # single-token decode steps per round, with a KV cache
    rounds: int

    @property
    def ratio(self) -> float:
        return self.small_ms / self.large_ms


@torch.inference_mode()
def _decode_step_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Mean time of one greedy single-token step after a prefill of ``prompt`` (1, prompt_len)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # token: (1, 1)
    started = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - started) * 1000 / steps


def measure_decode_cost(large: LoadedModel, small: LoadedModel, steps: int = 64, rounds: int = 5,
                        prompt_len: int = 64, seed: int = 0) -> DecodeCost:
    """Side-by-side per-token cost: rounds alternate large and small, warm-up excluded, min over rounds."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, large.model.config.vocab_size, (1, prompt_len), generator=generator)
    _decode_step_ms(large.model, prompt, 4), _decode_step_ms(small.model, prompt, 4)  # warm-up
    large_times, small_times = [], []
    for _ in range(rounds):
        large_times.append(_decode_step_ms(large.model, prompt, steps))
        small_times.append(_decode_step_ms(small.model, prompt, steps))
    return DecodeCost(min(large_times), min(small_times), steps, rounds)


def _register() -> None:
    for name, variant in VARIANTS.items():
        register_model(name, lambda large, variant=variant: load_little(variant, large))


_register()  # the one import-time side effect: make the names known to bild.models.load_model
