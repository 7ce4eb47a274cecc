"""Early-exit BiLD (the paper's fourth research question): the small model is the large model's own first layers.

The drafter is layers [0, k) of the large model, then an exit: an optional trainable decoder block of the large
model's shape (initialised from one of its layers), the large model's final norm and its shared head. The large
model's weights are never changed, so alpha_RB = 0 still gives exactly its greedy output.

No work is done twice. A :class:`SharedStack` holds ONE key/value cache for all large-model layers plus the layer-k
hidden states of every position the lower layers have processed, and two decoders that implement
:class:`bild.cache.Decoder` read from it:

- the draft decoder runs layers [0, k) on positions nobody has processed yet, then the exit over its new positions;
- the full decoder runs layers [0, k) only on positions the draft has not processed (e.g. the large model's own
  appended token), then layers [k, L) over the stored layer-k hidden states.

Invariants (tested): ``upper_len <= lower_len``, ``exit_len <= lower_len``, ``hidden`` holds ``lower_len`` positions,
layers [0, k) of the cache hold ``lower_len`` tokens, layers [k, L) hold ``upper_len``, the exit block's own cache
holds ``exit_len``. A rollback crops every part once (either decoder's ``crop`` does it; the second is a no-op).

Names: ``smollm2-early-exit`` is the shipped trained exit for SmolLM2-135M-Instruct (``src/bild/weights/``), and
``early-exit:K`` is the untrained exit (final norm + head, no block) after layer K of whichever large model is
loaded, e.g. ``bild generate --small early-exit:4``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from bild.cache import Decoder
from bild.devices import Placement, input_device
from bild.drafters import WEIGHTS_DIR
from bild.drafters.quantize import int8_copy, int8_drafting_applies
from bild.models import DEFAULT_LARGE, LoadedModel, ModelLoadError, check_follows_large, load_model

logger = logging.getLogger(__name__)

SHIPPED_NAME = "smollm2-early-exit"  # registered name of the shipped exit
SHIPPED_FILE = "early-exit"  # src/bild/weights/early-exit.{safetensors,json}
FAMILY = "early-exit"  # "early-exit:K": the untrained exit after layer K of any supported large model


# ---------------------------------------------------------------------------------------------------- the model


class EarlyExitModel(nn.Module):
    """Layers [0, k) of a Llama-style causal LM, an optional exit block, the final norm and the shared head.

    The large model is held by reference, not registered as a submodule: ``parameters()`` and ``state_dict()`` are
    the exit block's own (the only trainable and stored weights). ``forward`` is the teacher-forced path used for
    training and agreement (same keyword arguments as ``LlamaForCausalLM.forward``); generation goes through
    :class:`SharedStack`.
    """

    def __init__(self, large: nn.Module, exit_layer: int, exit_block: nn.Module | None = None) -> None:
        super().__init__()
        check_supported(large)
        layers = len(large.model.layers)
        if not 1 <= exit_layer < layers:
            raise ValueError(f"early-exit layer must be in 1..{layers - 1} for this {layers}-layer model, got {exit_layer}")
        self.__dict__["large"] = large  # by reference: not a submodule
        self.exit_layer = exit_layer
        self.exit_block = exit_block
        self.draft_head: nn.Module | None = None  # an int8 copy of the head for drafting (use_int8_head); None: shared
        self.config = large.config
        self.generation_config = large.generation_config

    @property
    def device(self) -> torch.device:
        """Where input ids go: the large model's input embedding's device (its first, when device-mapped)."""
        return input_device(self.large)

    def use_int8_head(self) -> None:
        """Draft through a per-channel int8 copy of the head (bild.drafters.quantize): the head dominates a draft step on a
        CPU. Only the drafter's proposals change; the large model keeps its fp32 head, so exactness is unaffected.
        Teacher-forced ``forward`` uses it too in eval mode (agreement), and the fp32 head in train mode."""
        self.draft_head = int8_copy(self.large.lm_head)

    def get_input_embeddings(self) -> nn.Module:
        return self.large.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.large.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                **unused) -> CausalLMOutputWithPast:
        """Teacher-forced logits, (batch, kept positions, vocab); the large model's layers run without gradients."""
        base = self.large.model
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, seq)
        with torch.no_grad():
            hidden = base.embed_tokens(input_ids)  # (batch, seq, hidden)
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      cache=None, position_ids=position_ids)
            rope = base.rotary_emb(hidden, position_ids=position_ids)
            for layer in base.layers[: self.exit_layer]:
                hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
        if self.exit_block is not None:
            hidden = self.exit_block(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        head = self.draft_head if self.draft_head is not None and not self.training else self.large.lm_head
        logits = head(base.norm(hidden[:, keep]))  # (batch, kept, vocab)
        return CausalLMOutputWithPast(logits=logits)


def check_supported(large: nn.Module) -> None:
    """Llama-style decoder-only models with full attention in every layer (Llama, SmolLM2, Qwen2/Mistral without
    sliding windows); anything else gets a clear error."""
    base = getattr(large, "model", None)
    needed = ("layers", "norm", "rotary_emb", "embed_tokens")
    if getattr(large.config, "is_encoder_decoder", False) or base is None or not all(hasattr(base, n) for n in needed) \
            or not hasattr(large, "lm_head"):
        raise ModelLoadError(f"early exit needs a Llama-style decoder-only model (model.layers, model.norm, lm_head); "
                             f"got {type(large).__name__}")
    layer_types = getattr(large.config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ModelLoadError("early exit supports full-attention layers only; this model has sliding-window layers")


def make_exit_block(large: nn.Module, init_layer: int) -> nn.Module:
    """A trainable copy of the large model's layer ``init_layer``; it attends through its own cache (slot 0)."""
    block = copy.deepcopy(large.model.layers[init_layer])
    block.self_attn.layer_idx = 0
    for parameter in block.parameters():
        parameter.requires_grad_(True)
    return block


# ---------------------------------------------------------------------------------------------------- the shared cache


class SharedStack:
    """One cache for the large model and its early exit, and the layer-k hidden states between them (see module doc)."""

    def __init__(self, model: EarlyExitModel) -> None:
        self.model = model
        self.base = model.large.model
        self.k = model.exit_layer
        self.cache = DynamicCache(config=model.config)  # one slot per large-model layer
        self.exit_cache = DynamicCache() if model.exit_block is not None else None
        self.hidden: torch.Tensor | None = None  # (1, lower_len, hidden) outputs of layer k-1
        self.lower_len = self.upper_len = self.exit_len = 0
        self.lower_tokens = self.upper_tokens = 0  # positions pushed through layers [0, k) / [k, L), ever

    def _rope(self, like: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position_ids = torch.arange(start, stop, device=like.device)[None]  # (1, new)
        return position_ids, *self.base.rotary_emb(like, position_ids=position_ids)

    def _layers(self, layers, hidden: torch.Tensor, start: int, cache: DynamicCache, mask_layer: int) -> torch.Tensor:
        """Run ``layers`` over positions [start, start + new) with their cache, the way LlamaModel.forward does."""
        position_ids, cos, sin = self._rope(hidden, start, start + hidden.shape[1])
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                                  position_ids=position_ids, layer_idx=mask_layer)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin),
                           cache=cache, use_cache=True)
        return hidden

    def run_lower(self, tokens: list[int], length: int) -> None:
        """Layers [0, k) over the positions [lower_len, length) nobody has processed yet."""
        if length <= self.lower_len:
            return
        input_ids = torch.tensor([tokens[self.lower_len : length]], device=self.model.device)  # (1, new)
        hidden = self._layers(self.base.layers[: self.k], self.base.embed_tokens(input_ids), self.lower_len,
                              self.cache, mask_layer=0)  # (1, new, hidden)
        self.hidden = hidden if self.hidden is None else torch.cat([self.hidden, hidden], dim=1)
        self.lower_tokens += length - self.lower_len
        self.lower_len = length

    def run_upper(self, length: int, keep: int) -> torch.Tensor:
        """Layers [k, L) over stored positions [upper_len, length); norm and head on the last ``keep``: (keep, vocab)."""
        hidden = self._layers(self.base.layers[self.k :], self.hidden[:, self.upper_len : length], self.upper_len,
                              self.cache, mask_layer=self.k)
        self.upper_tokens += length - self.upper_len
        self.upper_len = length
        return self._head(hidden, keep, self.model.large.lm_head)

    def run_exit(self, length: int, keep: int) -> torch.Tensor:
        """The exit block (if any) over stored positions [exit_len, length); norm and head on the last ``keep``."""
        hidden = self.hidden[:, self.exit_len : length]  # (1, new, hidden)
        if self.exit_cache is not None:
            hidden = self._layers([self.model.exit_block], hidden, self.exit_len, self.exit_cache, mask_layer=0)
        self.exit_len = length
        draft_head = self.model.draft_head
        return self._head(hidden, keep, self.model.large.lm_head if draft_head is None else draft_head)

    def _head(self, hidden: torch.Tensor, keep: int, head: nn.Module) -> torch.Tensor:
        """The final norm and output layer on the last ``keep`` positions only (the costly part): (keep, vocab)."""
        return head(self.base.norm(hidden[0, -keep:]))

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on, in every part, once."""
        for index, layer in enumerate(self.cache.layers):
            held = self.lower_len if index < self.k else self.upper_len
            if held > length:
                layer.crop(-(held - length))
        if self.exit_cache is not None and self.exit_len > length:
            self.exit_cache.layers[0].crop(-(self.exit_len - length))
        if self.hidden is not None:
            self.hidden = self.hidden[:, :length]
        self.lower_len, self.upper_len, self.exit_len = (min(n, length) for n in
                                                         (self.lower_len, self.upper_len, self.exit_len))


class _StackDecoder:
    """:class:`bild.cache.Decoder` over a SharedStack; subclasses say which side they are."""

    def __init__(self, stack: SharedStack) -> None:
        self.stack = stack
        self.time_s = 0.0
        self.calls = 0

    @torch.inference_mode()
    def forward(self, tokens: list[int], keep: int | None = None) -> torch.Tensor:
        """Feed tokens[seen:] and return next-token logits for the last ``keep`` of them (all when None).

        Returns (min(keep, new), vocab), like CachedDecoder.forward.
        """
        new = len(tokens) - self.seen
        if new <= 0:
            raise ValueError("no new tokens to feed: the cache already holds the whole sequence")
        start = time.perf_counter()
        self.stack.run_lower(tokens, len(tokens))
        logits = self._top(len(tokens), new if keep is None else min(keep, new)).float()
        self.time_s += time.perf_counter() - start
        self.calls += 1
        return logits

    def crop(self, length: int) -> None:
        self.stack.crop(length)

    def cache_length(self) -> int:
        return self.seen


class DraftDecoder(_StackDecoder):
    @property
    def seen(self) -> int:
        return self.stack.exit_len

    def _top(self, length: int, keep: int) -> torch.Tensor:
        return self.stack.run_exit(length, keep)


class FullDecoder(_StackDecoder):
    @property
    def seen(self) -> int:
        return self.stack.upper_len

    def _top(self, length: int, keep: int) -> torch.Tensor:
        return self.stack.run_upper(length, keep)


def shared_decoders(model: EarlyExitModel) -> tuple[Decoder, Decoder]:
    stack = SharedStack(model)
    return DraftDecoder(stack), FullDecoder(stack)


# ---------------------------------------------------------------------------------------------------- loading


def early_exit_model(large: LoadedModel, model: EarlyExitModel, name: str) -> LoadedModel:
    """A LoadedModel for the drafter, whose decoders share the large model's cache (``make_decoders``)."""

    def make_decoders(large_model: LoadedModel, encoder_ids: torch.Tensor | None) -> tuple[Decoder, Decoder]:
        if large_model.model is not model.large:
            raise ValueError(f"{name!r} is an early exit of {large.name!r}; it cannot draft for {large_model.name!r}")
        return shared_decoders(model)

    return LoadedModel(name, model, large.tokenizer, False, large.is_chat, make_decoders=make_decoders)


def _large_for(drafter: str, large: LoadedModel | None, where: Placement | None) -> LoadedModel:
    """The large model an exit is built on: the given one (``where``, if any, must agree with it) or the default."""
    if large is None:
        return load_model(DEFAULT_LARGE, where=where)
    check_follows_large(drafter, large, where)
    return large


def untrained_exit(large: LoadedModel | None, layer: str, where: Placement | None = None) -> LoadedModel:
    """``early-exit:K``: layers [0, K) of the large model, its final norm and head, nothing trained; on the large
    model's device(s) and in its dtype, drafting through an int8 head for float32 on a CPU."""
    large = _large_for(f"{FAMILY}:{layer}", large, where)
    try:
        exit_layer = int(layer)
    except ValueError:
        raise ModelLoadError(f"early-exit layer must be an integer, as in 'early-exit:4'; got {layer!r}") from None
    try:
        model = EarlyExitModel(large.model, exit_layer)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    if int8_drafting_applies(large.model):
        model.use_int8_head()
    return early_exit_model(large, model, f"{FAMILY}:{exit_layer}")


@dataclass(frozen=True)
class ExitSpec:
    exit_layer: int  # the drafter runs the large model's layers [0, exit_layer)
    init_layer: int  # the large-model layer the exit block was initialised from


def save_exit(model: EarlyExitModel, spec: ExitSpec, report: dict, out_dir: Path, stem: str = SHIPPED_FILE) -> Path:
    """``<stem>.safetensors`` (the exit block only, fp16) and ``<stem>.json`` (how to rebuild, and the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.exit_block.state_dict().items()}
    path = out_dir / f"{stem}.safetensors"
    save_file(state, path, metadata={"format": "pt"})
    meta = {"large": DEFAULT_LARGE, "exit_layer": spec.exit_layer, "init_layer": spec.init_layer, "report": report}
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_exit(large: LoadedModel | None = None, where: Placement | None = None, weights_dir: Path = WEIGHTS_DIR,
              stem: str = SHIPPED_FILE, int8_head: bool = True) -> LoadedModel:
    """The shipped trained exit of the default large model, rebuilt on the (given or freshly loaded, at ``where``)
    large model, on its device and in its dtype; for float32 on a CPU it drafts through an int8 copy of the head
    (``int8_head``), like the little models."""
    weights, meta_path = weights_dir / f"{stem}.safetensors", weights_dir / f"{stem}.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ModelLoadError(f"early-exit weights {weights} are missing; train them with `bild early-exit train`")
    large = _large_for(SHIPPED_NAME, large, where)
    config = large.model.config
    if config.hidden_size != 576 or config.vocab_size != 49152 or config.num_hidden_layers != 30:
        raise ModelLoadError(f"{SHIPPED_NAME} is trained for {DEFAULT_LARGE}; large model {large.name!r} differs "
                             f"(use early-exit:K for an untrained exit of any model)")
    meta = json.loads(meta_path.read_text())
    block = make_exit_block(large.model, meta["init_layer"])  # on that layer's device, in its dtype
    block.load_state_dict(load_file(weights))  # cast to the block's dtype
    block.eval()
    model = EarlyExitModel(large.model, meta["exit_layer"], block)
    if int8_head and int8_drafting_applies(large.model):
        model.use_int8_head()
    return early_exit_model(large, model, SHIPPED_NAME)


def exit_for(large: LoadedModel, small: LoadedModel | None = None) -> LoadedModel:
    """The early exit to draft for ``large``: ``small`` when it already is one (``--small early-exit:K``), else the
    shipped trained exit for the default large model, else the untrained exit after layer L // 4 (logged)."""
    if small is not None and small.make_decoders is not None:
        return small
    if large.name == DEFAULT_LARGE:
        return load_exit(large)
    layer = max(1, large.model.config.num_hidden_layers // 4)
    logger.warning("no trained early exit for %r: using the untrained %s:%d", large.name, FAMILY, layer)
    return untrained_exit(large, str(layer))
