"""int8 drafting (output layer, draft vocabulary, decoder layers) keeps a draft model's choices and BiLD exact."""

from __future__ import annotations

import copy

import torch

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.models import ModelPair
import pytest

from bild.drafters.quantize import (
    DraftHead, draft_vocabulary, drafting_also, quantize_decoder_layers, quantize_output_layer,
)

from conftest import loaded, make_pair, prompt_ids, tiny_llama, tiny_tokenizer


def test_int8_head_keeps_the_argmax_and_shares_the_embedding():
    model = tiny_llama(3, hidden=128)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    reference = copy.deepcopy(model)
    embedding = model.get_input_embeddings().weight
    quantize_output_layer(model)
    assert model.get_input_embeddings().weight is embedding  # the (shared) input embedding is untouched
    ids = torch.tensor([prompt_ids(0, 40)])
    with torch.inference_mode():
        agree = (model(ids).logits.argmax(-1) == reference(ids).logits.argmax(-1)).float().mean()
    assert agree >= 0.95


def test_bild_with_an_int8_draft_head_is_still_exact():
    pair = make_pair("llama")
    small = quantize_output_layer(copy.deepcopy(pair.small.model))
    engine = BiLD(ModelPair(large=pair.large, small=loaded("small-int8", small, tiny_tokenizer())))
    for seed in range(3):
        ids = prompt_ids(seed, 6)
        config = BiLDConfig(fallback_threshold=0.2, rollback_threshold=0.0, max_new_tokens=25)
        assert engine.generate_ids(ids, config).token_ids == engine.vanilla_ids(ids, config).token_ids
    # and it still works as transformers' assistant model
    ids = torch.tensor([prompt_ids(0, 6)])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assisted = pair.large.model.generate(ids, assistant_model=small, **kwargs)
    assert assisted.tolist() == pair.large.model.generate(ids, **kwargs).tolist()


def test_draft_vocabulary_ranks_targets_then_context_and_keeps_the_always_ids():
    targets = [[5, 5, 5, 7, 7, 9], [7, 3]]  # 5 and 7 three times, then 3 and 9 once (ties: lower id first)
    context = [[11, 11, 12, 5], [12, 12]]  # 12 three times, 11 twice
    assert draft_vocabulary(targets, 3).tolist() == [3, 5, 7]
    assert draft_vocabulary(targets, 5, context=context).tolist() == [3, 5, 7, 9, 12]
    assert draft_vocabulary(targets, 6, context=context, always=[0]).tolist() == [0, 3, 5, 7, 9, 11, 12]
    with pytest.raises(ValueError, match="positive"):
        draft_vocabulary(targets, 0)


def test_draft_head_scores_only_its_vocabulary():
    head = torch.nn.Linear(16, 50, bias=False)
    keep = torch.tensor([1, 4, 9, 30, 49])
    draft = DraftHead(head, keep)
    hidden = torch.randn(2, 3, 16)  # (batch, seq, hidden)
    with torch.inference_mode():
        logits, full = draft(hidden), head(hidden)  # (2, 3, 50)
    assert logits.shape == full.shape
    assert torch.allclose(logits[..., keep], full[..., keep], atol=0.05)  # int8 rows
    outside = torch.ones(50, dtype=torch.bool)
    outside[keep] = False
    assert torch.isneginf(logits[..., outside]).all()
    assert torch.isin(logits.argmax(-1), keep).all()
    for bad in (torch.tensor([], dtype=torch.long), torch.tensor([0, 50]), torch.tensor([[1, 2]])):
        with pytest.raises(ValueError, match="draft vocabulary"):
            DraftHead(head, bad)


def test_a_draft_head_drafts_a_requests_tokens_inside_the_block_only():
    head = torch.nn.Linear(16, 50, bias=True)
    keep = torch.tensor([1, 4, 9, 30, 49])
    draft = DraftHead(head, keep)
    hidden = torch.randn(2, 3, 16)
    request = (4, 7, 7, 12)  # 4 is in the vocabulary already; 7 and 12 are not
    with torch.inference_mode():
        full, before = head(hidden), draft(hidden)
        request_tokens = drafting_also(draft_model(draft), request)  # made once, entered around every step
        with request_tokens:
            inside = draft(hidden)
        after = draft(hidden)
        with request_tokens:
            again = draft(hidden)
    assert torch.equal(inside[..., keep], before[..., keep])
    assert torch.allclose(inside[..., [7, 12]], full[..., [7, 12]], atol=1e-5)  # the full layer's own rows, exactly
    others = torch.ones(50, dtype=torch.bool)
    others[keep], others[[7, 12]] = False, False
    assert torch.isneginf(inside[..., others]).all()
    assert torch.equal(after, before)  # the block's tokens go with it
    assert torch.equal(again, inside)


def draft_model(head: torch.nn.Module) -> torch.nn.Module:
    """A stand-in model whose output layer is ``head``."""
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    return model


def test_drafting_also_leaves_other_models_alone():
    model = tiny_llama(4)
    with drafting_also(model, (5, 6)):  # a full vocabulary: nothing to add
        assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_bild_drafts_prompt_tokens_outside_the_draft_vocabulary():
    """A small model equal to the large one, whose draft vocabulary leaves out every token the large model writes:
    only the prompt's tokens let it draft at all, and lossless BiLD stays exact."""
    pair = make_pair("llama", same=True)
    config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.0, max_new_tokens=30, lookup=0)
    vanilla = BiLD(pair)
    prompts = []
    for seed in range(3):
        first = prompt_ids(seed, 6)
        prompts.append(first + vanilla.vanilla_ids(first, config).token_ids[:10])  # prompts the answers copy from
    answers = [vanilla.vanilla_ids(ids, config).token_ids for ids in prompts]
    written = {token for answer in answers for token in answer}
    small = copy.deepcopy(pair.small.model)
    vocab = small.config.vocab_size
    quantize_output_layer(small, torch.tensor([t for t in range(vocab) if t not in written]))
    engine = BiLD(ModelPair(large=pair.large, small=loaded("small-no-answers", small, tiny_tokenizer())))
    kept = 0
    for ids, answer in zip(prompts, answers):
        result = engine.generate_ids(ids, config)
        assert result.token_ids == answer
        kept += result.stats.small_tokens_kept
    assert any(token in ids for ids, answer in zip(prompts, answers) for token in answer)
    assert kept > 0


def test_bild_with_int8_layers_and_a_draft_vocabulary_is_still_exact():
    pair = make_pair("llama")
    small = quantize_decoder_layers(copy.deepcopy(pair.small.model))
    vocab = small.config.vocab_size
    quantize_output_layer(small, torch.arange(0, vocab, 2))  # half the tokens can never be drafted
    engine = BiLD(ModelPair(large=pair.large, small=loaded("small-draft-vocab", small, tiny_tokenizer())))
    for seed in range(3):
        ids = prompt_ids(seed, 6)
        config = BiLDConfig(fallback_threshold=0.1, rollback_threshold=0.0, max_small_steps=4, max_new_tokens=25)
        result = engine.generate_ids(ids, config)
        assert result.token_ids == engine.vanilla_ids(ids, config).token_ids
        assert result.stats.small_tokens_drafted > 0
    ids = torch.tensor([prompt_ids(0, 6)])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assisted = pair.large.model.generate(ids, assistant_model=small, **kwargs)
    assert assisted.tolist() == pair.large.model.generate(ids, **kwargs).tolist()


def test_decoder_layers_can_stay_fp32_by_index():
    model = tiny_llama(4, layers=3)
    quantize_decoder_layers(model, keep=(0,))
    layers = model.get_decoder().layers
    assert type(layers[0].mlp.up_proj) is torch.nn.Linear
    assert all(type(layer.mlp.up_proj) is not torch.nn.Linear for layer in layers[1:])
    with torch.inference_mode():
        assert model(torch.tensor([prompt_ids(0, 8)])).logits.isfinite().all()
    with pytest.raises(ValueError, match="layers to keep"):
        quantize_decoder_layers(tiny_llama(4, layers=3), keep=(3,))
