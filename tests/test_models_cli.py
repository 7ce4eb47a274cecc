"""Vocabulary checks, the CLI's handling of bad input, and exactness on the real SmolLM2-135M-Instruct weights."""

from __future__ import annotations

import copy

import pytest
import torch

from bild.cli import main
from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.models import DEFAULT_LARGE, LoadedModel, ModelPair, VocabularyMismatchError, check_same_vocabulary, load_model

from conftest import loaded, tiny_llama, tiny_tokenizer


def test_vocabulary_size_mismatch_is_named():
    large = loaded("large", tiny_llama(1), tiny_tokenizer(96))
    small = loaded("small", tiny_llama(2, vocab_size=80), tiny_tokenizer(80))
    with pytest.raises(VocabularyMismatchError, match="tokenizer size: large 96, small 80"):
        check_same_vocabulary(large, small)


def test_special_token_mismatch_is_named():
    large = loaded("large", tiny_llama(1), tiny_tokenizer(96, with_eos=True))
    small = loaded("small", tiny_llama(2), tiny_tokenizer(96, with_eos=False))
    with pytest.raises(VocabularyMismatchError, match="eos_token_id: large 1, small None"):
        check_same_vocabulary(large, small)


def test_matching_vocabularies_pass():
    check_same_vocabulary(loaded("a", tiny_llama(1), tiny_tokenizer()), loaded("b", tiny_llama(2, layers=1), tiny_tokenizer()))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--fallback-threshold", "1.5", "hi"], "fallback_threshold"),
        (["generate", "--rollback-threshold", "-1", "hi"], "rollback_threshold"),
        (["generate", "--max-small-steps", "0", "hi"], "max_small_steps"),
        (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
        (["generate", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "  "], "prompt is empty"),
        (["generate", "--large", "/no/such/model", "hi"], "does not exist"),
        (["generate", "--large", "./no-such-dir", "hi"], "does not exist"),
        (["little", "--init-layers", "0,30"], "from 0 to 29"),
        (["little", "--init-layers", "zero"], "comma-separated layer numbers"),
        (["little", "--delta-rank", "-1"], "--delta-rank"),
        (["little", "--length-bucket", "-1"], "--length-bucket"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def first_layers_model(large: LoadedModel, layers: int) -> LoadedModel:
    """A small model cut from the large one: its first layers plus the final norm and the shared head."""
    model = copy.deepcopy(large.model)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return LoadedModel(name=f"first-{layers}", model=model, tokenizer=large.tokenizer, is_encoder_decoder=False, is_chat=True)


@pytest.mark.slow
def test_real_smollm2_lossless_equals_greedy():
    large = load_model(DEFAULT_LARGE)
    engine = BiLD(ModelPair(large=large, small=first_layers_model(large, 6)))
    config = BiLDConfig(fallback_threshold=0.3, rollback_threshold=0.0, max_new_tokens=24)
    rollbacks = 0
    for prompt in ["Explain photosynthesis.", "What is the capital of France?", "Write a haiku about the sea."]:
        ids = engine.encode(prompt)
        reference = large.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        result = engine.generate_ids(ids, config)
        assert result.token_ids == reference, prompt
        rollbacks += result.stats.rollbacks
    assert rollbacks > 0
