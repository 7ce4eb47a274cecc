"""Devices and dtypes: placements are checked, models load where they are asked to and are never moved, and BiLD at
alpha_RB = 0 gives exactly the large model's greedy output in every dtype."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from bild.cli import main
from bild.config import BiLDConfig, SamplingConfig
from bild.cpu import CPU_ATTENTION, RowInvariantLinear, SmallBatchLinear, cpu_sdpa_attention, use_cpu_kernels
from bild.decoding import BiLD
from bild.devices import Placement, PlacementError, input_device, model_devices, placement, resolve_device
from bild.drafters.early_exit import untrained_exit
from bild.drafters.quantize import int8_drafting_applies
from bild.models import DEFAULT_LARGE, LoadedModel, ModelPair, check_follows_large, load_model, load_pair

from conftest import loaded, make_pair, prompt_ids, save_pair, tiny_llama, tiny_tokenizer

LOW_PRECISION = [torch.bfloat16, torch.float16]
NO_CUDA = not torch.cuda.is_available()


# ---- placements ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only answers")
def test_auto_is_the_cpu_in_float32_here():
    where = placement()
    assert where.device == torch.device("cpu") and where.dtype == "auto" and where.load_dtype == torch.float32
    assert placement("cpu", "bfloat16").load_dtype == torch.bfloat16
    assert placement(device_map="auto").load_dtype == torch.float32  # accelerate finds no GPU: all on the CPU
    assert Placement(device=torch.device("cuda", 0)).load_dtype == "auto"  # a GPU: the checkpoint's own dtype


@pytest.mark.parametrize("device, dtype, device_map, message", [
    ("cuda", "auto", None, "CUDA is not available"),
    ("cuda:1", "auto", None, "CUDA is not available"),
    ("mps", "auto", None, "MPS backend"),
    ("tpu", "auto", None, "--device must be auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "auto", None, "--device must be"),
    ("cpu", "float64", None, "--dtype must be auto, float32, bfloat16, float16"),
    ("cpu", "auto", "auto", "--device-map chooses the devices itself"),
    ("auto", "auto", "balanced", "--device-map must be 'auto'"),
])
def test_impossible_placements_are_named(device, dtype, device_map, message):
    if device.startswith("cuda") and not NO_CUDA or device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    with pytest.raises(PlacementError, match=message):
        placement(device, dtype, device_map)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--device", "cuda", "hi"], "CUDA is not available"),
    (["generate", "--dtype", "half", "hi"], "--dtype must be"),
    (["generate", "--small-device", "cuda:0", "hi"], "CUDA is not available"),
    (["generate", "--device", "cpu", "--device-map", "auto", "hi"], "--device-map chooses"),
    (["eval", "--device", "cuda", "--limit", "1"], "CUDA is not available"),
    (["sweep", "--dtype", "int8", "--limit", "1"], "--dtype must be"),
    (["serve", "--device", "cuda"], "CUDA is not available"),
    (["align", "--device", "cuda", "--small", "x", "--inputs", "x", "--out", "x"], "CUDA is not available"),
])
def test_cli_placement_errors_are_one_line_exit_2(argv, message, capsys):
    if "cuda" in " ".join(argv) and not NO_CUDA:
        pytest.skip("this machine has CUDA")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_unsupported_dtype_at_run_time_is_one_line_exit_2(llama_dirs, monkeypatch, capsys):
    """An operation without a kernel for the dtype (e.g. some float16 ops on some CPUs) is a usage error, not a
    traceback."""
    def missing_kernel(self, prompt_ids, config):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'\nmore detail")

    monkeypatch.setattr(BiLD, "generate_ids", missing_kernel)
    large, small = llama_dirs
    assert main(["generate", "--large", str(large), "--small", str(small), "--dtype", "float16", "w5 w6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not implemented for 'Half'" in err[0] and "--dtype float32" in err[0]


# ---- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_pair_loads_both_models_in_the_asked_dtype(tmp_path, dtype):
    large_dir, small_dir = save_pair(tmp_path, dtype=torch.bfloat16)  # a bfloat16 checkpoint
    pair = load_pair(str(large_dir), str(small_dir), device="cpu", dtype=dtype)
    for model in (pair.large.model, pair.small.model):
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert model_devices(model) == {torch.device("cpu")}


def test_auto_dtype_on_a_cpu_is_float32_whatever_the_checkpoint(tmp_path):
    large_dir, small_dir = save_pair(tmp_path, dtype=torch.bfloat16)
    pair = load_pair(str(large_dir), str(small_dir))
    assert pair.large.model.dtype == pair.small.model.dtype == torch.float32


def test_device_map_auto_loads_and_decodes_exactly(llama_dirs):
    """accelerate's device map, here with no GPU (all on the CPU): the same code path, the same tokens."""
    large, small = llama_dirs
    mapped = BiLD(load_pair(str(large), str(small), device_map="auto"))
    plain = BiLD(load_pair(str(large), str(small), device="cpu"))
    config = BiLDConfig(fallback_threshold=0.3, rollback_threshold=0.0, max_new_tokens=20)
    ids = prompt_ids(1, 6)
    assert mapped.generate_ids(ids, config).token_ids == plain.vanilla_ids(ids, config).token_ids


def test_inputs_go_to_the_input_embeddings_device():
    with torch.device("meta"):
        model = tiny_llama(1)
    model.lm_head = torch.nn.Linear(64, 96)  # a device map may put the head elsewhere: the input side decides
    assert input_device(model) == torch.device("meta")


def test_drafters_on_the_large_models_weights_refuse_another_device_or_dtype():
    large = loaded("large", tiny_llama(1), tiny_tokenizer())
    check_follows_large("early-exit:1", large, Placement(device=torch.device("cpu"), dtype=torch.float32))
    with pytest.raises(PlacementError, match="shares the large model's weights, which are on cpu"):
        check_follows_large("early-exit:1", large, Placement(device=torch.device("cuda", 1)))
    with pytest.raises(PlacementError, match="which are float32; it cannot run in bfloat16"):
        load_model("early-exit:1", large=large, device="cpu", dtype="bfloat16")


def test_generation_moves_and_copies_no_model():
    pair = make_pair("llama")
    before = {name: (p.device, p.dtype, p.data_ptr()) for name, p in pair.large.model.named_parameters()}
    small_before = {name: (p.device, p.dtype, p.data_ptr()) for name, p in pair.small.model.named_parameters()}
    BiLD(pair).generate_ids(prompt_ids(1, 5), BiLDConfig(max_new_tokens=8))
    assert before == {name: (p.device, p.dtype, p.data_ptr()) for name, p in pair.large.model.named_parameters()}
    assert small_before == {name: (p.device, p.dtype, p.data_ptr()) for name, p in pair.small.model.named_parameters()}


# ---- exactness per dtype ------------------------------------------------------------------------------------------
def _in_dtype(pair: ModelPair, dtype: torch.dtype) -> ModelPair:
    pair.large.model.to(dtype)
    pair.small.model.to(dtype)
    return pair


def _hf_greedy(model, ids: list[int], new_tokens: int, encoder_decoder: bool) -> list[int]:
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, 1 if encoder_decoder else len(ids):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_lossless_bild_is_the_large_models_greedy_output_in_each_dtype(family, dtype):
    pair = _in_dtype(make_pair(family), dtype)
    engine = BiLD(pair)
    config = BiLDConfig(fallback_threshold=0.3, rollback_threshold=0.0, max_new_tokens=30)
    rollbacks = kept = 0
    for seed in range(4):
        ids = prompt_ids(seed, 6)
        vanilla = engine.vanilla_ids(ids, config)
        # transformers' own greedy search on the same (kernel-switched) model agrees too
        assert vanilla.token_ids == _hf_greedy(pair.large.model, ids, 30, pair.large.is_encoder_decoder)
        assert engine.generate_ids(ids, config).token_ids == vanilla.token_ids, (family, dtype, seed)
        # without lookup drafts, which take over where the tiny models loop, the small model drafts more
        result = engine.generate_ids(ids, replace(config, lookup=0))
        assert result.token_ids == vanilla.token_ids, (family, dtype, seed)
        rollbacks += result.stats.rollbacks
        kept += result.stats.small_tokens_kept
    assert rollbacks > 0 and kept > 0  # the small model wrote tokens and the large model corrected some


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_lossless_early_exit_in_16_bits(dtype):
    large = loaded("large", tiny_llama(1, layers=4).to(dtype), tiny_tokenizer())
    drafter = untrained_exit(large, "2")
    assert drafter.model.draft_head is None  # int8 drafting is for float32 on a CPU only
    engine = BiLD(ModelPair(large=large, small=drafter))
    config = BiLDConfig(fallback_threshold=0.2, rollback_threshold=0.0, max_new_tokens=24)
    for seed in range(3):
        ids = prompt_ids(seed, 6)
        assert engine.generate_ids(ids, config).token_ids == engine.vanilla_ids(ids, config).token_ids


def test_seeded_sampling_is_reproducible_in_bfloat16():
    engine = BiLD(_in_dtype(make_pair("llama"), torch.bfloat16))
    config = BiLDConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=0.8, seed=3))
    ids = prompt_ids(2, 5)
    assert engine.generate_ids(ids, config).token_ids == engine.generate_ids(ids, config).token_ids


# ---- CPU kernels and int8 drafting per dtype ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_16_bit_cpu_kernels_give_every_row_what_a_one_token_step_gives(dtype):
    model = tiny_llama(1).to(dtype)
    reference = copy.deepcopy(model)
    use_cpu_kernels(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is RowInvariantLinear for m in linears)  # not SmallBatchLinear (float32 only)
    assert model.config._attn_implementation == CPU_ATTENTION
    ids = torch.tensor([prompt_ids(4, 40)])
    with torch.inference_mode():
        block = model(ids).logits[0]  # (40, vocab): one pass
        steps, cache = [], None
        for position in range(ids.shape[1]):
            out = model(ids[:, position : position + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[0, -1])
        assert torch.equal(block, torch.stack(steps))  # every row exactly as a one-token step gives it
        agree = (block.argmax(-1) == reference(ids).logits[0].argmax(-1)).float().mean()  # transformers' own SDPA
        assert agree > 0.9


def test_small_batch_linear_steps_aside_for_bfloat16_inputs():
    layer = torch.nn.Linear(48, 80).to(torch.bfloat16)
    switched = copy.deepcopy(layer)
    switched.__class__ = SmallBatchLinear
    x = torch.randn(6, 48, dtype=torch.bfloat16)  # 6 rows: the fast path, were it float32
    with torch.inference_mode():
        assert torch.equal(switched(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_cpu_attention_is_the_sdpa_result(dtype):
    """The 16-bit path computes the same attention as PyTorch's SDPA, within 16-bit rounding; float32 keeps SDPA."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    torch.manual_seed(0)
    key, value = torch.randn(1, 2, 7, 16).to(dtype), torch.randn(1, 2, 7, 16).to(dtype)  # 2 KV heads, 7 positions
    for q_len, mask in ((3, torch.ones(3, 7, dtype=torch.bool).tril(4)[None, None]),  # 3 new tokens after 4 cached
                        (7, None)):  # a prefill: causal
        query = torch.randn(1, 4, q_len, 16).to(dtype)  # (batch, heads, q_len, head_dim)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        out, _ = cpu_sdpa_attention(module, query, key, value, mask, scaling=16 ** -0.5)
        assert out.shape == (1, q_len, 4, 16)
        assert torch.allclose(out.float(), expected.transpose(1, 2), atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_int8_drafting_applies_to_float32_on_a_cpu_only():
    assert int8_drafting_applies(tiny_llama(1))
    assert not int8_drafting_applies(tiny_llama(1).to(torch.bfloat16))
    fp32 = untrained_exit(loaded("large", tiny_llama(1, layers=4), tiny_tokenizer()), "2")
    assert fp32.model.draft_head is not None


# ---- the real default pair ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_pair_in_bfloat16_from_the_cli_equals_the_large_model_alone(capsys):
    """`bild generate --dtype bfloat16 --rollback-threshold 0` == the large model alone in bfloat16, token for token."""
    large = load_model(DEFAULT_LARGE, device="cpu", dtype="bfloat16")
    alone = BiLD(ModelPair(large=large, small=None))
    rollbacks = 0
    for prompt in ["Explain photosynthesis.", "What is the capital of France?", "Write a haiku about the sea.",
                   "What is a hash table used for?"]:
        assert main(["generate", "--device", "cpu", "--dtype", "bfloat16", "--rollback-threshold", "0",
                     "--max-new-tokens", "48", "--json", prompt]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["method"] == "bild"
        reference = alone.vanilla(prompt, BiLDConfig(max_new_tokens=48))
        assert payload["token_ids"] == reference.token_ids, prompt
        rollbacks += payload["stats"]["rollbacks"]
    assert rollbacks > 0


@pytest.mark.slow
def test_default_little_model_follows_the_large_models_dtype():
    pair = load_pair(device="cpu", dtype="bfloat16")
    assert {p.dtype for p in pair.small.model.parameters()} == {torch.bfloat16}
    assert pair.small.model.get_input_embeddings() is pair.large.model.get_input_embeddings()  # shared, not copied
    assert type(pair.small.model.lm_head) is torch.nn.Linear  # no int8 head in bfloat16
    fp32 = load_pair(device="cpu", dtype="float32")
    assert type(fp32.small.model.lm_head).__name__ == "DraftHead"  # the int8 draft head


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_models_check_drafts_row_by_row_in_16_bits(family):
    """T5 and BART in bfloat16 drift in the last bits between a block of positions and single steps, even on the
    row-invariant kernels (T5 at prompt 3 under the adaptive policy, prompt 16 under the fixed one; BART at most
    prompts), so their large model checks drafts one position at a time: exact on every prompt, under both policies."""
    pair = _in_dtype(make_pair(family), torch.bfloat16)
    engine = BiLD(pair)
    assert engine.large_row_by_row and not BiLD(_in_dtype(make_pair(family), torch.float32)).large_row_by_row
    for policy in ("adaptive", "fixed"):
        config = BiLDConfig(fallback_threshold=0.3, rollback_threshold=0.0, max_new_tokens=30, policy=policy)
        for seed in range(20):
            ids = prompt_ids(seed, 6)
            assert engine.generate_ids(ids, config).token_ids == engine.vanilla_ids(ids, config).token_ids, (policy, seed)
