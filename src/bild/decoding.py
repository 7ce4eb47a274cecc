"""The BiLD loop (Algorithm 1 of the paper) and the single-model loop, on the same cache code.

Sequence bookkeeping: `tokens` is the decoder sequence (decoder-only: prompt + output; encoder-decoder:
[decoder start] + output). `checked` is how many of them are final: the large model has seen and accepted
every token before it, so text up to there can be streamed and is never taken back.

Devices: each model keeps the device(s) and dtype it was loaded with. Input ids go to the device of the model that
reads them (cache.py); logits come back as float32 on the device of the model that wrote them, and every tensor the
loop makes from logits (draft ids, flags, sampling generators) is made on that same device.
"""

from __future__ import annotations

import logging
import statistics
import time
from functools import partial
from dataclasses import dataclass, field
from typing import Iterator

import numpy
import torch

from bild.cache import CachedDecoder, Decoder
from bild.config import BiLDConfig, FinishReason, GenerationResult, GenerationStats, SamplingConfig
from bild.cpu import needs_row_by_row, use_cpu_kernels, use_row_invariant_linear
from bild.devices import input_device, model_devices
from bild.drafters.quantize import drafting_also
from bild.models import LoadedModel, ModelPair
from bild.policies import (
    DraftCosts,
    best_draft_cap,
    break_even_confidence,
    cheapest_check,
    find_rollback,
    estimated_rate,
    index_ngrams,
    lookup_draft,
    next_draft_cap,
    next_probe_interval,
    ngram_ending_at,
    rate_lower_bound,
    repeated_ngrams,
    should_fall_back,
)
from bild.sampling import make_generator, pick, top_probability

logger = logging.getLogger(__name__)

Prompt = str | list[dict]


@dataclass(frozen=True)
class StreamChunk:
    text: str  # new final text since the previous chunk
    token_ids: list[int]  # new final token ids since the previous chunk
    stats: GenerationStats  # the request's statistics so far (every token counted in them is final)
    result: GenerationResult | None = None  # set on the last chunk only


@dataclass
class _Run:
    """Mutable state of one generation; the loop owns it, policies never see it."""

    tokens: list[int]
    output_start: int  # index in tokens of the first output token
    checked: int  # tokens[:checked] are final
    small_run: int = 0  # small tokens appended since the last large pass
    written_by_small: set[int] = field(default_factory=set)  # positions in tokens holding kept small tokens
    looked_up: set[int] = field(default_factory=set)  # ... and holding lookup drafts (checked or not)
    small_drafted: int = 0
    lookup_drafted: int = 0
    round_by_small: list[bool] = field(default_factory=list)  # per unchecked draft: the small model's (else lookup)
    lookup_index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # lookup drafting: n-grams of ...
    indexed: int = 0  # ... tokens[:indexed], a final prefix
    discarded: int = 0
    fallbacks: int = 0
    rollbacks: int = 0
    output_ngrams: set[tuple[int, ...]] = field(default_factory=set)  # repetition guard: n-grams of the final output
    ngrams_before: int = 0  # ... ending at output positions before this one
    draft_cap: int = 0  # the longest draft allowed in this round (N under the fixed policy; 0: the large model alone)
    fallback_threshold: float = 0.0  # alpha_FB in force in this round
    cap_sum: float = 0.0  # draft_cap summed over large passes (for the statistics)
    threshold_sum: float = 0.0  # fallback_threshold summed over large passes
    policy_passes: int = 0  # large passes counted in the two sums

    @property
    def num_new(self) -> int:
        return len(self.tokens) - self.output_start


# the widths of a large pass that the adaptive policy's warm-up times (and the longest draft plus one); on a CPU the
# cost of a pass is far from linear in its width, so it is measured at every small width and interpolated between
MEASURED_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class _Adaptation:
    """The adaptive policy's state for one request (BiLDConfig.policy == "adaptive"); the math is in policies.py."""

    cap: int  # the longest draft the evidence allows: grown after fully accepted drafts, halved after rollbacks
    shortest_cap: int  # ... but not below the draft length whose check is cheapest
    fallback_threshold: float  # the configured alpha_FB, or the break-even confidence when lossless
    probe_interval: int  # large-only passes before the next probe draft
    accepted: int = 0  # drafts the large model accepted
    rejected: int = 0  # ... and rejected (one per rollback; the drafts after it were never judged)
    confident: int = 0  # small steps on the large model's text that drafted
    unsure: int = 0  # ... and that fell back (their token dropped)
    passes_alone: int = 0  # large-only passes since drafting was last tried
    probing: bool = False  # this round is a one-token probe


class BiLD:
    """Generate with a model pair. `pair.small` may be None: then only `vanilla` is available."""

    # adaptive policy: its priors (a draft is accepted 80% and a small step drafts 80% of the time, each worth four
    # observations), the caution of its choice to draft at all (drafting must pay at an acceptance this many
    # standard deviations below the estimate), the spacing of probes in large-only passes
    ACCEPTANCE_PRIOR = 0.8
    CONFIDENCE_PRIOR = 0.8
    PRIOR_WEIGHT = 4.0
    CAUTION = 1.5
    PROBE_INTERVALS = (4, 64)

    def __init__(self, pair: ModelPair, cpu_kernels: bool = True, costs: DraftCosts | None = None) -> None:
        """cpu_kernels: on a CPU, switch the large model (in place) to :func:`bild.cpu.use_cpu_kernels`: the same
        weights and results up to float rounding, but one-token steps and verification passes over 2-64 tokens run on
        faster kernels; the linear layers keep a packed copy of their weights from their first call (memory: a second
        copy of the large model's linear weights); in bfloat16/float16, row-invariant kernels that make lossless BiLD
        exact, and the small model's 16-bit linear layers take PyTorch's own kernels too (about twice as fast per draft
        step on this project's CPU as oneDNN's). False leaves the models as loaded.

        costs: what a small step and a large pass cost, for the adaptive policy. None measures them once, in a short
        warm-up on the first prompt that uses the policy (then kept: per pair and device, as the engine is). Either way
        the policy's choices do not depend on the clock during a generation, so a seeded sampled run repeats exactly
        on the same engine."""
        self.pair = pair
        self.costs = costs
        if cpu_kernels and _on_cpu(pair.large.model):
            use_cpu_kernels(pair.large.model)
        # 16-bit attention that could not be made row-invariant: the large model checks drafts one position at a time
        self.large_row_by_row = cpu_kernels and needs_row_by_row(pair.large.model)
        if cpu_kernels and pair.small is not None and _on_cpu(pair.small.model):
            use_row_invariant_linear(pair.small.model)  # 16-bit layers only; a no-op for float32 and int8
        self.tokenizer = pair.large.tokenizer
        self.eos_ids = frozenset(pair.large.eos_token_ids)
        self.max_context = _context_length(pair.large)

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt; chat=None applies the chat template when the large model has one."""
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError("prompt is empty")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("messages are empty")
        use_chat = self.pair.large.is_chat if chat is None else chat
        if use_chat and not self.pair.large.is_chat:
            raise ValueError(f"model {self.pair.large.name!r} has no chat template; use chat=False (--no-chat)")
        if use_chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        else:
            if not isinstance(prompt, str):
                raise ValueError("a list of chat messages needs chat mode")
            ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ValueError("prompt encodes to no tokens")
        if self.max_context is not None and len(ids) >= self.max_context:
            raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {self.max_context} tokens")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- public generation API -----------------------------------------------------------------------------
    def generate(self, prompt: Prompt, config: BiLDConfig = BiLDConfig(), chat: bool | None = None) -> GenerationResult:
        return self.generate_ids(self.encode(prompt, chat), config)

    def generate_ids(self, prompt_ids: list[int], config: BiLDConfig = BiLDConfig()) -> GenerationResult:
        if self.pair.small is None:
            raise ValueError("BiLD needs a small model; this pair has only a large one (use vanilla)")
        return _last(self._stream(prompt_ids, config, self._bild_steps, chunks=False))

    def stream(self, prompt: Prompt, config: BiLDConfig = BiLDConfig(), chat: bool | None = None) -> Iterator[StreamChunk]:
        """Yield text once the large model has checked it; closing the iterator stops generation."""
        return self.stream_ids(self.encode(prompt, chat), config)

    def stream_ids(self, prompt_ids: list[int], config: BiLDConfig = BiLDConfig()) -> Iterator[StreamChunk]:
        if self.pair.small is None:
            raise ValueError("BiLD needs a small model; this pair has only a large one (use vanilla)")
        return self._stream(prompt_ids, config, self._bild_steps)

    def vanilla(self, prompt: Prompt, config: BiLDConfig = BiLDConfig(), chat: bool | None = None) -> GenerationResult:
        """The large model alone, one token per forward pass, through the same cache code."""
        return self.vanilla_ids(self.encode(prompt, chat), config)

    def vanilla_ids(self, prompt_ids: list[int], config: BiLDConfig = BiLDConfig()) -> GenerationResult:
        return _last(self._stream(prompt_ids, config, partial(self._single_steps, "large"), chunks=False))

    def stream_vanilla_ids(self, prompt_ids: list[int], config: BiLDConfig = BiLDConfig()) -> Iterator[StreamChunk]:
        return self._stream(prompt_ids, config, partial(self._single_steps, "large"))

    def small_only(self, prompt: Prompt, config: BiLDConfig = BiLDConfig(), chat: bool | None = None) -> GenerationResult:
        """The small model alone (a quality floor for comparisons)."""
        return self.small_only_ids(self.encode(prompt, chat), config)

    def small_only_ids(self, prompt_ids: list[int], config: BiLDConfig = BiLDConfig()) -> GenerationResult:
        if self.pair.small is None:
            raise ValueError("this pair has no small model")
        return _last(self._stream(prompt_ids, config, partial(self._single_steps, "small"), chunks=False))

    # ---- the loops -----------------------------------------------------------------------------------------
    def _stream(self, prompt_ids: list[int], config: BiLDConfig, steps, chunks: bool = True) -> Iterator[StreamChunk]:
        """Drive a step generator (which yields after every large pass) and turn final tokens into text chunks.

        chunks=False: only the closing chunk with the result (no detokenizing on the way, for non-streamed calls).
        """
        start = time.perf_counter()
        large_model = self.pair.large
        tokens = self._start_tokens(prompt_ids)
        run = _Run(tokens=tokens, output_start=len(tokens), checked=len(tokens))
        generators = _Generators(config.sampling)
        decoders: dict[str, Decoder] = {}
        emitted_ids: list[int] = []
        emitted_text = ""
        for _ in steps(run, config, generators, decoders, prompt_ids):
            if not chunks:
                continue
            final_ids = run.tokens[run.output_start : run.checked]
            text = self.decode(final_ids)
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
                continue
            new_ids = final_ids[len(emitted_ids) :]
            if new_ids:
                yield StreamChunk(text[len(emitted_text) :], new_ids, _stats(run, decoders, start))
                emitted_ids, emitted_text = list(final_ids), text
        output = run.tokens[run.output_start :]
        text = self.decode(output)
        finish: FinishReason = "stop" if output and output[-1] in self.eos_ids else "length"
        stats = _stats(run, decoders, start)
        result = GenerationResult(token_ids=output, text=text, finish_reason=finish, stats=stats)
        yield StreamChunk(text[len(emitted_text) :], output[len(emitted_ids) :], stats, result=result)

    def _start_tokens(self, prompt_ids: list[int]) -> list[int]:
        """The decoder sequence before the first new token: the prompt, or the decoder start token (enc-dec)."""
        if self.pair.large.is_encoder_decoder:
            return [self.pair.large.model.config.decoder_start_token_id]
        return list(prompt_ids)

    def _finished(self, run: _Run, config: BiLDConfig) -> bool:
        """EOS written, max_new_tokens reached, or the context is full."""
        if run.num_new and run.tokens[-1] in self.eos_ids:
            return True
        context_full = self.max_context is not None and len(run.tokens) >= self.max_context
        return run.num_new >= config.max_new_tokens or context_full

    def _decoder(self, role: str, decoders: dict[str, Decoder], prompt_ids: list[int]) -> Decoder:
        """The cached decoder of 'small' or 'large', created (and its encoder run) on first use."""
        if role not in decoders:
            loaded: LoadedModel = getattr(self.pair, role)
            encoder_ids = (torch.tensor([prompt_ids], device=input_device(loaded.model))  # (1, source_len)
                           if loaded.is_encoder_decoder else None)
            if role == "small" and loaded.make_decoders is not None:  # early exit: both sides share one cache
                decoders["small"], decoders["large"] = loaded.make_decoders(self.pair.large, encoder_ids)
            else:
                decoders[role] = CachedDecoder(loaded.model, encoder_ids, row_by_row=role == "large" and self.large_row_by_row)
        return decoders[role]

    def _single_steps(self, role, run, config, generators, decoders, prompt_ids) -> Iterator[None]:
        """Plain autoregressive decoding with one model: one forward pass per token."""
        decoder = self._decoder(role, decoders, prompt_ids)
        vocabulary = drafting_also(getattr(self.pair, role).model, tuple(prompt_ids))  # the small model's, as in BiLD
        while not self._finished(run, config):
            with vocabulary:
                logits = decoder.forward(run.tokens, keep=1)[-1]  # (vocab,)
            run.tokens.append(pick(logits, config.sampling, generators.on(logits.device)))
            run.checked = len(run.tokens)
            yield

    def _bild_steps(self, run, config, generators, decoders, prompt_ids) -> Iterator[None]:
        """Algorithm 1: small model drafts while confident; the large model checks, rolls back, writes a token.

        Yields after every large pass (when the final prefix `tokens[:checked]` may have grown).
        """
        small = self._decoder("small", decoders, prompt_ids)
        large = self._decoder("large", decoders, prompt_ids)
        adaptation = self._start_adaptation(config, prompt_ids) if config.policy == "adaptive" else None
        lookup = config.lookup_ngram
        vocabulary = drafting_also(self.pair.small.model, tuple(prompt_ids))  # drafts the prompt's tokens too
        self._plan_round(run, config, adaptation)
        while True:
            finished = self._finished(run, config)
            if finished and run.small_run == 0:
                return
            dropped = 0
            room = not finished and run.small_run < config.max_small_steps
            if room and lookup and (token := self._look_up(run, lookup)) is not None:
                self._draft(run, token, by_small=False)  # no model step: at most N drafts in a round, any cap
                continue
            # after lookup drafts, the large model checks them first: small drafts behind a wrong one would be lost
            small_drafts = sum(run.round_by_small)
            if room and small_drafts < run.draft_cap and small_drafts == run.small_run:
                with vocabulary:
                    small_logits = small.forward(run.tokens, keep=1)[-1]  # (vocab,)
                confidence = top_probability(small_logits, config.sampling)
                if not should_fall_back(confidence, small_drafts, run.fallback_threshold, run.draft_cap):
                    self._draft(run, pick(small_logits, config.sampling, generators.on(small_logits.device)))
                    continue
                run.fallbacks += 1  # the small token is dropped
                dropped = 1
            by_small = run.round_by_small  # _verify starts the next round's list
            accepted = self._large_pass(run, config, large, small, generators, finished)
            if adaptation is not None:
                self._learn(run, config, adaptation, by_small, accepted, dropped)
            self._plan_round(run, config, adaptation)
            yield

    def _draft(self, run: _Run, token: int, by_small: bool = True) -> None:
        (run.written_by_small if by_small else run.looked_up).add(len(run.tokens))
        run.tokens.append(token)
        run.small_run += 1
        run.round_by_small.append(by_small)
        if by_small:
            run.small_drafted += 1
        else:
            run.lookup_drafted += 1

    @staticmethod
    def _look_up(run: _Run, n: int) -> int | None:
        """The lookup draft after ``run.tokens`` (BiLDConfig.lookup), matched against the final prefix."""
        index_ngrams(run.lookup_index, run.tokens, run.indexed, run.checked, n)
        run.indexed = run.checked  # the final prefix only grows
        return lookup_draft(run.tokens, run.lookup_index, n)

    # ---- the adaptive policy (BiLDConfig.policy == "adaptive") ---------------------------------------------
    def _start_adaptation(self, config: BiLDConfig, prompt_ids: list[int]) -> _Adaptation:
        """Nothing seen yet: the priors alone, a quarter of N as the longest draft, alpha_FB as configured; lossless
        (alpha_RB = 0), where alpha_FB changes only the time, at most the break-even confidence of the measured costs
        (with a small model this cheap, drafts the paper's 0.6 would drop are worth checking). alpha_FB then stays
        put for the request: raising it after confident rejections made no run faster in replays (0-6% slower)."""
        if self.costs is None:
            self.costs = self.measure_costs(prompt_ids, config.max_small_steps)
        shortest, _ = self.PROBE_INTERVALS
        threshold = config.fallback_threshold
        if config.rollback_threshold == 0:
            threshold = min(threshold, break_even_confidence(self.costs))
        longest = config.max_small_steps
        return _Adaptation(cap=max(1, longest // 4), shortest_cap=cheapest_check(self.costs, longest),
                           fallback_threshold=threshold, probe_interval=shortest)

    def _plan_round(self, run: _Run, config: BiLDConfig, adaptation: _Adaptation | None) -> None:
        """Set the next round's draft cap and alpha_FB: under the adaptive policy, the cap (up to the one the
        evidence allows) with the most expected tokens per unit of cost given the acceptance and confidence seen so
        far; 0 (the large model alone) when no cap beats one token per large pass at a cautious acceptance
        (CAUTION), but a one-token probe after every ``probe_interval`` such passes."""
        if adaptation is None:
            run.draft_cap, run.fallback_threshold = config.max_small_steps, config.fallback_threshold
            return
        weight = self.PRIOR_WEIGHT
        seen = adaptation.accepted, adaptation.rejected, self.ACCEPTANCE_PRIOR, weight
        confidence = estimated_rate(adaptation.confident, adaptation.unsure, self.CONFIDENCE_PRIOR, weight)
        run.draft_cap = best_draft_cap(estimated_rate(*seen), confidence, self.costs, adaptation.cap)
        cautious = rate_lower_bound(*seen, self.CAUTION)
        if run.draft_cap and not best_draft_cap(cautious, confidence, self.costs, run.draft_cap):
            run.draft_cap = 0
        adaptation.probing = run.draft_cap == 0 and adaptation.passes_alone >= adaptation.probe_interval
        if adaptation.probing:
            run.draft_cap = 1
        run.fallback_threshold = adaptation.fallback_threshold

    def _adapt(self, run: _Run, config: BiLDConfig, adaptation: _Adaptation, checked: int, accepted: int,
               dropped: int) -> None:
        """Learn from one round: `checked` drafts went to the large model and the first `accepted` of them stayed;
        `dropped` (0 or 1) small steps ended in a fallback, their token thrown away."""
        if run.draft_cap == 0:
            adaptation.passes_alone += 1
            return
        adaptation.accepted += accepted
        adaptation.rejected += accepted < checked
        # confidence is counted on the large model's text only: the steps after a rejected draft continued from a
        # wrong token, where the small model is less sure than it would be on the right one
        adaptation.confident += min(checked, accepted + 1)
        adaptation.unsure += dropped if accepted == checked else 0
        if adaptation.probing:
            shortest, longest = self.PROBE_INTERVALS
            paid = checked > 0 and accepted == checked
            adaptation.probe_interval = next_probe_interval(adaptation.probe_interval, paid, shortest, longest)
        adaptation.passes_alone = 0
        adaptation.cap = next_draft_cap(adaptation.cap, checked, accepted, config.max_small_steps,
                                        adaptation.shortest_cap)

    def _learn(self, run: _Run, config: BiLDConfig, adaptation: _Adaptation, by_small: list[bool], accepted: int,
               dropped: int) -> None:
        """_adapt from the small model's drafts alone (lookup drafts cost no small step, the cap is not theirs):
        by_small[i] says whether draft i of the round came from the small model; the first ``accepted`` stayed."""
        if run.draft_cap and not any(by_small) and not dropped:
            return  # lookup drafts filled the round: nothing learnt about the small model (a probe stays due)
        judged = by_small[: accepted + 1]  # the first rejected draft was judged too, the ones after it were not
        self._adapt(run, config, adaptation, sum(judged), sum(by_small[:accepted]),
                    dropped if accepted == len(by_small) else 0)

    def _large_pass(self, run: _Run, config: BiLDConfig, large: Decoder, small: Decoder, generators: _Generators,
                    finished: bool) -> int:
        """_verify, with the round's policy values counted for the statistics."""
        run.cap_sum += run.draft_cap
        run.threshold_sum += run.fallback_threshold
        run.policy_passes += 1
        return self._verify(run, config, large, small, generators, finished)

    def measure_costs(self, prompt_ids: list[int], longest: int, repeats: int = 3) -> DraftCosts:
        """Median time (of ``repeats``, after one untimed round in which lazily prepared kernels prepare) of a draft
        step as the loop takes it (a small-model step, its confidence and its pick) and of a large pass over 1, 2,
        3, 4, 6, 8, ... and ``longest + 1`` tokens (the widths between interpolated), after the prompt's prefill.
        Throwaway caches."""
        decoders: dict[str, Decoder] = {}
        small = self._decoder("small", decoders, prompt_ids)
        large = self._decoder("large", decoders, prompt_ids)
        tokens = self._start_tokens(prompt_ids)
        small.forward(tokens, keep=1)
        large.forward(tokens, keep=1)
        base, filler, greedy = len(tokens), tokens[-1], SamplingConfig()

        def draft_step() -> float:
            start = time.perf_counter()
            logits = small.forward(tokens[:base] + [filler], keep=1)[-1]  # (vocab,)
            top_probability(logits, greedy)
            pick(logits, greedy, None)
            small.crop(base)
            return time.perf_counter() - start

        def large_pass(width: int) -> float:
            before = large.time_s
            large.forward(tokens[:base] + [filler] * width, keep=width)
            large.crop(base)
            return large.time_s - before

        widths = sorted({w for w in MEASURED_WIDTHS if w <= longest} | {longest + 1})
        samples: dict[int, list[float]] = {width: [] for width in [0, *widths]}  # 0: the draft step
        for round_index in range(repeats + 1):
            timed = {0: draft_step(), **{width: large_pass(width) for width in widths}}
            if round_index:  # the first round is the warm-up
                for width, value in timed.items():
                    samples[width].append(value)
        medians = {width: statistics.median(values) for width, values in samples.items()}
        table = numpy.interp(range(1, longest + 2), widths, [medians[width] for width in widths])
        one_s, wide_s = medians[1], medians[longest + 1]
        per_token = max(0.0, (wide_s - one_s) / longest) if longest else 0.0
        costs = DraftCosts(small_step=medians[0], large_base=one_s, large_per_token=per_token,
                           large_passes=tuple(float(seconds) for seconds in table))
        logger.info("adaptive policy: measured %s", costs)
        return costs

    def _verify(self, run, config, large: Decoder, small: Decoder, generators: _Generators, finished: bool) -> int:
        """One non-autoregressive large pass over every token it has not seen; then roll back or append.

        Returns how many of the drafts since the last pass the large model accepted (all of them, or the rollback's
        index)."""
        first_draft = len(run.tokens) - run.small_run  # position of the first unchecked small token
        assert large.seen <= first_draft - 1, "the large model must not have seen the drafts it checks"
        # rows: the large model's predictions for each draft token, then for the token after the last one
        large_logits = large.forward(run.tokens, keep=run.small_run + 1)  # (small_run + 1, vocab)
        draft_rows = large_logits[:-1]  # (small_run, vocab)
        drafts = torch.tensor(run.tokens[first_draft:], dtype=torch.long, device=draft_rows.device)  # (small_run,)
        strict = None
        flags = [False] * run.small_run
        if config.repeat_ngram:  # drafts that repeat an n-gram of the output are checked as if alpha_RB were 0
            flags = self._repeats(run, first_draft, config.repeat_ngram)
        # ... and so are lookup drafts
        flags = [flag or not by_small for flag, by_small in zip(flags, run.round_by_small)]
        if any(flags):
            strict = torch.tensor(flags, dtype=torch.bool, device=draft_rows.device)
        generator = generators.on(large_logits.device)
        rollback = find_rollback(draft_rows, drafts, config.rollback_threshold, config.sampling, generator, strict)
        accepted = run.small_run if rollback is None else rollback.index
        if rollback is not None:
            position = first_draft + rollback.index
            thrown = set(range(position, len(run.tokens)))
            run.discarded += len(thrown & run.written_by_small)
            run.written_by_small -= thrown
            run.looked_up -= thrown
            del run.tokens[position:]
            run.tokens.append(rollback.replacement)
            large.crop(position)
            small.crop(position)
            run.rollbacks += 1
        elif not finished:
            run.tokens.append(pick(large_logits[-1], config.sampling, generator))
        run.small_run = 0
        run.round_by_small = []
        run.checked = len(run.tokens)
        return accepted

    @staticmethod
    def _repeats(run: _Run, first_draft: int, n: int) -> list[bool]:
        """repeated_ngrams for the drafts. The final prefix only grows (rollbacks never reach before the first
        draft), so its n-grams are kept in the run and each pass adds only the new ones."""
        output = run.tokens[run.output_start :]
        first = first_draft - run.output_start
        for position in range(max(run.ngrams_before, n - 1), first):
            run.output_ngrams.add(ngram_ending_at(output, position, n))
        run.ngrams_before = max(run.ngrams_before, first)
        return repeated_ngrams(output, first, n, run.output_ngrams)


class _Generators:
    """The sampling generators of one run: one per device that logits come from (a torch.Generator draws on its own
    device only), each seeded with the run's seed; None when greedy. Both models on one device share one."""

    def __init__(self, sampling: SamplingConfig) -> None:
        self.sampling = sampling
        self.by_device: dict[torch.device, torch.Generator | None] = {}

    def on(self, device: torch.device) -> torch.Generator | None:
        if device not in self.by_device:
            self.by_device[device] = make_generator(self.sampling, device)
        return self.by_device[device]


def _stats(run: _Run, decoders: dict[str, Decoder], start: float) -> GenerationStats:
    """The statistics of a run so far (called where every output token is final)."""
    small, large = decoders.get("small"), decoders.get("large")
    new_tokens = run.num_new
    return GenerationStats(
        new_tokens=new_tokens,
        small_tokens_kept=len(run.written_by_small),
        large_tokens=new_tokens - len(run.written_by_small),
        small_tokens_drafted=run.small_drafted,
        tokens_discarded=run.discarded,
        large_passes=large.calls if large else 0,
        fallbacks=run.fallbacks,
        rollbacks=run.rollbacks,
        small_steps=small.calls if small else 0,
        mean_draft_cap=run.cap_sum / run.policy_passes if run.policy_passes else 0.0,
        mean_fallback_threshold=run.threshold_sum / run.policy_passes if run.policy_passes else 0.0,
        small_time_s=small.time_s if small else 0.0,
        large_time_s=large.time_s if large else 0.0,
        wall_time_s=time.perf_counter() - start,
        lookup_tokens_kept=len(run.looked_up),
        lookup_tokens_drafted=run.lookup_drafted,
    )


def _on_cpu(model: torch.nn.Module) -> bool:
    return {device.type for device in model_devices(model)} == {"cpu"}


def _context_length(loaded: LoadedModel) -> int | None:
    """The decoder's position limit, or None for models with relative positions (T5)."""
    return getattr(loaded.model.config, "max_position_embeddings", None)


def _last(chunks: Iterator[StreamChunk]) -> GenerationResult:
    result = None
    for chunk in chunks:
        result = chunk.result
    assert result is not None, "the stream always ends with a result chunk"
    return result
