"""CPU kernel choices for the large model's non-autoregressive passes (a few tokens at once).

BiLD's verification passes feed the large model short blocks of 2-11 tokens. With PyTorch 2.13 on this project's x86
CPU (AVX-512, 2 threads) two things made such a block cost far more than a one-token step:

- Linear layers: an fp32 ``nn.Linear`` over 1-3 rows runs at the speed of reading its weights, but over 4 or more rows
  PyTorch switches to a GEMM path that costs 1.6-2.4x as much. oneDNN with a weight packed once for it keeps 4-11 rows
  at 1.1-1.3x the one-row cost (:class:`SmallBatchLinear`; without oneDNN, ``W @ x^T`` at about 1.5x).
- Attention with grouped key/value heads (SmolLM2: 9 query heads, 3 KV heads): transformers' SDPA path copies every
  cached key and value ``n_rep`` times (``repeat_kv``) whenever a mask is needed, i.e. for every block of 2+ tokens
  after a prompt; a one-token step avoids the copy. ``enable_gqa=True`` gives the same numbers without the copy
  (:func:`gqa_sdpa_attention`).

Measured side by side in one run (`benchmarks/kernels-ab.log`, SmolLM2-135M, 150 cached tokens, 2 threads), a large
pass over k tokens in units of a one-token step on PyTorch's own kernels: k = 2: 1.10x -> 1.06x; k = 4-6:
1.83-1.88x -> 1.39-1.46x; k = 8-11: 2.20-2.45x (1.86-1.96x with the earlier ``W @ x^T`` choice) -> 1.57-1.65x.
One-row steps (what vanilla decoding does) and long prompts keep PyTorch's own path; the weights are the same
tensors and the outputs equal up to float rounding (the attention exactly). The cost: a layer's packed copy is made
the first time it sees 4-64 rows and holds a second copy of its weight (for SmolLM2-135M about 540 MB in all);
``BiLD(pair, cpu_kernels=False)`` keeps the model as loaded.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

logger = logging.getLogger(__name__)

MIN_ROWS, MAX_ROWS = 4, 64  # the row counts that take the packed (or W @ x^T) path
PACK_ROWS = 8  # oneDNN's row-count hint for the packed layout (any row count works with it)
GQA_ATTENTION = "bild_gqa_sdpa"  # the attention implementation name registered by use_cpu_kernels

# module -> (weight version, weight storage address, oneDNN-packed copy); weak keys so models can be freed, and kept
# off the module itself so deepcopy / pickling / state_dict of the model never meet the opaque oneDNN tensor
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


class SmallBatchLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward over MIN_ROWS..MAX_ROWS rows takes a faster CPU kernel (same weights; the same
    result up to float rounding).

    With oneDNN (x86 builds of PyTorch), a packed copy of the weight made on first use and remade when the weight
    changes in place; otherwise ``(W @ x^T)^T``. Only when no gradient is needed: training takes PyTorch's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not MIN_ROWS <= rows <= MAX_ROWS or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if onednn_available():
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
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


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked block of 2+ queries over grouped KV heads uses
    ``enable_gqa=True`` instead of copying every cached key and value ``n_rep`` times.

    query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim). Returns the attention
    output as (batch, q_len, heads, head_dim), as transformers' attention functions do.
    """
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    if not (grouped and plain and attention_mask is not None and query.shape[2] > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (batch, heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


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


def use_gqa_attention(model: torch.nn.Module) -> bool:
    """Give a model on transformers' SDPA attention with grouped KV heads :func:`gqa_sdpa_attention`; True if switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not heads or not kv_heads or kv_heads == heads:
        return False
    AttentionInterface.register(GQA_ATTENTION, gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)
    return True


def use_cpu_kernels(model: torch.nn.Module) -> None:
    """Both kernel choices above, in place, for a model on a CPU (the engine calls it for the large model)."""
    switched = use_small_batch_linear(model)
    gqa = use_gqa_attention(model)
    logger.debug("CPU kernels: %d linear layers switched (%s), GQA attention: %s", switched,
                 "oneDNN packed" if onednn_available() else "W @ x^T", gqa)
