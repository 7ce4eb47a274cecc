"""The adaptive drafting policy: its pure functions, and bounds on whole runs that hold without a clock (the costs
are fixed by conftest's TEST_COSTS, so every choice the policy makes is a function of what the large model accepts)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.models import ModelPair
from bild.policies import (
    DraftCosts,
    best_draft_cap,
    break_even_confidence,
    cheapest_check,
    estimated_rate,
    expected_round_time,
    expected_round_tokens,
    next_draft_cap,
    next_probe_interval,
    rate_lower_bound,
)

from conftest import TEST_COSTS, loaded, make_pair, prompt_ids, tiny_llama, tiny_tokenizer

COSTS = DraftCosts(small_step=0.1, large_base=1.0, large_per_token=0.02)
MEASURE_COSTS = BiLD.measure_costs  # the real one: conftest replaces it in every test with fixed costs


# ---- pure functions ------------------------------------------------------------------------------------------

def test_round_time():
    assert COSTS.round_time(0) == 1.0 and COSTS.round_time(3) == pytest.approx(1.0 + 3 * 0.12)


def test_measured_pass_costs_replace_the_linear_model_where_there_are_any():
    # as on a CPU: a pass over 2 tokens dearer than a one-token step, over 3-6 cheaper (kernels chosen by row count)
    measured = DraftCosts(small_step=0.1, large_base=1.0, large_per_token=0.02, large_passes=(1.0, 1.2, 0.9, 0.9))
    assert [measured.large_pass(width) for width in (1, 2, 3, 4)] == [1.0, 1.2, 0.9, 0.9]
    assert measured.large_pass(6) == pytest.approx(1.1)  # beyond the table: large_base + 5 x large_per_token
    assert measured.round_time(1) == pytest.approx(0.1 + 1.2) and measured.round_time(3) == pytest.approx(0.3 + 0.9)
    for confidence in (0.3, 0.8, 1.0):  # expected_round_time = the mean over the number of drafts, d = 0..cap
        chance = [confidence**d * (1 - confidence) for d in range(3)] + [confidence**3]
        steps = [d + 1 for d in range(3)] + [3]  # a fallback's dropped step costs a step too
        direct = sum(p * (n * 0.1 + measured.large_pass(d + 1)) for d, (p, n) in enumerate(zip(chance, steps)))
        assert expected_round_time(confidence, 3, measured) == pytest.approx(direct)
    # a two-token check dearer than a one-token step, wider ones cheaper: at 20% acceptance one draft does not pay
    # (1.2 tokens for 1.3), two do (1.24 for 1.1); on the linear costs one draft pays (1.2 for 1.12)
    assert best_draft_cap(0.2, 1.0, measured, longest=1) == 0
    assert best_draft_cap(0.2, 1.0, measured, longest=3) == 2
    assert best_draft_cap(0.2, 1.0, COSTS, longest=1) == 1


def test_measure_costs_times_a_draft_step_and_every_pass_width():
    engine = BiLD(make_pair("llama"))
    costs = MEASURE_COSTS(engine, prompt_ids(0, 6), longest=5, repeats=1)
    assert len(costs.large_passes) == 6 and min(costs.large_passes) > 0 and costs.small_step > 0
    assert costs.large_pass(1) == costs.large_base and costs.large_per_token >= 0


def test_draft_cap_doubles_when_filled_and_halves_after_a_rollback_down_to_the_cheapest_check():
    assert next_draft_cap(2, checked=2, accepted=2, longest=10) == 4
    assert next_draft_cap(8, checked=8, accepted=8, longest=10) == 10
    assert next_draft_cap(8, checked=3, accepted=3, longest=10) == 10  # accepted whole, though a fallback ended it
    assert next_draft_cap(4, checked=0, accepted=0, longest=10) == 4  # nothing drafted: nothing learnt
    assert next_draft_cap(8, checked=5, accepted=2, longest=10) == 4
    assert next_draft_cap(1, checked=1, accepted=0, longest=10) == 1
    # where a check of 4 drafts is the cheapest, the cap halves to 4 and no lower; a cap below it stays
    assert next_draft_cap(8, checked=8, accepted=0, longest=10, shortest=4) == 4
    assert next_draft_cap(6, checked=6, accepted=0, longest=10, shortest=4) == 4
    assert next_draft_cap(2, checked=2, accepted=0, longest=10, shortest=4) == 2


def test_cheapest_check():
    assert cheapest_check(COSTS, longest=10) == 1  # cost grows with the width: 1, the least the cap can be
    cpu = DraftCosts(small_step=0.1, large_base=1.0, large_per_token=0.02, large_passes=(1.0, 1.2, 0.9, 0.88, 0.88))
    assert cheapest_check(cpu, longest=4) == 3  # a pass over 4 tokens is the cheapest (over 5 as cheap, not less)
    assert cheapest_check(cpu, longest=2) == 2


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


def test_probe_interval_backs_off_and_resets():
    assert next_probe_interval(8, probe_accepted=False, shortest=8, longest=64) == 16
    assert next_probe_interval(64, probe_accepted=False, shortest=8, longest=64) == 64
    assert next_probe_interval(32, probe_accepted=True, shortest=8, longest=64) == 8


def test_policy_is_validated():
    with pytest.raises(ValueError, match="policy"):
        BiLDConfig(policy="sometimes")


# ---- bounds on whole runs ------------------------------------------------------------------------------------

def random_small_pair() -> ModelPair:
    """A large model and an unrelated small one (other seed, other layer count): it almost never agrees.

    The large model's logits are scaled up to make it as sure of its picks as a trained model: a random token's NLL is
    then far above alpha_RB = 5 too. (With the untrained model's flat distributions over 96 tokens, 14-19% of random
    drafts pass alpha_RB = 5, more than the 12% at which a draft pays for itself at TEST_COSTS: such a small model is
    worth drafting with, and the policy rightly does.)"""
    tokenizer = tiny_tokenizer(with_eos=False)
    large = tiny_llama(seed=1, layers=3, eos=None)
    with torch.no_grad():
        large.lm_head.weight.mul_(8.0)
    small = tiny_llama(seed=99, layers=1, eos=None)
    return ModelPair(large=loaded("large", large, tokenizer), small=loaded("small", small, tokenizer))


def wasted_small_steps(stats) -> int:
    """Small-model calls that put no token in the output (rejected drafts, dropped fallback steps, probes)."""
    return stats.small_steps - stats.small_tokens_kept


@pytest.mark.parametrize("rollback_threshold", [0.0, 5.0])
def test_a_small_model_that_never_agrees_is_soon_left_out(rollback_threshold):
    engine = BiLD(random_small_pair())
    config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=rollback_threshold, max_new_tokens=200)
    for seed in range(6):
        ids = prompt_ids(seed, 8)
        adaptive = engine.generate_ids(ids, config).stats  # lookup drafts on, as by default
        assert adaptive.new_tokens == 200
        assert adaptive.tokens_per_large_pass <= 1.1, adaptive
        assert wasted_small_steps(adaptive) < 0.1 * adaptive.new_tokens, adaptive
        assert adaptive.mean_draft_cap < 0.5
        # lookup drafts cost no small step, and the small model's waste is the same without them
        alone = engine.generate_ids(ids, replace(config, lookup=0)).stats
        assert wasted_small_steps(alone) < 0.1 * alone.new_tokens, alone
        # the same pair under Algorithm 1 wastes a draft run on nearly every token: what the policy saves
        fixed = engine.generate_ids(ids, replace(config, policy="fixed")).stats
        assert wasted_small_steps(fixed) > 2 * adaptive.new_tokens, fixed


def test_a_small_model_equal_to_the_large_one_drafts_long_runs():
    engine = BiLD(make_pair("llama", same=True))
    for seed in range(3):
        config = BiLDConfig(fallback_threshold=0.0, max_new_tokens=120, lookup=0)  # the small model's runs alone
        stats = engine.generate_ids(prompt_ids(seed, 6), config).stats
        assert stats.rollbacks == 0 and stats.tokens_discarded == 0
        assert stats.tokens_per_large_pass >= 7.0, stats  # N = 10: every draft accepted, the cap grows 2 -> 4 -> 8 -> 10
        assert stats.mean_draft_cap >= 7.0, stats


def test_alpha_fb_stays_where_it_started_through_confident_rejections():
    pair = make_pair("llama", noise=0.6)  # agrees part of the time, often confidently wrong
    engine = BiLD(pair)
    for rollback_threshold, expected in ((0.0, break_even_confidence(TEST_COSTS)), (2.0, 0.6)):
        config = BiLDConfig(fallback_threshold=0.6, rollback_threshold=rollback_threshold, max_new_tokens=80)
        stats = [engine.generate_ids(prompt_ids(seed, 6), config).stats for seed in range(4)]
        assert any(s.rollbacks for s in stats)
        assert all(s.mean_fallback_threshold == pytest.approx(expected) for s in stats)


def test_engines_with_other_costs_write_the_same_lossless_text():
    """Two processes (two Ray replicas) measure their own costs: the choices differ, lossless answers do not."""
    pair = make_pair("llama", noise=0.6)
    cheap = BiLD(pair, costs=DraftCosts(small_step=0.01, large_base=1.0, large_per_token=0.0))
    dear = BiLD(pair, costs=DraftCosts(small_step=0.3, large_base=1.0, large_per_token=0.05, large_passes=(1.0, 1.4)))
    config = BiLDConfig(rollback_threshold=0.0, max_new_tokens=60)
    caps = []
    for seed in range(4):
        ids = prompt_ids(seed, 6)
        answers = [engine.generate_ids(ids, config) for engine in (cheap, dear)]
        assert answers[0].token_ids == answers[1].token_ids == cheap.vanilla_ids(ids, config).token_ids, seed
        caps.append([answer.stats.mean_draft_cap for answer in answers])
    assert any(mine != theirs for mine, theirs in caps), caps  # the costs did change the drafting


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
