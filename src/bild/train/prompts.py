"""Instruction prompts built from real text: the little models' training prompts (stdlib and package docstrings).

Each prompt comes with a reference taken from the same text (the unaligned model's target); the large model's greedy
answers to the prompts are the aligned model's (calibration data, :mod:`bild.train.align`).
"""

from __future__ import annotations

import functools
import logging
import random
import re
from dataclasses import dataclass

from bild.train.sources import Docstring, iter_docstrings, iter_package_docstrings, paragraphs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptExample:
    """An instruction-style prompt built from real text and a reference answer taken from that text."""

    prompt: str
    reference: str  # real text (e.g. the docstring's own words) used as the unaligned model's target
    source: str  # where the text is: a documented object's dotted name, or "wordnet:dog" (bild.train.tasks)
    kind: str = ""  # the kind of prompt of bild.train.tasks ("define", "translate", ...); "" for docstring prompts


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (., ! or ? before a space or the end), or all of it."""
    match = re.match(r"(.+?[.!?])(\s|$)", text, flags=re.S)
    return (match.group(1) if match else text).strip()


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at a word boundary and marked with " ..." when cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _example(doc: Docstring, rng: random.Random, max_chars: int) -> PromptExample | None:
    """One prompt of a randomly chosen kind for a docstring; None when the docstring has no prose paragraph."""
    prose = paragraphs(doc.text, min_chars=60)
    if not prose:
        return None
    paragraph = clip(rng.choice(prose), max_chars)
    body = clip("\n\n".join(prose[:3]), max_chars)
    name = doc.dotted_name
    kind = rng.randrange(7)
    if kind == 0:
        return PromptExample(f"Summarize in one sentence:\n\n{paragraph}", first_sentence(paragraph), name)
    if kind == 1:
        return PromptExample(f"Explain what `{name}` does, based on its documentation:\n\n{body}", prose[0], name)
    if kind == 2:
        return PromptExample(f"Rewrite this more simply:\n\n{paragraph}", paragraph, name)
    if kind == 3:
        return PromptExample(f"What is `{name}` used for in Python? Answer briefly.", first_sentence(prose[0]), name)
    if kind == 4:
        return PromptExample(f"Explain this to a beginner:\n\n{paragraph}", paragraph, name)
    if kind == 5:
        return PromptExample(f"List the key points of this text:\n\n{body}", body, name)
    return PromptExample(f"Read this documentation and give a short answer: what does it describe?\n\n{paragraph}",
                         first_sentence(paragraph), name)


def build_prompts(count: int, seed: int = 0, max_chars: int = 700, max_rounds: int = 3) -> list[PromptExample]:
    """``count`` prompts from the docstrings of the training stdlib modules (never the eval-reserved ones).

    The first round gives one prompt per docstring (3,333 with Python 3.13's stdlib); when more are asked for, later
    rounds ask about the same docstrings again with a freshly drawn prompt kind. Prefix-stable: the first n prompts
    are the same for every ``count`` >= n, so a calibration file can grow by resuming.
    """
    examples = _prompts_about(list(iter_docstrings(split="train", min_chars=80)), count, seed, max_chars, max_rounds)
    logger.info("built %d prompts from training stdlib docstrings", len(examples))
    return examples


def build_package_prompts(package: str, count: int, seed: int = 0, max_chars: int = 700) -> list[PromptExample]:
    """``count`` prompts (the same seven kinds) about the docstrings of an installed package, one per docstring.

    More text that is new to the little model, beside the stdlib's: its prompts about new modules are what BiLD
    drafts for. Prefix-stable like :func:`build_prompts`.
    """
    examples = _prompts_about(list(iter_package_docstrings(package, min_chars=80)), count, seed, max_chars, 1)
    logger.info("built %d prompts from %s docstrings", len(examples), package)
    return examples


def _prompts_about(docs: list[Docstring], count: int, seed: int, max_chars: int, max_rounds: int
                   ) -> list[PromptExample]:
    """Up to ``count`` prompts about the docs in a seeded order, round after round, skipping docs without prose."""
    rng = random.Random(seed)
    rng.shuffle(docs)
    examples: list[PromptExample] = []
    for _ in range(max_rounds):
        for doc in docs:
            if len(examples) == count:
                break
            example = _example(doc, rng, max_chars)
            if example is not None:
                examples.append(example)
    return examples


@functools.lru_cache(maxsize=None)
def prompts_per_round() -> int:
    """How many prompts one round of :func:`build_prompts` gives: prompt ``i`` is about the same docstring as ``i``
    plus any multiple of this (3,333 with Python 3.13's stdlib; the seed only reorders, so any seed counts)."""
    return len(build_prompts(10**9, max_rounds=1))
