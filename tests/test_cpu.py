"""SmallBatchLinear: the same products as nn.Linear for every row count, and BiLD on it stays exact."""

from __future__ import annotations

import copy

import pytest
import torch

from bild.config import BiLDConfig
from bild.cpu import MAX_ROWS, MIN_ROWS, SmallBatchLinear, use_small_batch_linear
from bild.decoding import BiLD

from conftest import make_pair, prompt_ids, tiny_llama


@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_linear_gives_the_linear_product_for_every_row_count(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80, bias=bias)
    switched = copy.deepcopy(plain)
    switched.__class__ = SmallBatchLinear
    for rows in (1, 2, MIN_ROWS - 1, MIN_ROWS, 7, MAX_ROWS, MAX_ROWS + 1, 130):
        x = torch.randn(1, rows, 48)  # (batch, seq, in)
        with torch.inference_mode():
            assert torch.allclose(switched(x), plain(x), atol=1e-5), rows
    grad_in = torch.randn(2, 3, 48, requires_grad=True)  # (2, 3): 6 rows, the W @ x^T path, still differentiable
    switched(grad_in).sum().backward()
    assert grad_in.grad is not None and grad_in.grad.shape == grad_in.shape


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


def test_the_engine_switches_the_large_model_and_lossless_bild_stays_exact():
    pair = make_pair("llama")
    engine = BiLD(pair)
    assert isinstance(pair.large.model.lm_head, SmallBatchLinear)
    for seed in range(3):
        ids = prompt_ids(seed, 6)
        config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.0, max_small_steps=8, max_new_tokens=30)
        result = engine.generate_ids(ids, config)  # passes over up to 9 tokens: the W @ x^T path
        assert result.token_ids == engine.vanilla_ids(ids, config).token_ids
