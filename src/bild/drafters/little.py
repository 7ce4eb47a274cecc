"""The default little models for SmolLM2-135M-Instruct: six of the large model's layers with trained low-rank deltas.

A little model is an ordinary ``LlamaForCausalLM`` (so it also works as ``assistant_model`` in transformers' assisted
generation) with ``num_hidden_layers`` layers of the large model's shape, initialised from some of the large model's
own layers, on top of the large model's frozen embedding matrix and tied head (the same tensor object, not a copy).
Only what is not shared is stored, in fp16: the layers (or, with ``delta_rank`` > 0, only their low-rank deltas) and
the norms (``src/bild/weights/<variant>.safetensors`` plus ``<variant>.json``, which names the layers). The shipped
recipe is ``bild.train.little.LittleConfig``. ``bild.models`` resolves the names ``smollm2-little`` (aligned: trained
on the large model's greedy outputs) and ``smollm2-little-unaligned`` (trained on the real text's own next tokens) to
:func:`load_aligned` and :func:`load_unaligned`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from bild.drafters import WEIGHTS_DIR
from bild.devices import Placement, input_device
from bild.drafters.quantize import int8_drafting_applies, quantize_decoder_layers, quantize_output_layer
from bild.models import DEFAULT_LARGE, LoadedModel, ModelLoadError, check_follows_large, load_model

logger = logging.getLogger(__name__)

VARIANTS = {"smollm2-little": "aligned", "smollm2-little-unaligned": "unaligned"}
DRAFT_VOCAB_KEY = "draft_vocab"  # int32 token ids in a little model's safetensors (bild.drafters.quantize.DraftHead)


# ---------------------------------------------------------------------------------------------------- the model


class LowRankDelta(torch.nn.Module):
    """A frozen linear layer plus a trainable low-rank delta: ``y = x W^T + (x D^T) U^T`` (LoRA, Hu et al. 2021).

    Written here rather than taken from peft: all the little models need is to train the delta and then merge it into
    a plain ``nn.Linear`` at load time, so the result stays an ordinary LlamaForCausalLM (and an assistant_model).
    """

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device  # float32 deltas beside the base weight, whatever its dtype
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, device=device)
                                       / math.sqrt(base.in_features))  # (rank, in)
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # (out, rank): starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T) @ self.up.T

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.up @ self.down).to(self.base.weight.dtype)  # (out, in)
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
    copied from the large model and trainable. The copies are the little model's own and live on the large model's
    first device (its input embedding's) in its dtype, also when a device map spreads the large model. ``delta_rank`` > 0 freezes the copied linear layers and gives each a
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
    device = input_device(source)
    model.model.layers = torch.nn.ModuleList(own_copy(source.model.layers[i], device) for i in init_layers)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index  # each layer writes its own KV-cache slot
    model.model.norm = own_copy(source.model.norm, device)
    model.model.rotary_emb = own_copy(source.model.rotary_emb, device)
    model.generation_config = copy.deepcopy(source.generation_config)
    if delta_rank > 0:
        for parent, name in _linear_slots(model):
            setattr(parent, name, LowRankDelta(getattr(parent, name), delta_rank))
    model.eval()
    return LoadedModel(f"little{list(init_layers)}", model, large.tokenizer, False, large.is_chat)


def own_copy(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of one of the large model's modules for the little model, on ``device``, without the device hooks
    accelerate puts on the modules of a device-mapped model (they would send its inputs to the original's device)."""
    copied = copy.deepcopy(module)
    if any(hasattr(child, "_hf_hook") for child in copied.modules()):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(copied, recurse=True)
    return copied.to(device)


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
    given, see :class:`bild.drafters.quantize.DraftHead`) and ``<variant>.json`` (how to rebuild)."""
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
    int8_layers: bool = False, where: Placement | None = None,
) -> LoadedModel:
    """Rebuild a shipped little model on top of the (given or freshly loaded, at ``where``) default large model, on
    its first device and in its dtype (``where``, when given, must agree: the weights are shared).

    int8 (float32 on a CPU only; other dtypes and devices draft in the dtype as loaded): a per-channel int8 copy of the shared head restricted to the draft vocabulary stored with the
    weights (see bild.drafters.quantize), which cuts the decode step from about 30% of the large model's to about 20%; the
    large model keeps its fp32 original. int8_layers: int8 copies of the decoder layers too (cheaper still, but 1.5
    points less agreement and slower BiLD at the paper's thresholds). int8=False:
    the fp32 model as trained.
    """
    weights, meta_path = weights_dir / f"{variant}.safetensors", weights_dir / f"{variant}.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ModelLoadError(f"little model weights {weights} are missing; build them with `make little`")
    name = next(name for name, v in VARIANTS.items() if v == variant)
    if large is None:
        large = load_model(DEFAULT_LARGE, where=where)
    else:
        check_follows_large(name, large, where)
    if large.model.config.hidden_size != 576 or large.model.config.vocab_size != 49152:
        raise ModelLoadError(f"the little models are built for {DEFAULT_LARGE}; large model {large.name!r} differs")
    meta = json.loads(meta_path.read_text())
    little = build_little(large, tuple(meta["init_layers"]), meta.get("delta_rank", 0))
    stored = load_file(weights)
    draft_vocab = stored.pop(DRAFT_VOCAB_KEY, None)  # (size,) int32 token ids, absent in weights saved without one
    missing, unexpected = little.model.load_state_dict(stored, strict=False)  # cast to the model's dtype
    if unexpected or any(not (name.startswith(("model.embed_tokens", "lm_head")) or _is_frozen_copy(name))
                         for name in missing):
        raise ModelLoadError(f"{weights} does not match the little architecture (missing {missing}, extra {unexpected})")
    merge_low_rank(little)
    if int8 and int8_drafting_applies(little.model):
        if int8_layers:
            quantize_decoder_layers(little.model)
        quantize_output_layer(little.model, draft_vocab)
    elif int8:
        logger.info("%s drafts in %s on %s: int8 drafting is for float32 on a CPU", name,
                    next(little.model.parameters()).dtype, input_device(little.model))
    return LoadedModel(name, little.model, large.tokenizer, False, large.is_chat)


def load_aligned(large: LoadedModel | None = None, where: Placement | None = None) -> LoadedModel:
    """``smollm2-little``: trained on the large model's greedy outputs (prediction alignment)."""
    return load_little("aligned", large, where=where)


def load_aligned_int8(large: LoadedModel | None = None, where: Placement | None = None) -> LoadedModel:
    """``smollm2-little-int8``: ``smollm2-little`` drafting through int8 copies of its decoder layers as well (on a
    CPU in float32; elsewhere the same as ``smollm2-little``): a decode step less than half as dear, about one point
    less agreement."""
    loaded = load_little("aligned", large, where=where, int8_layers=True)
    return dataclasses.replace(loaded, name="smollm2-little-int8")


def load_unaligned(large: LoadedModel | None = None, where: Placement | None = None) -> LoadedModel:
    """``smollm2-little-unaligned``: the same architecture trained on the real text's own next tokens."""
    return load_little("unaligned", large, where=where)
