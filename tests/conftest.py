"""Tiny seeded models built from configs, with an offline word-level tokenizer: tests run in seconds, no network."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from bild.models import LoadedModel, ModelPair
from bild.policies import DraftCosts

torch.set_num_threads(1)  # tiny matrices: one thread is faster, and steadier on a busy 2-core machine

VOCAB = 96  # ids 0-3 are special: <pad> <eos> <bos> <unk>; the rest are words w4 ... w95


def tiny_tokenizer(vocab_size: int = VOCAB, with_eos: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>" if with_eos else None,
        bos_token="<bos>",
        unk_token="<unk>",
    )


def tiny_llama(seed: int, layers: int = 2, hidden: int = 64, vocab_size: int = VOCAB, eos: int | None = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,  # peaky distributions, so confidence varies and rollbacks happen
        bos_token_id=2,
        eos_token_id=eos,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model


def tiny_t5(seed: int, layers: int = 2, d_model: int = 64, vocab_size: int = VOCAB, eos: int | None = 1) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=eos if eos is not None else 1,
        initializer_factor=2.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos
    return model


def tiny_bart(seed: int, layers: int = 2, d_model: int = 64, vocab_size: int = VOCAB, eos: int | None = 1) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=512,
        decoder_start_token_id=2,
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=eos if eos is not None else 1,
        forced_eos_token_id=None,
        init_std=0.5,
    )
    model = BartForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.forced_eos_token_id = None
    model.generation_config.forced_bos_token_id = None
    return model


def loaded(name: str, model, tokenizer) -> LoadedModel:
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, is_encoder_decoder=bool(model.config.is_encoder_decoder), is_chat=False
    )


BUILDERS = {"llama": tiny_llama, "t5": tiny_t5, "bart": tiny_bart}


def noisy_copy(model, seed: int, noise: float):
    """A copy of `model` with Gaussian noise on every weight: it agrees with the original often, not always."""
    torch.manual_seed(seed)
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copy_.parameters():
            parameter.add_(torch.randn_like(parameter) * noise * parameter.std().clamp(min=1e-3))
    return copy_


def make_pair(family: str, with_eos: bool = False, same: bool = False, noise: float = 0.1) -> ModelPair:
    """A large model (3 layers) and a small one that agrees with it part of the time, sharing the tiny vocabulary."""
    build = BUILDERS[family]
    eos = 1 if with_eos else None
    tokenizer = tiny_tokenizer(with_eos=with_eos)
    large = build(seed=1, layers=3, eos=eos)
    small = large if same else noisy_copy(large, seed=2, noise=noise)
    return ModelPair(large=loaded(f"{family}-large", large, tokenizer), small=loaded(f"{family}-small", small, tokenizer))


def prompt_ids(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, VOCAB, (length - 1,), generator=generator).tolist()


@pytest.fixture(params=["llama", "t5", "bart"])
def family(request) -> str:
    return request.param


def watch_large_passes(monkeypatch, on_pass) -> None:
    """Call on_pass(run, large, small, rolled_back) after every large pass of any BiLD engine (a test probe)."""
    from bild.decoding import BiLD

    original_verify = BiLD._verify

    def verify_and_watch(self, run, config, large, small, generator, finished):
        before = run.rollbacks
        accepted = original_verify(self, run, config, large, small, generator, finished)
        on_pass(run, large, small, run.rollbacks > before)
        return accepted

    monkeypatch.setattr(BiLD, "_verify", verify_and_watch)


# What the adaptive policy assumes a small step and a large pass cost in the tests, instead of measuring them: a
# drafter a tenth as costly as the large model, as on real pairs (the tiny test models cost about the same as each
# other). Fixed costs keep every test independent of the clock; a test that wants other costs passes its own.
TEST_COSTS = DraftCosts(small_step=0.1, large_base=1.0, large_per_token=0.02)


@pytest.fixture(autouse=True)
def clock_free_costs(monkeypatch):
    from bild.decoding import BiLD

    monkeypatch.setattr(BiLD, "measure_costs", lambda self, prompt_ids, longest, repeats=3: TEST_COSTS)


def save_pair(directory, family: str = "llama", with_eos: bool = False, dtype: torch.dtype = torch.float32):
    """make_pair's models saved as checkpoints (``directory``/large, ``directory``/small), in ``dtype``, for the
    code paths that load from disk: the CLI, load_pair and the benchmarks' scripts. Returns (large_dir, small_dir)."""
    pair = make_pair(family, with_eos=with_eos)
    paths = []
    for role in ("large", "small"):
        loaded_model = getattr(pair, role)
        path = directory / role
        loaded_model.model.to(dtype).save_pretrained(path)
        loaded_model.tokenizer.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory):
    """A tiny Llama pair on disk (float32): (large_dir, small_dir)."""
    return save_pair(tmp_path_factory.mktemp("llama-pair"))
