"""Early exit: the shared-cache decoders equal the full model, alpha_RB = 0 equals greedy, rollbacks crop every part
once, and no position goes through the lower layers twice."""

from __future__ import annotations

import pytest
import torch

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.drafters.early_exit import EarlyExitModel, early_exit_model, make_exit_block, shared_decoders
from bild.models import ModelLoadError, ModelPair, load_model

from conftest import loaded, make_pair, prompt_ids, tiny_llama, tiny_tokenizer, watch_large_passes
from test_decoding import hf_greedy

LAYERS = 4


def damped_llama(seed: int = 1, damp: float = 0.25):
    """A tiny Llama whose upper layers (2, 3) change the residual stream little: the exit after layer 2 agrees with
    the full model often, not always, so BiLD goes through many accepts, fallbacks and rollbacks."""
    model = tiny_llama(seed=seed, layers=LAYERS, eos=None)
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    return model


def early_exit_pair(exit_layer: int = 2, block: bool = False, int8_head: bool = False) -> ModelPair:
    large = loaded("llama-large", damped_llama(), tiny_tokenizer(with_eos=False))
    exit_block = make_exit_block(large.model, LAYERS - 1) if block else None
    model = EarlyExitModel(large.model, exit_layer, exit_block)
    if int8_head:
        model.use_int8_head()
    return ModelPair(large=large, small=early_exit_model(large, model, "exit"))


@pytest.fixture(params=[False, True], ids=["bare-exit", "exit-block"])
def block(request) -> bool:
    return request.param


def test_shared_cache_logits_equal_full_model(block):
    """Any interleaving of draft steps, large passes and crops gives the full model's own logits (and the exit's)."""
    pair = early_exit_pair(block=block)
    model = pair.small.model
    ids = prompt_ids(3, 40)
    with torch.no_grad():
        full_reference = pair.large.model(torch.tensor([ids])).logits[0]  # (40, vocab)
        draft_reference = model(torch.tensor([ids])).logits[0]
    draft, full = shared_decoders(model)
    schedule = [("full", 5), ("draft", 6), ("draft", 7), ("full", 9), ("crop", 6), ("draft", 8), ("full", 12),
                ("draft", 13), ("crop", 10), ("full", 11), ("draft", 15), ("draft", 16), ("full", 16), ("draft", 40),
                ("full", 40)]
    for action, length in schedule:
        if action == "crop":
            full.crop(length)
            draft.crop(length)
            continue
        decoder, reference = (full, full_reference) if action == "full" else (draft, draft_reference)
        start = decoder.seen
        logits = decoder.forward(ids[:length])
        torch.testing.assert_close(logits, reference[start:length], rtol=1e-4, atol=1e-4)
        _assert_invariants(draft.stack)


def _assert_invariants(stack) -> None:
    k = stack.k
    assert stack.upper_len <= stack.lower_len and stack.exit_len <= stack.lower_len
    assert stack.hidden.shape[1] == stack.lower_len
    for index, layer in enumerate(stack.cache.layers):
        assert layer.get_seq_length() == (stack.lower_len if index < k else stack.upper_len), index
    if stack.exit_cache is not None:
        assert stack.exit_cache.get_seq_length() == stack.exit_len


@pytest.mark.parametrize("fallback_threshold,int8_head", [(0.0, False), (0.4, False), (0.4, True)])
def test_lossless_equals_large_greedy(block, fallback_threshold, int8_head):
    pair = early_exit_pair(block=block, int8_head=int8_head)
    engine = BiLD(pair)
    rollbacks = kept = 0
    for seed in range(8):
        ids = prompt_ids(seed, length=3 + 3 * seed)
        for max_new in (1, 9, 40):
            config = BiLDConfig(fallback_threshold=fallback_threshold, rollback_threshold=0.0, max_new_tokens=max_new)
            result = engine.generate_ids(ids, config)
            assert result.token_ids == hf_greedy(pair, ids, max_new), (seed, max_new)
            rollbacks += result.stats.rollbacks
            kept += result.stats.small_tokens_kept
    assert rollbacks > 5 and kept > 20, "the test must go through many accepted drafts and rollbacks"


def _count_tokens(layer: torch.nn.Module, counts: list[int]):
    return layer.register_forward_hook(lambda module, args, output: counts.append(output.shape[1]))


def test_no_position_through_the_lower_layers_twice():
    """Layer 0 (shared) and layer k (large only) each see a position once, unless a rollback cropped it: their
    token counts equal the final cached length plus the tokens the rollbacks discarded."""
    pair = early_exit_pair()
    engine = BiLD(pair)
    stacks = []
    original = pair.small.make_decoders

    def keep_stack(large, encoder_ids):
        decoders = original(large, encoder_ids)
        stacks.append(decoders[0].stack)
        return decoders

    object.__setattr__(pair.small, "make_decoders", keep_stack)  # LoadedModel is frozen
    discarded = 0
    for seed in range(5):
        lower, upper = [], []
        hooks = [_count_tokens(pair.large.model.model.layers[0], lower), _count_tokens(pair.large.model.model.layers[2], upper)]
        ids = prompt_ids(seed, 6 + seed)
        result = engine.generate_ids(ids, BiLDConfig(fallback_threshold=0.3, rollback_threshold=0.5, max_new_tokens=30))
        for hook in hooks:
            hook.remove()
        stack = stacks[-1]
        s = result.stats
        thrown = s.tokens_discarded + s.lookup_tokens_drafted - s.lookup_tokens_kept  # small and lookup drafts
        assert sum(lower) == stack.lower_tokens == stack.lower_len + thrown
        assert sum(upper) == stack.upper_tokens == stack.upper_len + thrown
        assert stack.lower_len >= len(ids) + result.stats.new_tokens - 1  # every position, at most once per life
        discarded += result.stats.tokens_discarded
    assert discarded > 5, "rollbacks must have happened"


def test_rollback_crops_every_part_once(block, monkeypatch):
    pair = early_exit_pair(block=block)
    engine = BiLD(pair)
    checked = []

    def check(run, large, small, rolled_back):
        _assert_invariants(large.stack)
        if rolled_back:
            position = len(run.tokens) - 1  # everything after the replacement token was cropped
            assert large.seen == position and large.stack.lower_len == position
            assert small.seen <= position
            checked.append(position)

    watch_large_passes(monkeypatch, check)
    for seed in range(4):
        engine.generate_ids(prompt_ids(seed, 6), BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.5, max_new_tokens=30))
    assert len(checked) >= 3


def test_small_only_and_vanilla_paths(block):
    pair = early_exit_pair(block=block)
    engine = BiLD(pair)
    ids = prompt_ids(1, 8)
    config = BiLDConfig(max_new_tokens=12)
    assert engine.vanilla_ids(ids, config).token_ids == hf_greedy(pair, ids, 12)
    small = engine.small_only_ids(ids, config).token_ids
    with torch.no_grad():
        tokens = list(ids)
        for _ in range(12):
            tokens.append(int(pair.small.model(torch.tensor([tokens])).logits[0, -1].argmax()))
    assert small == tokens[len(ids) :]


def test_early_exit_names():
    large = loaded("llama-large", damped_llama(), tiny_tokenizer(with_eos=False))
    small = load_model("early-exit:3", large=large)
    assert small.name == "early-exit:3" and small.model.exit_layer == 3 and small.make_decoders is not None
    with pytest.raises(ModelLoadError, match="1..3"):
        load_model("early-exit:4", large=large)
    with pytest.raises(ModelLoadError, match="integer"):
        load_model("early-exit:x", large=large)
    other = loaded("other", damped_llama(seed=5), large.tokenizer)
    with pytest.raises(ValueError, match="early exit of"):
        BiLD(ModelPair(large=other, small=small)).generate_ids([2, 5, 6], BiLDConfig(max_new_tokens=3))


def test_encoder_decoder_models_are_refused():
    pair = make_pair("t5")
    with pytest.raises(ModelLoadError, match="Llama-style"):
        load_model("early-exit:1", large=pair.large)


def test_keep_returns_the_last_rows(block):
    pair = early_exit_pair(block=block)
    ids = prompt_ids(4, 20)
    draft, full = shared_decoders(pair.small.model)
    every = full.forward(ids[:10])
    draft.forward(ids[:10])
    full.crop(4)
    torch.testing.assert_close(full.forward(ids[:10], keep=2), every[-2:], rtol=1e-4, atol=1e-4)
    assert draft.seen == 4  # one crop cut the shared stack for both sides
    assert draft.forward(ids[:13], keep=20).shape == (9, pair.large.model.config.vocab_size)


def test_eval_method_uses_the_pairs_early_exit():
    from bild.eval.harness import evaluate
    from test_eval import tiny_dataset

    pair = early_exit_pair(block=True)
    config = BiLDConfig(max_new_tokens=12, fallback_threshold=0.3, rollback_threshold=0.0)
    result = evaluate(pair, tiny_dataset(3), ["bild-early-exit"], config, warmup=0)
    summary = result.summaries["bild-early-exit"]
    assert summary.exact_match == 1.0 and summary.tokens_per_large_pass > 1.0


@pytest.mark.slow
def test_shipped_exit_round_trip_and_lossless_on_real_weights(tmp_path):
    from bild.drafters.early_exit import ExitSpec, load_exit, save_exit

    large = load_model("smollm2-135m-instruct")
    model = EarlyExitModel(large.model, 4, make_exit_block(large.model, 29))
    save_exit(model, ExitSpec(4, 29), {}, tmp_path)
    assert (tmp_path / "early-exit.safetensors").stat().st_size < 8e6  # one decoder layer in fp16
    rebuilt = load_exit(large, weights_dir=tmp_path)
    assert rebuilt.model.large is large.model and rebuilt.model.exit_layer == 4
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.model(ids).logits, model(ids).logits, atol=0.05, rtol=0.0)  # fp16 storage
    engine = BiLD(ModelPair(large=large, small=rebuilt))
    prompt = engine.encode("Explain what a hash table is used for.")
    config = BiLDConfig(fallback_threshold=0.3, rollback_threshold=0.0, max_new_tokens=24)
    assert engine.generate_ids(prompt, config).token_ids == engine.vanilla_ids(prompt, config).token_ids
