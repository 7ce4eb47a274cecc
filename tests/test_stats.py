"""The statistics add up on a scripted pair whose every decision is known in advance."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.models import LoadedModel, ModelPair

from conftest import tiny_tokenizer

VOCAB = 64


class ScriptedCache:
    """Stands in for a KV cache: it only counts the tokens it holds."""

    def __init__(self) -> None:
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove < 0
        self.length += tokens_to_remove


class ScriptedLM(torch.nn.Module):
    """A "model" whose next-token logits depend only on the current token: row `token` of `table`."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)  # (vocab, vocab)
        self.config = SimpleNamespace(is_encoder_decoder=False, max_position_embeddings=1024)
        self.generation_config = SimpleNamespace(eos_token_id=None)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def forward(self, input_ids: torch.Tensor, cache=None, use_cache: bool = True):
        cache = cache or ScriptedCache()
        cache.length += input_ids.shape[1]
        return SimpleNamespace(logits=self.table[input_ids], cache=cache)  # (1, new, vocab)


def successor_table() -> torch.Tensor:
    """Confidently predicts token + 1 (probability about 0.997)."""
    table = torch.zeros(VOCAB, VOCAB)
    table[torch.arange(VOCAB), (torch.arange(VOCAB) + 1) % VOCAB] = 10.0
    return table


def scripted_pair() -> ModelPair:
    large = successor_table()
    small = successor_table()
    small[10] = 0.0
    small[10, 40] = 10.0  # after 10 the small model confidently writes 40 (the large model wants 11)
    small[12] = 0.0  # after 12 the small model is unsure: uniform, top-1 probability 1/64
    tokenizer = tiny_tokenizer(vocab_size=VOCAB, with_eos=False)

    def wrap(name: str, table: torch.Tensor) -> LoadedModel:
        return LoadedModel(name=name, model=ScriptedLM(table), tokenizer=tokenizer, is_encoder_decoder=False, is_chat=False)

    return ModelPair(large=wrap("large", large), small=wrap("small", small))


def test_statistics_of_a_scripted_run():
    # prompt [5], N = 3:
    #   small drafts 6 7 8 (N reached) -> large pass 1 accepts them, writes 9
    #   small drafts 10 40 41 (N reached) -> large pass 2 rolls back 40 (NLL ~10 > 1), writes 11, discards 40 41
    #   small drafts 12, then is unsure after 12 -> fallback, large pass 3 accepts 12, writes 13 -> 8 new tokens
    engine = BiLD(scripted_pair())
    config = BiLDConfig(fallback_threshold=0.5, rollback_threshold=1.0, max_small_steps=3, max_new_tokens=8, policy="fixed")
    result = engine.generate_ids([5], config)
    assert result.token_ids == [6, 7, 8, 9, 10, 11, 12, 13]
    stats = result.stats
    assert (stats.small_tokens_kept, stats.large_tokens) == (5, 3)
    assert stats.small_tokens_drafted == 7 and stats.tokens_discarded == 2
    assert stats.small_tokens_drafted == stats.small_tokens_kept + stats.tokens_discarded
    assert stats.new_tokens == stats.small_tokens_kept + stats.large_tokens == 8
    assert (stats.large_passes, stats.fallbacks, stats.rollbacks) == (3, 1, 1)
    assert result.finish_reason == "length"
    assert 0 < stats.small_time_s + stats.large_time_s <= stats.wall_time_s


def test_without_rollback_the_wrong_token_stays():
    engine = BiLD(scripted_pair())
    config = BiLDConfig(fallback_threshold=0.5, rollback_threshold=float("inf"), max_small_steps=3, max_new_tokens=8, policy="fixed")
    result = engine.generate_ids([5], config)
    assert result.token_ids == [6, 7, 8, 9, 10, 40, 41, 42]
    assert result.stats.rollbacks == 0 and result.stats.tokens_discarded == 0
    assert (result.stats.small_tokens_kept, result.stats.large_passes) == (6, 2)  # 42 is the large model's


def test_small_eos_is_checked_before_generation_ends():
    """A confident small-model EOS is verified by the large model; here the large model rejects it."""
    pair = scripted_pair()
    pair.small.model.table[7] = 0.0
    pair.small.model.table[7, 63] = 10.0  # the small model ends the text after 7
    pair.small.model.generation_config.eos_token_id = 63
    pair.large.model.generation_config.eos_token_id = 63
    engine = BiLD(pair)
    config = BiLDConfig(fallback_threshold=0.5, rollback_threshold=1.0, max_small_steps=10, max_new_tokens=6, policy="fixed")
    result = engine.generate_ids([5], config)
    # 6 7 <eos> -> rolled back to 8; 9 10 40 (length reached) -> rolled back to 11
    assert result.token_ids == [6, 7, 8, 9, 10, 11]
    assert result.stats.rollbacks == 2 and result.finish_reason == "length"


def looping_pair() -> ModelPair:
    """The scripted pair, but after 9 the small model confidently goes back to 6 (a loop 6 7 8 9 6 7 8 9 ...)."""
    pair = scripted_pair()
    small = successor_table()
    small[9] = 0.0
    small[9, 6] = 10.0
    pair.small.model.table.copy_(small)
    return pair


def test_repeat_guard_rolls_back_a_loop_the_large_model_would_leave():
    engine = BiLD(looping_pair())
    loose = BiLDConfig(fallback_threshold=0.5, rollback_threshold=float("inf"), max_small_steps=10, max_new_tokens=14,
                       repeat_ngram=0, policy="fixed")
    assert engine.generate_ids([5], loose).token_ids == [6, 7, 8, 9] * 3 + [6, 7]
    # the guard (bigrams): 6 7 8 9 | 6 7 8 9 repeat bigrams the large model also picks, so they stay; the third 6
    # repeats (9, 6), which the large model would not write: rolled back to 10 (the 7 after it is discarded too)
    result = engine.generate_ids([5], replace(loose, repeat_ngram=2))
    assert result.token_ids == [6, 7, 8, 9, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert (result.stats.rollbacks, result.stats.tokens_discarded) == (1, 2)
