"""Lookup drafting (BiLDConfig.lookup): the proposals themselves, exactness with them on, and their settings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bild.config import BiLDConfig, read_settings
from bild.decoding import BiLD
from bild.policies import index_ngrams, lookup_draft

from conftest import make_pair, prompt_ids
from test_decoding import hf_greedy


def proposal(tokens: list[int], n: int, final: int | None = None, **kwargs) -> int | None:
    """lookup_draft over ``tokens`` with the first ``final`` of them (default: all) indexed, as the loop does."""
    index: dict = {}
    index_ngrams(index, tokens, 0, len(tokens) if final is None else final, n)
    return lookup_draft(tokens, index, n, **kwargs)


def test_a_lookup_draft_is_the_token_that_followed_the_same_ngram():
    assert proposal([5, 6, 7, 8, 9, 6, 7], 2) == 8
    assert proposal([5, 6, 7, 8, 9, 6, 7], 1) == 8  # the last 7 was followed by 8
    assert proposal([5, 6, 7, 8, 9, 6, 7], 3) is None  # "9 6 7" never occurred before
    assert proposal([5, 6], 3) is None  # shorter than n


def test_the_longest_match_wins_then_the_latest():
    # "1 2" occurs twice before the end; only the first occurrence is also preceded by 0, like the end
    tokens = [0, 1, 2, 3, 9, 1, 2, 4, 0, 1, 2]
    assert proposal(tokens, 2) == 3
    assert proposal(tokens, 2, longest=2) == 4  # matches no longer than 2: the latest of the equals
    assert proposal([1, 2, 3, 1, 2, 4, 1, 2], 2) == 4  # equally long matches: the latest


def test_only_the_indexed_final_prefix_is_proposed_from():
    tokens = [5, 6, 7, 8, 6, 7]
    assert proposal(tokens, 2, final=3) is None  # "6 7" was followed by 8 only at position 3, not yet indexed
    assert proposal(tokens, 2, final=4) == 8


def test_the_setting_resolves_by_policy_and_is_validated():
    assert BiLDConfig().lookup_ngram == 2
    assert BiLDConfig(policy="fixed").lookup_ngram == 0  # Algorithm 1 as published
    assert BiLDConfig(policy="fixed", lookup=3).lookup_ngram == 3
    assert BiLDConfig(lookup=0).lookup_ngram == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="lookup"):
            BiLDConfig(lookup=bad)


def test_a_settings_file_carries_lookup(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"lookup": 3, "policy": "fixed"}')
    assert read_settings(path) == {"lookup": 3, "policy": "fixed"}
    path.write_text('{"lookup": -2}')
    with pytest.raises(ValueError, match="lookup"):
        read_settings(path)


def repetitive_prompt(seed: int) -> list[int]:
    """A prompt that says the same thing twice: its second half is where lookups find their continuations."""
    ids = prompt_ids(seed, 9)
    return ids + ids[1:]


@pytest.mark.parametrize("lookup", [1, 2, 3])
def test_lossless_bild_with_lookup_drafts_is_the_large_models_greedy_output(lookup):
    kept = 0
    for family in ("llama", "t5", "bart"):  # the tiny t5 and bart loop on their own outputs: lookup drafts hit there
        pair = make_pair(family, noise=0.4)
        engine = BiLD(pair)
        for seed in range(4):
            ids = repetitive_prompt(seed)
            for policy in ("adaptive", "fixed"):
                config = BiLDConfig(fallback_threshold=0.4, rollback_threshold=0.0, max_new_tokens=40, lookup=lookup,
                                    policy=policy)
                result = engine.generate_ids(ids, config)
                assert result.token_ids == hf_greedy(pair, ids, 40), (family, seed, policy)
                stats = result.stats
                assert stats.new_tokens == stats.small_tokens_kept + stats.large_tokens
                assert stats.lookup_tokens_kept <= min(stats.lookup_tokens_drafted, stats.large_tokens)
                kept += stats.lookup_tokens_kept
    assert kept > 20, "lookup drafts must have been accepted for this test to mean anything"


@pytest.mark.parametrize("rollback_threshold", [2.0, float("inf")])
def test_lookup_drafts_are_checked_as_if_alpha_rb_were_0(rollback_threshold):
    """alpha_FB = 1: the small model never drafts, so only lookup drafts are checked; whatever alpha_RB, the output
    stays the large model's own greedy one."""
    pair = make_pair("llama", noise=0.4)
    engine = BiLD(pair)
    for seed in range(4):
        ids = repetitive_prompt(seed)
        config = BiLDConfig(fallback_threshold=1.0, rollback_threshold=rollback_threshold, max_new_tokens=40,
                            lookup=1, policy="fixed")
        result = engine.generate_ids(ids, config)
        assert result.token_ids == hf_greedy(pair, ids, 40)
        assert result.stats.lookup_tokens_drafted > result.stats.lookup_tokens_kept  # some were wrong, rolled back


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_lookup_drafts_save_large_passes_on_repetitive_text(family):
    pair = make_pair(family, same=True)  # these tiny greedy models loop: their outputs repeat themselves
    engine = BiLD(pair)
    for seed in range(3):
        ids = repetitive_prompt(seed)
        config = BiLDConfig(fallback_threshold=1.0, rollback_threshold=0.0, max_new_tokens=60, policy="fixed")
        with_lookup = engine.generate_ids(ids, replace(config, lookup=2))
        without = engine.generate_ids(ids, config)  # the fixed policy: no lookup unless asked for
        assert with_lookup.token_ids == without.token_ids
        assert without.stats.large_passes == 60  # alpha_FB = 1 and no lookup: one token per pass
        assert with_lookup.stats.lookup_tokens_kept >= 20
        assert with_lookup.stats.large_passes <= 61 - with_lookup.stats.lookup_tokens_kept
