"""Frozen run settings, validated on construction, and the typed result of one generation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class SamplingConfig:
    """How both models pick a token from their distribution (the same rule for the small and the large model)."""

    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds the sampling generator, so a run is reproducible

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


DEFAULT_LOOKUP = 2  # the n-gram length of lookup drafting under the adaptive policy


@dataclass(frozen=True)
class BiLDConfig:
    """The BiLD policies (Algorithm 1 of the paper) and the generation limits."""

    fallback_threshold: float = 0.6  # alpha_FB: hand over to the large model when the small top-1 prob is below it
    rollback_threshold: float = 5.0  # alpha_RB: roll back a small token whose NLL under the large model exceeds it
    max_small_steps: int = 10  # N: most small-model tokens in a row before the large model checks them anyway
    max_new_tokens: int = 128  # generation stops after this many new tokens
    # not in the paper: a small token that completes a token n-gram already in the output is rolled back whenever the
    # large model would pick another token there (alpha_RB = 0 for repeats); 0 turns the guard off (Algorithm 1 as is)
    repeat_ngram: int = 4
    # not in the paper: "adaptive" learns per request how long to draft from what the large model accepts and from
    # the measured cost of both models (N is then the longest draft and alpha_FB the least threshold, or at lossless
    # alpha_RB = 0 at most the costs' break-even confidence); it stops drafting where drafting does not pay and probes
    # again now and then. "fixed" is Algorithm 1 as published.
    # Either way the large model checks every kept draft by the same rule: alpha_RB = 0 stays exact.
    policy: Literal["adaptive", "fixed"] = "adaptive"
    # not in the paper: lookup drafting. Before each small step, look the sequence's last `lookup` tokens up in the
    # prompt and the output so far; where they occurred before, draft the token that followed them there, without a
    # small-model step (summaries, answers from a passage and rewrites copy their prompt; small models repeat
    # themselves). Lookup drafts are always checked as if alpha_RB were 0, so they never change the output, only how
    # many tokens a large pass accepts. None: 2 under the adaptive policy, 0 (off) under the fixed one.
    lookup: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if not (isinstance(self.fallback_threshold, (int, float)) and 0 <= self.fallback_threshold <= 1):
            raise ValueError(
                f"fallback_threshold (alpha_FB) must be a probability in [0, 1], got {self.fallback_threshold!r}"
            )
        if not (isinstance(self.rollback_threshold, (int, float)) and self.rollback_threshold >= 0) or math.isnan(
            self.rollback_threshold
        ):
            raise ValueError(
                f"rollback_threshold (alpha_RB) must be >= 0 (0 = lossless, inf = never roll back), "
                f"got {self.rollback_threshold!r}"
            )
        if not (isinstance(self.max_small_steps, int) and self.max_small_steps >= 1):
            raise ValueError(f"max_small_steps (N) must be an integer >= 1, got {self.max_small_steps!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.repeat_ngram, int) and self.repeat_ngram >= 0):
            raise ValueError(f"repeat_ngram must be an integer >= 0 (0 = no repetition guard), got {self.repeat_ngram!r}")
        if self.policy not in ("adaptive", "fixed"):
            raise ValueError(f"policy must be 'adaptive' or 'fixed', got {self.policy!r}")
        if self.lookup is not None and not (isinstance(self.lookup, int) and not isinstance(self.lookup, bool)
                                            and self.lookup >= 0):
            raise ValueError(f"lookup must be an integer >= 0 (0 = no lookup drafts) or None, got {self.lookup!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")

    @property
    def lookup_ngram(self) -> int:
        """The n-gram length lookup drafting matches (0: off), with None resolved by the policy."""
        if self.lookup is not None:
            return self.lookup
        return DEFAULT_LOOKUP if self.policy == "adaptive" else 0


@dataclass(frozen=True)
class DraftCosts:
    """What a small step and a large pass cost, for the adaptive policy: seconds as the engine measures them
    (``BiLD.measure_costs``), or any one unit when a caller fixes them (``BiLD(pair, costs=...)``, or the ``costs``
    of a settings file, so that several engines make the same choices)."""

    small_step: float  # one single-token step of the small model
    large_base: float  # a large pass over one token
    large_per_token: float  # what each further token adds to a large pass, on average
    # a large pass over 1, 2, ... tokens, where measured: on a CPU the cost is far from linear in the width (a pass
    # over a few tokens can cost less than a one-token step); wider passes take large_base and large_per_token
    large_passes: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        named = {"small_step": self.small_step, "large_base": self.large_base, "large_per_token": self.large_per_token}
        named |= {f"large_passes[{index}]": value for index, value in enumerate(self.large_passes)}
        for name, value in named.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"costs: {name} must be a finite number >= 0, got {value!r}")
        free = [name for name, value in named.items() if value == 0 and name not in ("small_step", "large_per_token")]
        if free:
            raise ValueError(f"costs: {free[0]} must be > 0 (a large pass costs something)")

    def large_pass(self, width: int) -> float:
        """A large pass over ``width`` tokens."""
        if 0 < width <= len(self.large_passes):
            return self.large_passes[width - 1]
        return self.large_base + (width - 1) * self.large_per_token

    def round_time(self, draft_length: int) -> float:
        """One round: ``draft_length`` small steps, then one large pass over the drafts and one more position."""
        return draft_length * self.small_step + self.large_pass(draft_length + 1)

    def as_dict(self) -> dict[str, float | list[float]]:
        return {"small_step": self.small_step, "large_base": self.large_base, "large_per_token": self.large_per_token,
                "large_passes": list(self.large_passes)}

    @classmethod
    def from_dict(cls, data: object) -> DraftCosts:
        """The inverse of :meth:`as_dict`; a ValueError says what is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"costs must be an object of small_step, large_base, large_per_token and large_passes, "
                             f"got {type(data).__name__}")
        names = ("small_step", "large_base", "large_per_token", "large_passes")
        unknown, missing = sorted(set(data) - set(names)), [name for name in names[:3] if name not in data]
        if unknown or missing:
            raise ValueError(f"costs: unknown key {unknown[0]!r}" if unknown else f"costs: {missing[0]!r} is missing")
        passes = data.get("large_passes", [])
        if not isinstance(passes, list):
            raise ValueError(f"costs: large_passes must be a list of numbers, got {passes!r}")
        return cls(small_step=data["small_step"], large_base=data["large_base"],
                   large_per_token=data["large_per_token"], large_passes=tuple(passes))


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationStats:
    """What one request cost and how the two models shared the work."""

    new_tokens: int  # tokens in the final output
    small_tokens_kept: int  # output tokens written by the small model
    large_tokens: int  # output tokens the large model wrote (appended, rollback replacements) or confirmed as its own
    # pick (lookup drafts, which are checked as at alpha_RB = 0)
    small_tokens_drafted: int  # every token the small model appended, kept or later discarded
    tokens_discarded: int  # small-model tokens thrown away by rollbacks
    large_passes: int  # non-autoregressive large-model calls (the prefill pass included)
    fallbacks: int  # large passes triggered by low small-model confidence
    rollbacks: int
    small_steps: int  # small-model forward calls (drafts, dropped fallback steps and catch-ups after pauses)
    mean_draft_cap: float  # the longest draft allowed, averaged over large passes (N under the fixed policy)
    mean_fallback_threshold: float  # alpha_FB in force, averaged over large passes (alpha_FB under the fixed policy)
    small_time_s: float  # time inside the small model's forward passes
    large_time_s: float  # time inside the large model's forward passes
    wall_time_s: float  # total time of the request, prompt encoding and overhead included
    lookup_tokens_kept: int = 0  # output tokens drafted by lookup (BiLDConfig.lookup), not by either model
    lookup_tokens_drafted: int = 0  # every lookup draft, kept or later discarded

    @property
    def tokens_per_large_pass(self) -> float:
        return self.new_tokens / self.large_passes if self.large_passes else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {**self.__dict__, "tokens_per_large_pass": self.tokens_per_large_pass}


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # the new tokens only, without the prompt
    text: str
    finish_reason: FinishReason  # "stop": an EOS token ended it; "length": max_new_tokens did
    stats: GenerationStats


# ---- settings files (`bild tune` writes them; `--config FILE` reads them) ----------------------------------------
SETTINGS_MODELS = ("large", "small")  # which pair the settings were tuned for
SETTINGS_DECODING = ("fallback_threshold", "rollback_threshold", "max_small_steps", "repeat_ngram", "policy", "lookup")
SETTINGS_COSTS = "costs"  # DraftCosts.as_dict(): what every engine started with the file plans with
SETTINGS_NOTES = ("tuned",)  # what `bild tune` measured: kept in the file for people, ignored when reading


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file and what is wrong."""


def read_settings(path: str | Path) -> dict[str, object]:
    """The model names, decoding settings and costs of a JSON settings file (as written by `bild tune`), validated.

    Only the keys present are returned; apply the decoding settings with :func:`config_with_settings`, and give
    ``costs`` (a :class:`DraftCosts`) to the engine: ``BiLD(pair, costs=...)``. ``rollback_threshold`` may be the
    string "inf" (JSON has no infinity). Unknown keys, wrong types and out-of-range values raise
    :class:`SettingsError`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingsError(f"cannot read settings file {str(path)!r}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SettingsError(f"settings file {str(path)!r} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {str(path)!r}: expected a JSON object, got {type(data).__name__}")
    allowed = SETTINGS_MODELS + SETTINGS_DECODING + (SETTINGS_COSTS,) + SETTINGS_NOTES
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SettingsError(f"settings file {str(path)!r}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    settings = {key: data[key] for key in SETTINGS_MODELS + SETTINGS_DECODING if key in data}
    for key in SETTINGS_MODELS:
        if key in settings and not (isinstance(settings[key], str) and settings[key].strip()):
            raise SettingsError(f"settings file {str(path)!r}: {key!r} must be a model name, got {settings[key]!r}")
    if settings.get("rollback_threshold") == "inf":
        settings["rollback_threshold"] = math.inf
    try:
        config_with_settings(settings)
        if SETTINGS_COSTS in data:
            settings[SETTINGS_COSTS] = DraftCosts.from_dict(data[SETTINGS_COSTS])
    except ValueError as error:
        raise SettingsError(f"settings file {str(path)!r}: {error}") from None
    return settings


def config_with_settings(settings: dict[str, object], base: BiLDConfig | None = None) -> BiLDConfig:
    """``base`` (default: BiLDConfig()) with the decoding settings of ``settings``; a ValueError names a bad value."""
    values = {key: settings[key] for key in SETTINGS_DECODING if key in settings}
    if isinstance(values.get("fallback_threshold"), int) and not isinstance(values["fallback_threshold"], bool):
        values["fallback_threshold"] = float(values["fallback_threshold"])
    if isinstance(values.get("rollback_threshold"), int) and not isinstance(values["rollback_threshold"], bool):
        values["rollback_threshold"] = float(values["rollback_threshold"])
    if any(isinstance(value, bool) for value in values.values()):
        name = next(key for key, value in values.items() if isinstance(value, bool))
        raise ValueError(f"{name} must be a number, got {values[name]!r}")
    return replace(base or BiLDConfig(), **values)
