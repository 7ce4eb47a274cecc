"""The only code that touches KV caches, and the `Decoder` interface the BiLD loop drives.

A `Decoder` is what the loop calls for one side of the pair (the small or the large model). `CachedDecoder` implements
it for an ordinary model; drafters that share the large model's cache (early exit) bring their own implementations.
A `CachedDecoder` wraps one model's decoder and its cache. Invariant: the cache holds exactly the first
`seen` tokens of the sequence being generated (`cache length == seen`), so a forward call feeds only
`tokens[seen:]` and no token is ever computed twice. A rollback crops the cache back to a shorter prefix.
Encoder-decoder models run their encoder once, when the decoder is created.

Devices: input ids are made on the device of the model's input embedding (its first device when a device map
spreads it over several), and logits come back as float32 on the device of its output layer. The model is never
moved.
"""

from __future__ import annotations

import inspect
import time
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from bild.devices import input_device, synchronize


@runtime_checkable
class Decoder(Protocol):
    """One model's view of the sequence being generated, with a KV cache. Invariant: ``seen`` tokens are cached."""

    time_s: float  # seconds spent in this decoder's forward passes
    calls: int  # forward passes so far

    @property
    def seen(self) -> int:
        """How many tokens of the sequence the cache holds."""
        ...

    def forward(self, tokens: list[int], keep: int | None = None) -> torch.Tensor:
        """Feed ``tokens[seen:]``; return next-token logits (min(keep, new), vocab) for the last ``keep`` of them."""
        ...

    def crop(self, length: int) -> None:
        """Forget every cached token from position ``length`` on (a rollback)."""
        ...

    def cache_length(self) -> int:
        """Tokens the underlying cache really holds (== ``seen``: the invariant tests check)."""
        ...


class CachedDecoder:
    """:class:`Decoder` for an ordinary Hugging Face model: its own cache, created on the first call."""

    def __init__(self, model: PreTrainedModel, encoder_input_ids: torch.Tensor | None = None,
                 row_by_row: bool = False) -> None:
        """encoder_input_ids: (1, source_len) for encoder-decoder models, None for decoder-only models.

        row_by_row: feed the positions whose logits are read one at a time, as single-token steps would (after one
        block up to the first of them, as a prompt's prefill is): for a model whose kernels give a row of a block a
        result that differs in the last bits from the row computed alone (16-bit attention that bild.cpu cannot
        switch), so that a check of k drafts sees exactly what k single steps see."""
        self.model = model
        self.row_by_row = row_by_row
        self.device = input_device(model)  # where input ids go (a device-mapped model's first device)
        self.cache = None  # created by the model on its first call (DynamicCache / EncoderDecoderCache)
        self.seen = 0
        self.time_s = 0.0  # time spent in this model's forward passes (encoder included)
        self.calls = 0
        self.encoder_outputs = None
        # models that can skip the output layer for positions whose logits nobody reads (most, not T5)
        self.can_trim_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if model.config.is_encoder_decoder:
            if encoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs encoder input ids")
            start = time.perf_counter()
            with torch.inference_mode():
                self.encoder_outputs = model.get_encoder()(input_ids=encoder_input_ids.to(self.device))
            self.time_s += time.perf_counter() - start

    @torch.inference_mode()
    def forward(self, tokens: list[int], keep: int | None = None) -> torch.Tensor:
        """Feed tokens[seen:] and return next-token logits for the last `keep` of them (all when None).

        Returns (min(keep, new), vocab). Skipping unread positions (a long prompt's) saves the output layer's cost.
        """
        new = tokens[self.seen :]
        if not new:
            raise ValueError("no new tokens to feed: the cache already holds the whole sequence")
        keep = len(new) if keep is None else min(keep, len(new))
        start = time.perf_counter()
        if self.row_by_row and keep > 1:
            block = len(new) - keep + 1  # up to the first position read, then one position at a time
            rows = [self._feed(new[:block], 1)] + [self._feed([token], 1) for token in new[block:]]
            logits = torch.cat(rows)  # (keep, vocab)
        else:
            logits = self._feed(new, keep)
        self.seen = len(tokens)
        synchronize(logits.device)  # honest timing on asynchronous devices
        self.time_s += time.perf_counter() - start
        self.calls += 1
        return logits

    def _feed(self, new: list[int], keep: int) -> torch.Tensor:
        """One model call on ``new`` after the cache; logits (keep, vocab) of its last ``keep`` positions."""
        input_ids = torch.tensor([new], dtype=torch.long, device=self.device)  # (1, new)
        trim = {"logits_to_keep": keep} if self.can_trim_logits else {}
        if self.encoder_outputs is not None:
            out = self.model(
                encoder_outputs=self.encoder_outputs, decoder_input_ids=input_ids, cache=self.cache, use_cache=True, **trim
            )
        else:
            out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, **trim)
        self.cache = out.cache
        return out.logits[0, -keep:].float()  # (keep, vocab), on the output layer's device

    def crop(self, length: int) -> None:
        """Forget every cached token from position `length` on (a rollback); keeps the invariant cache == seen."""
        if length >= self.seen:
            return
        self.cache.crop(-(self.seen - length))  # transformers 5: a negative count of tokens to remove
        self.seen = length

    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()
