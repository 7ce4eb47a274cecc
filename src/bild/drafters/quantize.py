"""int8 drafting for small (draft) models on a CPU: decoder layers, the output layer, and a draft vocabulary.

On a CPU a small model's decode step is dominated by reading its weights: for SmolLM2's 49,152 x 576 head that is
113 MB of fp32 per token, several times the cost of two decoder layers. A per-channel int8 copy of the head
(PyTorch's dynamic quantization) reads a quarter of that and, measured on this project's machine, cut a 2-layer
draft model's step from about 23% to about 9% of the large model's step with the same argmax on the text we checked.
A draft vocabulary (the few thousand tokens the large model actually writes, counted on training data) shrinks the
head further, and int8 decoder layers quarter the rest. A draft model only proposes tokens; the large model, left
in full precision, still decides, so alpha_RB = 0 stays exactly the large model's greedy output.

Only for float32 models on a CPU (:func:`int8_drafting_applies`): PyTorch's dynamic int8 layers are CPU kernels that
take float32 inputs, so a drafter on a GPU or in bfloat16/float16 drafts in the dtype it was loaded in.
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import nullcontext
from typing import ContextManager, Iterable

import torch
from transformers import PreTrainedModel

from bild.cpu import SmallBatchLinear
from bild.devices import model_devices, model_dtype


def int8_drafting_applies(model: torch.nn.Module) -> bool:
    """True for a float32 model all on a CPU: the only case the int8 copies here can run in."""
    return {device.type for device in model_devices(model)} == {"cpu"} and model_dtype(model) == torch.float32


def quantize_output_layer(model: PreTrainedModel, draft_vocab: torch.Tensor | None = None) -> PreTrainedModel:
    """Replace the model's output layer by a per-channel dynamic-int8 copy, in place; returns the model.

    draft_vocab: token ids (1-D) the copy keeps (a :class:`DraftHead`); None keeps every row. The input embedding is
    left alone (it may be shared with a large model), so the head is untied from it first. Only for inference on a
    CPU; train or save the model before calling this.
    """
    head = model.get_output_embeddings()
    model.set_output_embeddings(int8_copy(head) if draft_vocab is None else DraftHead(head, draft_vocab))
    model.config.tie_word_embeddings = False  # keep transformers from tying the quantized head back
    return model


def quantize_decoder_layers(model: PreTrainedModel, keep: Iterable[int] = ()) -> PreTrainedModel:
    """Per-channel dynamic-int8 copies of every linear layer inside the decoder layers, in place; returns the model.

    keep: indices of decoder layers left in fp32. For a little model whose layers are its own (not shared with the
    large model). Inference on a CPU only.
    """
    layers = model.get_decoder().layers
    kept = set(keep)
    if not kept <= set(range(len(layers))):
        raise ValueError(f"layers to keep {sorted(kept)} are not all among the model's {len(layers)} decoder layers")
    for index in set(range(len(layers))) - kept:
        layers[index] = _dynamic_int8(layers[index])
    return model


class DraftHead(torch.nn.Module):
    """An int8 output layer over a draft vocabulary: the kept tokens' logits, -inf for every other token.

    The output keeps the full vocabulary width, so the model stays a drop-in causal LM (and an ``assistant_model``);
    its softmax is the softmax over the kept tokens, and tokens outside them are never drafted.
    """

    def __init__(self, head: torch.nn.Linear, draft_vocab: torch.Tensor):
        super().__init__()
        if draft_vocab.dim() != 1 or not len(draft_vocab):
            raise ValueError("a draft vocabulary is a non-empty 1-D tensor of token ids")
        if int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= head.out_features:
            raise ValueError(f"draft vocabulary ids must lie in [0, {head.out_features})")
        draft_vocab = draft_vocab.long()
        self.rows = int8_copy(head, draft_vocab)
        self.register_buffer("draft_vocab", draft_vocab.clone(), persistent=False)
        self.in_features, self.out_features = head.in_features, head.out_features
        # the full output layer, not copied (plain tensors: not the module's parameters), for a request's own tokens
        self.full_weight = head.weight.detach()
        self.full_bias = None if head.bias is None else head.bias.detach()
        self.kept = frozenset(draft_vocab.tolist())
        self.extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # ids, rows, bias in force

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., in_features) -> logits (..., out_features), -inf outside the draft vocabulary (and the
        request's tokens, inside :meth:`drafting_also`)."""
        logits = hidden.new_full((*hidden.shape[:-1], self.out_features), float("-inf"))
        logits[..., self.draft_vocab] = self.rows(hidden)
        if self.extra is not None:
            ids, rows, bias = self.extra
            logits[..., ids] = torch.nn.functional.linear(hidden, rows, bias)
        return logits

    def drafting_also(self, token_ids: tuple[int, ...]) -> RequestTokens:
        """A context in which the head drafts ``token_ids`` too (those outside the draft vocabulary get their logits
        from the full output layer, in its own precision): a request's prompt tokens, which answers copy (names,
        rare words) and which no fixed vocabulary can hold. Their rows are gathered here, once; the context can be
        entered again and again (a loop enters it around each step of the request)."""
        ids = torch.tensor(sorted(set(token_ids) - self.kept), dtype=torch.long)
        if not len(ids):
            return RequestTokens(self, None)
        bias = None if self.full_bias is None else self.full_bias[ids]
        return RequestTokens(self, (ids, self.full_weight[ids], bias))  # (k,), (k, in_features), (k,)


class RequestTokens:
    """:meth:`DraftHead.drafting_also`'s reusable context: the rows in force inside it, none outside."""

    def __init__(self, head: DraftHead, extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None):
        self.head, self.extra = head, extra

    def __enter__(self) -> None:
        self.head.extra = self.extra

    def __exit__(self, *exc_info) -> None:
        self.head.extra = None


def drafting_also(model: torch.nn.Module, token_ids: tuple[int, ...]) -> ContextManager:
    """:meth:`DraftHead.drafting_also` for a model whose output layer is a :class:`DraftHead` (a no-op for any other
    model: it drafts from its whole vocabulary already). Reusable: make it once per request."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head.drafting_also(token_ids) if isinstance(head, DraftHead) else nullcontext()


def draft_vocabulary(targets: Iterable[list[int]], size: int, context: Iterable[list[int]] = (),
                     always: Iterable[int] = ()) -> torch.Tensor:
    """Up to ``size`` token ids for a :class:`DraftHead`, plus ``always`` (e.g. end-of-sequence); sorted, 1-D.

    The most frequent tokens of ``targets`` (what the model should write) first, then the most frequent tokens of
    ``context`` (e.g. the prompts, which outputs copy from) fill the remaining places; ties go to the lower id.
    Count both on training data only.
    """
    if size < 1:
        raise ValueError(f"draft vocabulary size must be positive, got {size}")
    chosen: list[int] = []
    for sequences in (targets, context):
        counts = Counter(token for sequence in sequences for token in sequence)
        seen = set(chosen)
        chosen += [token for token in sorted(counts, key=lambda t: (-counts[t], t)) if token not in seen]
    return torch.tensor(sorted(set(chosen[:size]) | set(always)), dtype=torch.long)


def int8_copy(head: torch.nn.Module, rows: torch.Tensor | None = None) -> torch.nn.Module:
    """A per-channel dynamic-int8 copy of a Linear output layer (only its ``rows``, a 1-D index, when given); the
    original (maybe a shared embedding) is untouched."""
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"cannot quantize an output layer of type {type(head).__name__}")
    weight = head.weight if rows is None else head.weight[rows]  # (out or len(rows), in)
    bias = None if head.bias is None else (head.bias if rows is None else head.bias[rows])
    plain = torch.nn.Linear(head.in_features, weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        plain.weight.copy_(weight)  # an untied copy: the shared embedding stays fp32
        if bias is not None:
            plain.bias.copy_(bias)
    return _dynamic_int8(torch.nn.Sequential(plain))[0]


def _dynamic_int8(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every nn.Linear replaced by PyTorch's per-channel dynamic-int8 linear layer."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it works as is
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            module, dict.fromkeys((torch.nn.Linear, SmallBatchLinear), torch.ao.quantization.per_channel_dynamic_qconfig),
            dtype=torch.qint8,
        )

