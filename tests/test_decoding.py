"""Exactness of the BiLD loop against plain greedy decoding, cache cropping, statistics, sampling, configs."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from bild.config import BiLDConfig, SamplingConfig
from bild.decoding import BiLD
from bild.models import ModelPair
from bild.policies import DraftCosts, repeated_ngrams

from conftest import make_pair, prompt_ids, watch_large_passes

LENGTHS = [1, 7, 33]


def hf_greedy(pair: ModelPair, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of the large model, the reference everything is held to."""
    model = pair.large.model
    inputs = torch.tensor([ids])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    if model.config.is_encoder_decoder:
        out = model.generate(input_ids=inputs, **kwargs)[0, 1:]  # drop the decoder start token
    else:
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **kwargs)[0, len(ids) :]
    return out.tolist()


@pytest.fixture(params=["adaptive", "fixed"])
def policy(request) -> str:
    """Every exactness test runs under both drafting policies: adaptation changes when the large model runs, never
    what it accepts."""
    return request.param


@pytest.mark.parametrize("fallback_threshold", [0.0, 0.4])
def test_lossless_rollback_equals_large_greedy(family, fallback_threshold, policy):
    pair = make_pair(family)  # EOS disabled: every run goes to max_new_tokens through many rounds
    # a drafter far cheaper than the large model, so that the adaptive policy keeps drafting where it can
    engine = BiLD(pair, costs=DraftCosts(small_step=0.01, large_base=1.0, large_per_token=0.0))
    rollbacks = passes = kept = 0
    for seed in range(5):
        ids = prompt_ids(seed, length=3 + 4 * seed)
        for max_new in LENGTHS:
            config = BiLDConfig(fallback_threshold=fallback_threshold, rollback_threshold=0.0, max_new_tokens=max_new,
                                policy=policy)
            result = engine.generate_ids(ids, config)
            reference = hf_greedy(pair, ids, max_new)
            assert result.token_ids == reference, (seed, max_new)
            assert engine.vanilla_ids(ids, config).token_ids == reference
            rollbacks += result.stats.rollbacks
            passes += result.stats.large_passes
            kept += result.stats.small_tokens_kept
    assert rollbacks > 5 and passes > 20, "the test must go through many fallback/rollback rounds"
    if fallback_threshold == 0.0:  # the adaptive policy drafts less where the pair seldom agrees (t5 here)
        assert kept > (5 if policy == "fixed" else 0), "some small-model tokens must survive the check"


def test_always_fall_back_equals_large_greedy(family, policy):
    pair = make_pair(family)
    engine = BiLD(pair)
    for seed in range(4):
        ids = prompt_ids(seed, length=5 + seed)
        config = BiLDConfig(fallback_threshold=1.0, rollback_threshold=5.0, max_new_tokens=20, policy=policy)
        result = engine.generate_ids(ids, config)
        assert result.token_ids == hf_greedy(pair, ids, 20)
        # no small token survives; each large pass writes one token after the lookup drafts it accepted (the last
        # pass may only check lookup drafts that reached max_new_tokens)
        assert result.stats.small_tokens_kept == 0
        assert 0 <= result.stats.large_passes - (20 - result.stats.lookup_tokens_kept) <= 1


def test_small_equal_to_large_equals_greedy(family, policy):
    pair = make_pair(family, same=True)
    engine = BiLD(pair)
    for seed in range(4):
        ids = prompt_ids(seed, length=4 + seed)
        config = BiLDConfig(fallback_threshold=0.3, rollback_threshold=2.0, max_new_tokens=25, policy=policy)
        assert engine.generate_ids(ids, config).token_ids == hf_greedy(pair, ids, 25)
        result = engine.generate_ids(ids, replace(config, lookup=0))  # lookup drafts can be wrong, the small model not
        assert result.token_ids == hf_greedy(pair, ids, 25)
        assert result.stats.rollbacks == 0


def test_eos_ends_generation_and_stays_exact(family, policy):
    pair = make_pair(family)
    # Random tiny models rarely pick any one token, so the EOS id is a token the large model does write.
    eos = hf_greedy(pair, prompt_ids(0, 4), 40)[12]
    for side in (pair.large, pair.small):
        side.model.generation_config.eos_token_id = eos
    engine = BiLD(pair)
    stopped = 0
    for seed in range(8):
        ids = prompt_ids(seed, length=4)
        config = BiLDConfig(fallback_threshold=0.2, rollback_threshold=0.0, max_new_tokens=40, policy=policy)
        result = engine.generate_ids(ids, config)
        reference = hf_greedy(pair, ids, 40)
        assert result.token_ids == reference
        if eos in reference:
            assert result.token_ids[-1] == eos and result.finish_reason == "stop"
            stopped += 1
        else:
            assert result.finish_reason == "length" and len(result.token_ids) == 40
    assert stopped > 0, "some prompt must end with EOS"


def _next_logits_from_cache(decoder, tokens: list[int]) -> torch.Tensor:
    """Logits for tokens[seen:] through a copy of the decoder's cache, leaving the decoder untouched."""
    probe = copy.copy(decoder)
    probe.cache = copy.deepcopy(decoder.cache)
    return probe.forward(tokens)


def _fresh_logits(decoder, tokens: list[int]) -> torch.Tensor:
    fresh = copy.copy(decoder)
    fresh.cache, fresh.seen = None, 0
    return fresh.forward(tokens)[decoder.seen :]


def test_cropped_caches_match_recomputed(family, monkeypatch, policy):
    """After every rollback, both cropped caches give the logits a from-scratch computation gives."""
    pair = make_pair(family)
    engine = BiLD(pair)
    checked = []

    def check(run, large, small, rolled_back):
        if rolled_back:
            assert large.cache_length() == large.seen and small.cache_length() == small.seen
            for decoder in (large, small):
                cached = _next_logits_from_cache(decoder, run.tokens)
                torch.testing.assert_close(cached, _fresh_logits(decoder, run.tokens), rtol=1e-4, atol=1e-3)
            checked.append(run.rollbacks)

    watch_large_passes(monkeypatch, check)
    for seed in range(4):
        engine.generate_ids(prompt_ids(seed, 6), BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.5, max_new_tokens=30,
                                                             policy=policy))
    assert len(checked) >= 3


def test_sampling_is_reproducible_with_a_seed(family):
    pair = make_pair(family)
    engine = BiLD(pair)
    ids = prompt_ids(3, 6)

    def run(seed: int) -> list[int]:
        sampling = SamplingConfig(temperature=1.5, top_p=0.95, seed=seed)
        return engine.generate_ids(ids, BiLDConfig(rollback_threshold=2.0, max_new_tokens=30, sampling=sampling)).token_ids

    assert run(7) == run(7)
    assert len({tuple(run(seed)) for seed in range(5)}) > 1, "different seeds must be able to give different text"


def test_stream_chunks_add_up_to_the_result(family):
    pair = make_pair(family)
    engine = BiLD(pair)
    ids = prompt_ids(1, 5)
    config = BiLDConfig(fallback_threshold=0.5, rollback_threshold=1.0, max_new_tokens=30)
    chunks = list(engine.stream_ids(ids, config))
    result = chunks[-1].result
    assert result is not None and all(chunk.result is None for chunk in chunks[:-1])
    assert len(chunks) > 2, "text must arrive in several pieces"
    assert "".join(chunk.text for chunk in chunks) == result.text
    assert sum((chunk.token_ids for chunk in chunks), []) == result.token_ids
    assert result.token_ids == engine.generate_ids(ids, config).token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fallback_threshold": 1.5}, "fallback_threshold"),
        ({"fallback_threshold": -0.1}, "fallback_threshold"),
        ({"rollback_threshold": -1.0}, "rollback_threshold"),
        ({"rollback_threshold": float("nan")}, "rollback_threshold"),
        ({"max_small_steps": 0}, "max_small_steps"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"repeat_ngram": -1}, "repeat_ngram"),
        ({"repeat_ngram": 2.5}, "repeat_ngram"),
    ],
)
def test_invalid_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiLDConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.2}, "top_p"), ({"seed": -3}, "seed")],
)
def test_invalid_sampling_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_empty_prompt_is_refused():
    engine = BiLD(make_pair("llama"))
    with pytest.raises(ValueError, match="empty"):
        engine.generate("   ", chat=False)


def test_no_model_recomputes_a_cached_token(family, monkeypatch, policy):
    """Each model is fed every token once, plus only the tokens a rollback cropped from its cache."""
    from bild.cache import CachedDecoder

    fed: dict[int, int] = {}
    cropped: dict[int, int] = {}
    original_forward, original_crop = CachedDecoder.forward, CachedDecoder.crop

    def counting_forward(self, tokens, keep=None):
        fed[id(self)] = fed.get(id(self), 0) + len(tokens) - self.seen
        return original_forward(self, tokens, keep)

    def counting_crop(self, length):
        cropped[id(self)] = cropped.get(id(self), 0) + max(0, self.seen - length)
        return original_crop(self, length)

    monkeypatch.setattr(CachedDecoder, "forward", counting_forward)
    monkeypatch.setattr(CachedDecoder, "crop", counting_crop)
    seen_at_end = {}
    watch_large_passes(monkeypatch, lambda run, large, small, _: seen_at_end.update({id(large): large, id(small): small}))
    config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.5, max_new_tokens=30, policy=policy)
    result = BiLD(make_pair(family)).generate_ids(prompt_ids(2, 6), config)
    assert result.stats.rollbacks > 0 and len(seen_at_end) == 2
    for key, decoder in seen_at_end.items():
        assert fed[key] - cropped.get(key, 0) == decoder.seen == decoder.cache_length()


def test_repeated_ngrams_counts_only_the_output():
    tokens = [5, 6, 7, 1, 2, 1, 2, 1, 5, 6, 7]  # prompt [5, 6, 7], then the output
    output = tokens[3:]
    assert repeated_ngrams(output, 0, 2) == [False, False, False, True, True, False, False, False]
    assert repeated_ngrams(output, 4, 2) == [True, False, False, False]
    assert repeated_ngrams(output, 4, 2, earlier={(1, 2), (2, 1)}) == [True, False, False, False]
    assert repeated_ngrams(output, 0, 0) == [False] * 8
    assert repeated_ngrams(tokens, 8, 3) == [False, False, True]
