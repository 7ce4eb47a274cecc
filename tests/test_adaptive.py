"""The adaptive drafting policy: its pure functions, and bounds on whole runs that hold without a clock (the costs
are fixed by conftest's TEST_COSTS, so every choice the policy makes is a function of what the large model accepts)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.models import ModelPair
from bild.policies import (
    DraftCosts,
    best_draft_cap,
    break_even_confidence,
    estimated_rate,
    expected_round_time,
    expected_round_tokens,
    next_draft_cap,
    next_fallback_threshold,
    next_probe_interval,
    rate_lower_bound,
)

from conftest import loaded, make_pair, prompt_ids, tiny_llama, tiny_tokenizer

COSTS = DraftCosts(small_step=0.1, large_base=1.0, large_per_token=0.02)


# ---- pure functions ------------------------------------------------------------------------------------------

def test_round_time():
    assert COSTS.round_time(0) == 1.0 and COSTS.round_time(3) == pytest.approx(1.0 + 3 * 0.12)


def test_draft_cap_doubles_when_filled_and_halves_after_a_rollback():
    assert next_draft_cap(2, checked=2, accepted=2, longest=10) == 4
    assert next_draft_cap(8, checked=8, accepted=8, longest=10) == 10
    assert next_draft_cap(8, checked=3, accepted=3, longest=10) == 10  # accepted whole, though a fallback ended it
    assert next_draft_cap(4, checked=0, accepted=0, longest=10) == 4  # nothing drafted: nothing learnt
    assert next_draft_cap(8, checked=5, accepted=2, longest=10) == 4
    assert next_draft_cap(1, checked=1, accepted=0, longest=10) == 1


def test_estimated_rate_starts_at_the_prior_and_follows_what_is_seen():
    assert estimated_rate(0, 0, prior=0.7, weight=2.0) == pytest.approx(0.7)
    assert estimated_rate(3, 0, prior=0.7, weight=2.0) == pytest.approx(4.4 / 5)
    assert estimated_rate(0, 3, prior=0.7, weight=2.0) == pytest.approx(1.4 / 5)
    assert estimated_rate(900, 100, prior=0.7, weight=2.0) == pytest.approx(0.9, abs=1e-3)
    # the lower bound: wide on little evidence, closing in on the estimate as evidence grows, never below 0
    assert rate_lower_bound(0, 0, prior=0.8, weight=4.0, z=1.0) == pytest.approx(0.8 - math.sqrt(0.16 / 5))
    assert rate_lower_bound(800, 200, 0.8, 4.0, z=1.0) > rate_lower_bound(8, 2, 0.8, 4.0, z=1.0)
    assert rate_lower_bound(0, 50, 0.8, 4.0, z=3.0) == 0.0


def test_expected_round_tokens_and_time():
    assert expected_round_tokens(0.5, 1.0, cap=0) == 1.0  # the large model's own token
    assert expected_round_tokens(0.5, 1.0, cap=2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_round_tokens(1.0, 1.0, cap=3) == 4.0
    assert expected_round_tokens(1.0, 0.5, cap=2) == pytest.approx(1 + 0.5 + 0.25)  # unsure steps end the round
    assert expected_round_time(1.0, 3, COSTS) == pytest.approx(COSTS.round_time(3))  # always confident: k drafts
    # the second step runs half the time, each confident step adds a draft to the large pass
    assert expected_round_time(0.5, 2, COSTS) == pytest.approx(1.5 * 0.1 + 1.0 + 0.75 * 0.02)


def test_best_draft_cap_drafts_long_when_accepted_and_not_at_all_when_rejected():
    assert best_draft_cap(1.0, 1.0, COSTS, longest=10) == 10  # every draft accepted: the longest
    assert best_draft_cap(0.05, 1.0, COSTS, longest=10) == 0  # 1.05 tokens for 1.12: slower than the large model
    assert best_draft_cap(0.9, 0.1, COSTS, longest=10) == 0  # nearly every step falls back: nothing to gain
    middle = best_draft_cap(0.6, 1.0, COSTS, longest=10)
    assert 1 <= middle < 10
    rate = expected_round_tokens(0.6, 1.0, middle) / expected_round_time(1.0, middle, COSTS)
    assert all(rate >= expected_round_tokens(0.6, 1.0, k) / expected_round_time(1.0, k, COSTS) for k in range(1, 11))
    assert rate > 1 / COSTS.large_base


def test_fallback_threshold_rises_after_confident_rejections_and_returns_to_its_floor():
    assert next_fallback_threshold(0.6, floor=0.6, rejected_confidence=0.9, all_accepted=False) == pytest.approx(0.62)
    assert next_fallback_threshold(0.6, floor=0.6, rejected_confidence=0.3, all_accepted=False) == 0.6  # was unsure
    assert next_fallback_threshold(0.8, floor=0.6, rejected_confidence=None, all_accepted=True) == pytest.approx(0.78)
    assert next_fallback_threshold(0.61, floor=0.6, rejected_confidence=None, all_accepted=True) == 0.6
    assert next_fallback_threshold(0.95, floor=0.6, rejected_confidence=0.99, all_accepted=False) == 0.95


def test_probe_interval_backs_off_and_resets():
    assert next_probe_interval(8, probe_accepted=False, shortest=8, longest=64) == 16
    assert next_probe_interval(64, probe_accepted=False, shortest=8, longest=64) == 64
    assert next_probe_interval(32, probe_accepted=True, shortest=8, longest=64) == 8


def test_policy_is_validated():
    with pytest.raises(ValueError, match="policy"):
        BiLDConfig(policy="sometimes")


# ---- bounds on whole runs ------------------------------------------------------------------------------------

def random_small_pair() -> ModelPair:
    """A large model and an unrelated small one (other seed, other layer count): it almost never agrees."""
    tokenizer = tiny_tokenizer(with_eos=False)
    large = tiny_llama(seed=1, layers=3, eos=None)
    small = tiny_llama(seed=99, layers=1, eos=None)
    return ModelPair(large=loaded("large", large, tokenizer), small=loaded("small", small, tokenizer))


def wasted_small_steps(stats) -> int:
    """Small-model calls that put no token in the output (rejected drafts, dropped fallback steps, probes)."""
    return stats.small_steps - stats.small_tokens_kept


@pytest.mark.parametrize("rollback_threshold", [0.0, 5.0])
def test_a_small_model_that_never_agrees_is_soon_left_out(rollback_threshold):
    engine = BiLD(random_small_pair())
    config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=rollback_threshold, max_new_tokens=200)
    for seed in range(3):
        ids = prompt_ids(seed, 8)
        adaptive = engine.generate_ids(ids, config).stats
        fixed = engine.generate_ids(ids, BiLDConfig(**{**config.__dict__, "policy": "fixed"})).stats
        assert adaptive.new_tokens == 200
        assert adaptive.tokens_per_large_pass <= 1.1, adaptive
        assert wasted_small_steps(adaptive) < 0.1 * adaptive.new_tokens, adaptive
        assert adaptive.mean_draft_cap < 0.5
        # the same pair under Algorithm 1 wastes a draft run on nearly every token: what the policy saves
        assert wasted_small_steps(fixed) > 2 * adaptive.new_tokens, fixed


def test_a_small_model_equal_to_the_large_one_drafts_long_runs():
    engine = BiLD(make_pair("llama", same=True))
    for seed in range(3):
        stats = engine.generate_ids(prompt_ids(seed, 6), BiLDConfig(fallback_threshold=0.0, max_new_tokens=120)).stats
        assert stats.rollbacks == 0 and stats.tokens_discarded == 0
        assert stats.tokens_per_large_pass >= 7.0, stats  # N = 10: every draft accepted, the cap grows 2 -> 4 -> 8 -> 10
        assert stats.mean_draft_cap >= 7.0, stats


def test_a_confident_wrong_draft_raises_the_fallback_threshold():
    pair = make_pair("llama", noise=0.6)  # agrees part of the time, often confidently wrong
    engine = BiLD(pair)
    config = BiLDConfig(fallback_threshold=0.1, rollback_threshold=0.0, max_new_tokens=80)
    stats = [engine.generate_ids(prompt_ids(seed, 6), config).stats for seed in range(4)]
    assert any(s.rollbacks for s in stats)
    assert max(s.mean_fallback_threshold for s in stats) > 0.1 + 1e-6
    assert all(s.mean_fallback_threshold >= 0.1 for s in stats)  # never below the configured alpha_FB


def test_break_even_confidence():
    assert break_even_confidence(COSTS) == pytest.approx(0.12)  # (0.1 + 0.02) / 1.0
    assert break_even_confidence(DraftCosts(small_step=2.0, large_base=1.0, large_per_token=0.0)) == 1.0


def test_lossless_bild_falls_back_only_below_the_break_even_confidence_lossy_bild_at_alpha_fb():
    engine = BiLD(make_pair("llama", same=True))  # every draft accepted: alpha_FB stays at its floor
    lossless = BiLDConfig(rollback_threshold=0.0, max_new_tokens=40)
    stats = engine.generate_ids(prompt_ids(0, 6), lossless).stats
    assert stats.mean_fallback_threshold == pytest.approx(break_even_confidence(engine.costs))  # 0.12 < 0.6
    lossy = engine.generate_ids(prompt_ids(0, 6), BiLDConfig(max_new_tokens=40)).stats
    assert lossy.mean_fallback_threshold == pytest.approx(0.6)  # alpha_RB > 0: alpha_FB shapes the output, kept
    fixed = engine.generate_ids(prompt_ids(0, 6), replace(lossless, policy="fixed")).stats
    assert fixed.mean_fallback_threshold == pytest.approx(0.6)  # Algorithm 1 as published


def test_fixed_policy_reports_its_settings():
    engine = BiLD(make_pair("llama"))
    config = BiLDConfig(fallback_threshold=0.4, max_small_steps=6, max_new_tokens=30, policy="fixed")
    stats = engine.generate_ids(prompt_ids(0, 6), config).stats
    assert stats.mean_draft_cap == 6 and stats.mean_fallback_threshold == pytest.approx(0.4)
    assert stats.small_steps == stats.small_tokens_drafted + stats.fallbacks
