"""The BiLD policies as pure functions: they read tensors and numbers and return decisions; the loop owns all state.

- fallback (:func:`should_fall_back`) and rollback (:func:`find_rollback`): Algorithm 1 of the paper;
- the repetition guard (:func:`repeated_ngrams`): not in the paper, see BiLDConfig.repeat_ngram;
- adaptive drafting (:func:`best_draft_cap` from :func:`estimated_rate`s, and the ``next_*`` updates): not in the
  paper, see BiLDConfig.policy.
  They change only when the large model runs, never what it accepts, so alpha_RB = 0 stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from bild.config import DraftCosts, SamplingConfig
from bild.sampling import pick


def should_fall_back(small_confidence: float, small_run: int, fallback_threshold: float, max_small_steps: int) -> bool:
    """Fallback policy: hand over to the large model when the small model is unsure or has written N tokens in a row.

    alpha_FB = 1 always falls back, even when a float32 top-1 probability rounds to exactly 1.0.
    """
    unsure = small_confidence < fallback_threshold or fallback_threshold >= 1.0
    return unsure or small_run >= max_small_steps


@dataclass(frozen=True)
class Rollback:
    index: int  # position among the checked draft tokens (0 = the first small token since the last large pass)
    replacement: int  # the large model's token for that position


def find_rollback(
    large_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    threshold: float,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    strict: torch.Tensor | None = None,
) -> Rollback | None:
    """Rollback policy: the first draft token whose NLL under the large model exceeds `threshold`.

    large_logits: (num_drafts, vocab), row i is the large model's prediction for draft_tokens[i]; draft_tokens:
    (num_drafts,). The NLL is the cross-entropy between the small model's hard label and the large model's raw
    (temperature 1) distribution, as in the paper. strict: (num_drafts,) bool, drafts checked at threshold 0 whatever
    `threshold` is (the repetition guard).

    Deliberate deviation (as in the official code): when the large model's own pick for that position equals the
    draft token, nothing would change, so no rollback happens there and checking continues. Without it, alpha_RB = 0
    would roll back every token, since no token has NLL exactly 0; with it, alpha_RB = 0 returns exactly the large
    model's greedy output.
    """
    any_strict = strict is not None and bool(strict.any())
    if draft_tokens.numel() == 0 or (threshold == float("inf") and not any_strict):
        return None
    log_probs = torch.log_softmax(large_logits.float(), dim=-1)  # (num_drafts, vocab)
    nll = -log_probs.gather(-1, draft_tokens[:, None]).squeeze(-1)  # (num_drafts,)
    suspects = nll > threshold
    if any_strict:
        suspects |= strict
    if sampling.greedy:  # vectorized: the large pick is the argmax
        suspects &= large_logits.argmax(dim=-1) != draft_tokens
        hits = suspects.nonzero()
        if hits.numel() == 0:
            return None
        index = int(hits[0, 0])
        return Rollback(index=index, replacement=int(large_logits[index].argmax()))
    for index in suspects.nonzero()[:, 0].tolist():
        replacement = pick(large_logits[index], sampling, generator)
        if replacement != int(draft_tokens[index]):
            return Rollback(index=index, replacement=replacement)
    return None


def ngram_ending_at(sequence: Sequence[Hashable], position: int, n: int) -> tuple:
    """The n items of ``sequence`` ending at ``position`` (position >= n - 1)."""
    return tuple(sequence[position - n + 1 : position + 1])


def repeated_ngrams(output: Sequence[Hashable], first: int, n: int, earlier: set[tuple] | None = None) -> list[bool]:
    """For each position p in output[first:]: does the n-gram ending at p occur earlier in the output? n = 0: none.

    The output excludes the prompt (copying from the prompt is what summaries and rewrites do). earlier: the n-grams
    ending before ``first``, when the caller keeps them across calls (the BiLD loop does, as its final prefix only
    grows); None collects them here. It is read, never changed.
    """
    flags = [False] * (len(output) - first)
    if n == 0:
        return flags
    if earlier is None:
        earlier = {ngram_ending_at(output, position, n) for position in range(n - 1, first)}
    later: set[tuple] = set()
    for position in range(max(first, n - 1), len(output)):
        gram = ngram_ending_at(output, position, n)
        flags[position - first] = gram in earlier or gram in later
        later.add(gram)
    return flags


# ---------------------------------------------------------------------------------------------- adaptive drafting


def estimated_rate(successes: float, failures: float, prior: float, weight: float) -> float:
    """The mean of a Beta posterior: how often something happens, from what was seen and a prior worth ``weight``
    observations (so a few early outcomes move the estimate, and none leaves it at ``prior``)."""
    return (successes + prior * weight) / (successes + failures + weight)


def rate_lower_bound(successes: float, failures: float, prior: float, weight: float, z: float) -> float:
    """:func:`estimated_rate` less ``z`` standard deviations of that Beta posterior (at least 0): a rate the
    observations make unlikely to be lower. Little evidence, a wide margin."""
    mean = estimated_rate(successes, failures, prior, weight)
    count = successes + failures + weight
    return max(0.0, mean - z * math.sqrt(mean * (1.0 - mean) / (count + 1.0)))


def expected_round_tokens(acceptance: float, confidence: float, cap: int) -> float:
    """Tokens one drafting round is expected to put in the output under a draft cap of ``cap``: the large model's
    own token, plus draft i (i = 1..cap) when the small model was confident enough to write drafts 1..i
    (``confidence`` each) and the large model accepted them all (``acceptance`` each)."""
    keep = acceptance * confidence
    return sum(keep**i for i in range(cap + 1))


def expected_round_time(confidence: float, cap: int, costs: DraftCosts) -> float:
    """What such a round is expected to cost: small step i (i = 1..cap) runs when steps 1..i-1 drafted; an unsure
    step drafts nothing (the fallback drops its token) and ends the round; the large pass checks every draft (d
    drafts, d < cap, with probability confidence^d (1 - confidence); all ``cap`` with probability confidence^cap)."""
    steps = sum(confidence**i for i in range(cap))
    large = sum(confidence**d * (1.0 - confidence) * costs.large_pass(d + 1) for d in range(cap))
    return steps * costs.small_step + large + confidence**cap * costs.large_pass(cap + 1)


def best_draft_cap(acceptance: float, confidence: float, costs: DraftCosts, longest: int) -> int:
    """The draft cap in [0, longest] with the most expected tokens per unit of cost; 0 (the large model alone, one
    token per large pass) unless some cap beats it."""
    best, best_rate = 0, 1.0 / costs.large_base
    for cap in range(1, longest + 1):
        rate = expected_round_tokens(acceptance, confidence, cap) / expected_round_time(confidence, cap, costs)
        if rate > best_rate:
            best, best_rate = cap, rate
    return best


def break_even_confidence(costs: DraftCosts) -> float:
    """The small model's top-1 probability at which a draft pays for itself, if drafts are accepted about as often as
    the small model is sure of them: a draft costs a small step and its place in the large pass, and saves a large
    pass when accepted. Lossless BiLD falls back only below it: its alpha_FB changes the time, never the output."""
    return min(1.0, (costs.small_step + costs.large_per_token) / costs.large_base)


def cheapest_check(costs: DraftCosts, longest: int) -> int:
    """The draft length in [1, ``longest``] whose check is cheapest: the smallest k with the least large pass over
    k + 1 tokens (1 where the pass cost grows with its width; on a CPU a pass over 4-6 tokens can cost less than over
    1 or 2)."""
    return max(1, min(range(longest + 1), key=lambda draft_length: costs.large_pass(draft_length + 1)))


def next_draft_cap(cap: int, checked: int, accepted: int, longest: int, shortest: int = 1) -> int:
    """The cap on the next draft: doubled after a draft the large model accepted whole, halved after a rollback, but
    not below ``shortest`` (:func:`cheapest_check`) unless it already was.

    Doubling up and halving down (within [1, longest]): a run of good drafts reaches N in a few rounds, one bad draft
    costs at most half the cap's work in the next round. Below the cheapest check, a shorter draft costs more large
    time, not less.
    """
    if checked and accepted == checked:
        return min(longest, cap * 2)
    if accepted < checked:
        return max(min(shortest, cap), cap // 2)
    return cap


def next_probe_interval(interval: int, probe_accepted: bool, shortest: int, longest: int) -> int:
    """How many large-only passes to wait before drafting again when drafting does not pay: doubled after a probe
    that was rejected, reset after one that was accepted."""
    return shortest if probe_accepted else min(longest, interval * 2)


# ---------------------------------------------------------------------------------------------------- lookup drafts


def index_ngrams(index: dict[tuple[int, ...], list[int]], tokens: Sequence[int], start: int, stop: int, n: int) -> None:
    """Add to ``index`` each position p in [start, stop) under the n tokens before it: gram -> [p, ...], the
    positions whose token followed that n-gram, in increasing order. In place: the loop indexes its final prefix,
    which only grows, a little more after every large pass."""
    for position in range(max(start, n), stop):
        index.setdefault(tuple(tokens[position - n : position]), []).append(position)


def lookup_draft(tokens: Sequence[int], index: dict[tuple[int, ...], list[int]], n: int, longest: int = 8,
                 tries: int = 16) -> int | None:
    """Lookup drafting (not in the paper; prompt lookup decoding, extended to the output): the token that followed
    an earlier occurrence of the sequence's last ``n`` tokens, or None when they never occurred in the indexed part.

    index: from :func:`index_ngrams` with the same ``n``. Of the latest ``tries`` occurrences, the one whose match
    reaches furthest back (up to ``longest`` tokens) wins, the latest among equals. Summaries, answers from a passage
    and rewrites copy spans of their prompt, and small models' greedy outputs repeat themselves: there the next token
    is often simply the one that came next before, and proposing it costs no model step.
    """
    if len(tokens) < n:
        return None
    positions = index.get(tuple(tokens[len(tokens) - n :]))
    if not positions:
        return None
    best, best_length = None, -1
    for position in reversed(positions[-tries:]):
        length = n
        while length < longest and length < position and tokens[position - length - 1] == tokens[-length - 1]:
            length += 1
        if length > best_length:
            best, best_length = position, length
    return tokens[best]
