"""The int8 output layer keeps a draft model's choices and leaves BiLD exact."""

from __future__ import annotations

import copy

import torch

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.models import ModelPair
from bild.quantize import quantize_output_layer

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
