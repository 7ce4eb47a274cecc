"""CPU kernel choices for the large model's non-autoregressive passes (a few tokens at once).

BiLD's verification passes feed the large model short blocks of 2-11 tokens. With PyTorch 2.13 on this project's x86
CPU (AVX-512, 2 threads) PyTorch's own kernels made such a block cost far more than a one-token step, and the step
itself slower than it needs to be:

- Linear layers: an fp32 ``nn.Linear`` costs about one weight read per row over 1-3 rows (a 2-token block 1.7x a
  one-token step, a 3-token block 2.0x) and takes a GEMM path from 4 rows on (1.4-1.8x). oneDNN with a weight
  packed once for it (:class:`SmallBatchLinear`; without oneDNN, ``W @ x^T``) reads the weight once for any row
  count: the output layer over one row (576 -> 49,152) takes 6 ms instead of 10, over three rows 5 ms instead of 35.
- Attention with grouped key/value heads (SmolLM2: 9 query heads, 3 KV heads): transformers' SDPA path copies every
  cached key and value ``n_rep`` times (``repeat_kv``) whenever a mask is needed, i.e. for every block of 2+ tokens
  after a prompt; a one-token step avoids the copy. ``enable_gqa=True`` gives the same numbers without the copy
  (:func:`cpu_sdpa_attention`).

Measured side by side in one run (SmolLM2-135M, 150 cached tokens, 2 threads; `benchmarks/kernels.py` measures it
again), a large pass over k tokens in units of a one-token step on PyTorch's own kernels: k = 1: 1.0 -> 0.73;
k = 2-3: 1.63-2.0 -> 0.69-0.79; k = 4-11: 1.32-1.75 -> 0.69-0.82. So the large model alone (one-token steps, as
transformers' ``generate`` takes them on the same model object) is faster too, and a check of 10 drafts costs about
what one step costs. The weights are the same tensors and the outputs equal up to float rounding (the attention
exactly). Long prompts (more than 64 rows) keep PyTorch's own path.

bfloat16 and float16 take other kernels, for exactness rather than speed. In 16 bits, PyTorch's CPU kernels give
a row of a multi-row product (oneDNN's matrix products, the SDPA attention kernels) a result that can differ in the
last bits from the same row computed alone, and 16 bits are coarse enough for that to flip near-tied argmaxes: a
verification pass over k tokens would not always agree with k one-token steps, so BiLD at alpha_RB = 0 would not
always be the large model alone. So for a 16-bit model on a CPU every linear layer and the attention run on
kernels whose rows do not depend on how many rows are computed together (:class:`RowInvariantLinear`, PyTorch's
own non-oneDNN products with float32 accumulation; :func:`row_invariant_attention`, transformers' "eager" formula),
for one-token steps and blocks alike. Then a verification pass gives each position exactly what a one-token step
gives, and lossless BiLD is exactly the large model alone in that dtype (tests/test_devices.py). The cost: a layer's packed copy is made
the first time it sees 1-64 rows and holds a second copy of its weight (for SmolLM2-135M about 540 MB in all);
``BiLD(pair, cpu_kernels=False)`` keeps the model as loaded.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

logger = logging.getLogger(__name__)

MIN_ROWS, MAX_ROWS = 1, 64  # the row counts that take the packed path
MM_MIN_ROWS = 4  # without oneDNN, ``W @ x^T`` from this many rows (measured faster only there)
PACK_ROWS = 8  # oneDNN's row-count hint for the packed layout (any row count works with it)
CPU_ATTENTION = "bild_cpu_sdpa"  # the attention implementation name registered by use_cpu_kernels

# module -> (weight version, weight storage address, oneDNN-packed copy); weak keys so models can be freed, and kept
# off the module itself so deepcopy / pickling / state_dict of the model never meet the opaque oneDNN tensor
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


@contextmanager
def without_onednn() -> Iterator[None]:
    """PyTorch's own CPU kernels instead of oneDNN's for the calls inside (the switch
    ``torch.backends.mkldnn.flags(enabled=False)`` makes, without its warnings about TF32 on other hardware)."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


class SmallBatchLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward over MIN_ROWS..MAX_ROWS rows takes a faster CPU kernel (same weights; the same
    result up to float rounding).

    With oneDNN (x86 builds of PyTorch), a packed copy of the weight made on first use and remade when the weight
    changes in place; otherwise ``(W @ x^T)^T`` from MM_MIN_ROWS rows on. Only when no gradient is needed: training
    takes PyTorch's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not MIN_ROWS <= rows <= MAX_ROWS or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if onednn_available():
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        if rows < MM_MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1]).T.contiguous()  # (in, rows)
        out = torch.mm(self.weight, flat).T.contiguous().reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return out if self.bias is None else out + self.bias

    def _packed_weight(self) -> torch.Tensor:
        # inference tensors (made under torch.inference_mode) have no version counter, and cannot change in place
        version = None if self.weight.is_inference() else self.weight._version
        key = (version, self.weight.data_ptr())
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)
            cached = (key, packed)
            _PACKED[self] = cached
        return cached[1]


def cpu_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with two CPU changes (module doc): in float32, a masked block of 2+ queries over
    grouped KV heads uses ``enable_gqa=True`` instead of copying every cached key and value ``n_rep`` times; in
    bfloat16/float16, every call runs :func:`row_invariant_attention`.

    query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim). Returns the attention
    output as (batch, q_len, heads, head_dim), as transformers' attention functions do.
    """
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    if plain and dropout == 0.0 and query.dtype != torch.float32:
        return row_invariant_attention(query, key, value, attention_mask, scaling), None
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if not (grouped and plain and attention_mask is not None and query.shape[2] > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (batch, heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def row_invariant_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v, one query row at a time over exactly the keys it may see, with the
    softmax in float32 (transformers' "eager" formula): each row makes the very calls a one-token step at its
    position makes, so its bits do not depend on how many rows are computed together.

    query: (batch, heads, q_len, head_dim), the last q_len positions; key, value: (batch, kv_heads, kv_len,
    head_dim); attention_mask: sdpa's mask (boolean, True = attend, or additive float; broadcastable to (batch,
    heads, q_len, kv_len)), or None for plain causal attention. Returns (batch, q_len, heads, head_dim).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (batch, heads, kv_len, head_dim)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = []
    with without_onednn():
        for row in range(q_len):
            seen = kv_len - q_len + row + 1  # keys up to this row's own position
            scores = torch.matmul(query[:, :, row : row + 1], key[:, :, :seen].transpose(2, 3)) * scale  # (b, h, 1, seen)
            if attention_mask is not None:
                row_mask = attention_mask[..., row : row + 1, :seen]
                scores = (scores.masked_fill(~row_mask, float("-inf")) if row_mask.dtype == torch.bool
                          else scores + row_mask)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            rows.append(torch.matmul(weights, value[:, :, :seen]))  # (batch, heads, 1, head_dim)
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous()


class RowInvariantLinear(torch.nn.Linear):
    """``nn.Linear`` for 16-bit weights on a CPU whose every output row is the same whatever the row count: PyTorch's
    own matrix product with float32 accumulation, oneDNN off for the call (module doc). Same weights, same result
    up to 16-bit rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with without_onednn():
            return F.linear(x, self.weight, self.bias)


def use_row_invariant_linear(model: torch.nn.Module) -> int:
    """Switch every plain 16-bit ``nn.Linear`` of a CPU model to :class:`RowInvariantLinear` in place; returns how
    many (their parameters stay, so shared weights stay shared)."""
    switched = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype in (torch.bfloat16, torch.float16)):
            module.__class__ = RowInvariantLinear
            switched += 1
    return switched


def use_small_batch_linear(model: torch.nn.Module) -> int:
    """Switch every plain fp32 ``nn.Linear`` of a CPU model to :class:`SmallBatchLinear` in place; returns how many.

    The modules keep their parameters (only their class changes), so a model that shares weights keeps sharing them.
    """
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = SmallBatchLinear
            switched += 1
    return switched


def use_cpu_attention(model: torch.nn.Module) -> bool:
    """Give a model on transformers' SDPA attention :func:`cpu_sdpa_attention` when it changes something (grouped KV
    heads, or a dtype other than float32); True if switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    grouped = bool(heads and kv_heads and kv_heads != heads)
    low_precision = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    if not grouped and not low_precision:
        return False
    AttentionInterface.register(CPU_ATTENTION, cpu_sdpa_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_ATTENTION)
    return True


def use_cpu_kernels(model: torch.nn.Module) -> None:
    """Both kernel choices above, in place, for a model on a CPU (the engine calls it for the large model)."""
    switched = use_small_batch_linear(model) + use_row_invariant_linear(model)
    attention = use_cpu_attention(model)
    logger.debug("CPU kernels: %d linear layers switched (%s), attention switched: %s", switched,
                 "oneDNN packed" if onednn_available() else "W @ x^T", attention)


def needs_row_by_row(model: torch.nn.Module) -> bool:
    """A 16-bit model on a CPU that the row-invariant kernels do not fully cover: an encoder-decoder model (its
    cross-attention and relative position biases are not on them; measured: T5 and BART in bfloat16 drift), attention
    :func:`use_cpu_attention` could not switch, or float32 linear layers kept inside it (T5 keeps its feed-forward
    output layer in float32 when it loads in 16 bits), whose multi-row products round differently in the last bits. A check of k drafts must then feed them one at a
    time to see exactly what k single steps see (:class:`bild.cache.CachedDecoder` ``row_by_row``)."""
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    if not parameters or parameters[0].device.type != "cpu":
        return False
    if not any(p.dtype in (torch.bfloat16, torch.float16) for p in parameters):
        return False
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):  # cross-attention, relative position biases: not covered
        return True
    attention_switched = getattr(config, "_attn_implementation", None) == CPU_ATTENTION
    float32_linear = any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules())
    return not attention_switched or float32_linear
