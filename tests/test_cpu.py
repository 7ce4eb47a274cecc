"""bild.cpu: the same products and attention as transformers' own kernels, and BiLD on them stays exact."""

from __future__ import annotations

import copy

import pytest
import torch

from bild.config import BiLDConfig
from bild.cpu import CPU_ATTENTION, MAX_ROWS, MIN_ROWS, SmallBatchLinear, use_cpu_attention, use_small_batch_linear
from bild.decoding import BiLD

from conftest import make_pair, prompt_ids, tiny_llama, tiny_t5


@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_linear_gives_the_linear_product_for_every_row_count(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80, bias=bias)
    switched = copy.deepcopy(plain)
    switched.__class__ = SmallBatchLinear
    for rows in (MIN_ROWS, 2, 3, 4, 7, MAX_ROWS, MAX_ROWS + 1, 130):
        x = torch.randn(1, rows, 48)  # (batch, seq, in)
        with torch.inference_mode():
            assert torch.allclose(switched(x), plain(x), atol=1e-5), rows
    grad_in = torch.randn(2, 3, 48, requires_grad=True)  # (2, 3): 6 rows, but a gradient is needed: PyTorch's path
    switched(grad_in).sum().backward()
    assert grad_in.grad is not None and grad_in.grad.shape == grad_in.shape
    assert switched.weight.grad is not None and torch.allclose(switched.weight.grad, grad_in.sum((0, 1)).expand(80, 48))


def test_small_batch_linear_follows_in_place_weight_changes():
    """The packed copy is remade when the weight changes in place (e.g. a frozen model later edited)."""
    torch.manual_seed(0)
    switched = torch.nn.Linear(48, 80)
    switched.__class__ = SmallBatchLinear
    x = torch.randn(6, 48)  # 6 rows: the fast path
    with torch.inference_mode():
        switched(x)
    with torch.no_grad():
        switched.weight.mul_(2.0)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, switched.weight, switched.bias)
        assert torch.allclose(switched(x), expected, atol=1e-5)


def test_small_batch_linear_works_on_weights_made_in_inference_mode():
    with torch.inference_mode():
        torch.manual_seed(0)
        switched = torch.nn.Linear(48, 80)  # inference tensors: no version counter
        switched.__class__ = SmallBatchLinear
        x = torch.randn(6, 48)
        assert torch.allclose(switched(x), torch.nn.functional.linear(x, switched.weight, switched.bias), atol=1e-5)


def test_switching_keeps_shared_weights_and_the_model_output():
    model = tiny_llama(1)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    reference = copy.deepcopy(model)
    assert use_small_batch_linear(model) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    ids = torch.tensor([prompt_ids(0, 12)])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
    assert use_small_batch_linear(model) == 0  # idempotent
    copy.deepcopy(model)  # the packed copies live outside the module: a switched model still copies


def test_gqa_attention_gives_sdpa_logits_for_cached_blocks_of_any_width():
    """Blocks of 1-9 tokens after a cached prefix: same logits as transformers' SDPA (which copies grouped KV heads)."""
    model = tiny_llama(3)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    reference = copy.deepcopy(model)
    assert use_cpu_attention(model)
    assert model.config._attn_implementation == CPU_ATTENTION
    assert reference.config._attn_implementation == "sdpa"
    ids = torch.tensor([prompt_ids(1, 30)])  # (1, 30)
    with torch.inference_mode():
        for width in range(1, 10):
            caches = [m(ids[:, :20], use_cache=True).cache for m in (model, reference)]
            block = ids[:, 20 : 20 + width]
            logits = [m(block, cache=c, use_cache=True).logits for m, c in zip((model, reference), caches)]
            assert torch.allclose(logits[0], logits[1], atol=1e-5), width


def test_gqa_attention_leaves_models_without_grouped_heads_alone():
    assert not use_cpu_attention(tiny_t5(0))
    model = tiny_llama(0)
    model.config.num_key_value_heads = model.config.num_attention_heads  # as if it had no grouped heads
    assert not use_cpu_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_the_engine_switches_the_large_model_and_lossless_bild_stays_exact():
    pair = make_pair("llama")
    engine = BiLD(pair)
    assert isinstance(pair.large.model.lm_head, SmallBatchLinear)
    assert pair.large.model.config._attn_implementation == CPU_ATTENTION
    for seed in range(3):
        ids = prompt_ids(seed, 6)
        config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.0, max_small_steps=8, max_new_tokens=30)
        result = engine.generate_ids(ids, config)  # passes over up to 9 tokens: the packed path, GQA attention
        assert result.token_ids == engine.vanilla_ids(ids, config).token_ids


def test_the_engine_can_leave_the_large_model_as_loaded():
    pair = make_pair("llama")
    BiLD(pair, cpu_kernels=False)
    assert type(pair.large.model.lm_head) is torch.nn.Linear
    assert pair.large.model.config._attn_implementation == "sdpa"


def test_small_batch_linear_without_onednn_gives_the_linear_product(monkeypatch):
    """Builds of PyTorch without oneDNN (e.g. on ARM) take F.linear below MM_MIN_ROWS rows and W @ x^T from there."""
    import bild.cpu

    monkeypatch.setattr(bild.cpu, "onednn_available", lambda: False)
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80)
    switched = copy.deepcopy(plain)
    switched.__class__ = SmallBatchLinear
    for rows in (1, bild.cpu.MM_MIN_ROWS - 1, bild.cpu.MM_MIN_ROWS, 9):
        x = torch.randn(1, rows, 48)
        with torch.inference_mode():
            assert torch.allclose(switched(x), plain(x), atol=1e-5), rows
