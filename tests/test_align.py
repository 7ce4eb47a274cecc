"""Prediction alignment on tiny seeded models (no network): agreement goes up, resume works, bad input is refused."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bild.train.align import (
    AlignInputError,
    CalibrationRecord,
    CalibrationConfig,
    TrainConfig,
    agreement,
    align,
    distillation_records,
    teacher_forced_records,
    finetune,
    generate_calibration,
    read_calibration,
    read_inputs,
    split_records,
)
from bild.train.align import _batches
from bild.models import LoadedModel, VocabularyMismatchError

WORDS = [f"w{i}" for i in range(40)]


def tiny_tokenizer(extra: int = 0) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS + [f"x{i}" for i in range(extra)])})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(layers: int, seed: int, tokenizer: PreTrainedTokenizerFast, name: str) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(name, model, tokenizer, is_encoder_decoder=False, is_chat=False)


def tiny_bart(layers: int, seed: int, tokenizer: PreTrainedTokenizerFast, name: str) -> LoadedModel:
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, forced_eos_token_id=None, init_std=0.2)
    model = BartForConditionalGeneration(config).eval()
    return LoadedModel(name, model, tokenizer, is_encoder_decoder=True, is_chat=False)


def random_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(count)]


CALIBRATION = CalibrationConfig(max_new_tokens=10, batch_size=16, top_k=4)
TRAIN = TrainConfig(epochs=10, batch_size=16, learning_rate=3e-3, freeze_embeddings=False)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bart], ids=["decoder-only", "encoder-decoder"])
def test_alignment_raises_agreement(tmp_path, build):
    tokenizer = tiny_tokenizer()
    large, small = build(2, 0, tokenizer, "large"), build(1, 1, tokenizer, "small")
    report = align(large, small, random_prompts(128), tmp_path, tmp_path / "out", CALIBRATION, TRAIN, 0.25)
    assert report.agreement_after > report.agreement_before + 0.3
    assert report.final_loss < report.first_loss
    saved = json.loads((tmp_path / "out" / "align-report.json").read_text())
    assert saved["heldout_records"] == 32 and saved["steps"] == report.steps
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_large_model_agrees_with_itself(tmp_path):
    large = tiny_llama(2, 0, tiny_tokenizer(), "large")
    records = generate_calibration(large, random_prompts(20), tmp_path / "c.jsonl", CALIBRATION)
    assert agreement(large, records) > 0.99  # teacher forcing reproduces its own greedy choice


def test_calibration_resumes_where_it_stopped(tmp_path):
    large = tiny_llama(2, 0, tiny_tokenizer(), "large")
    prompts = random_prompts(20)
    path = tmp_path / "c.jsonl"
    full = generate_calibration(large, prompts, tmp_path / "full.jsonl", CALIBRATION)
    generate_calibration(large, prompts[:7], path, CALIBRATION)  # an "interrupted" run
    with path.open("a") as sink:
        sink.write('{"index": 99, "prompt": "torn')  # a torn last line
    resumed = generate_calibration(large, prompts, path, CALIBRATION)
    assert [r.index for r in resumed] == list(range(20))
    assert [r.output_ids for r in resumed] == [r.output_ids for r in full]
    assert len(read_calibration(path)) == 20


def test_calibration_file_for_other_prompts_is_refused(tmp_path):
    large = tiny_llama(2, 0, tiny_tokenizer(), "large")
    path = tmp_path / "c.jsonl"
    generate_calibration(large, random_prompts(5), path, CALIBRATION)
    before = path.read_text()
    other = random_prompts(5)[:2] + ["w9 w9 w9"] + random_prompts(5)[3:]
    with pytest.raises(AlignInputError, match="1 records differ .* the first at index 2"):
        generate_calibration(large, other, path, CALIBRATION)
    assert path.read_text() == before  # nothing appended, nothing lost


def test_token_level_distillation_runs(tmp_path):
    tokenizer = tiny_tokenizer()
    large, small = tiny_llama(2, 0, tokenizer, "large"), tiny_llama(1, 1, tokenizer, "small")
    records = generate_calibration(large, random_prompts(64), tmp_path / "c.jsonl", CALIBRATION)
    assert len(records[0].topk_ids[0]) == 4
    train, heldout = split_records(records, 0.25)
    before = agreement(small, heldout)
    finetune(small, train, TrainConfig(epochs=10, batch_size=8, learning_rate=3e-3, kl_weight=1.0,
                                       freeze_embeddings=False))
    assert agreement(small, heldout) > before


def test_soft_targets_apply_to_the_records_that_have_a_top_k_in_a_mixed_batch(tmp_path):
    from dataclasses import replace

    from bild.train.align import batch_logits, batch_loss, make_batch

    tokenizer = tiny_tokenizer()
    large, small = tiny_llama(2, 0, tokenizer, "large"), tiny_llama(1, 1, tokenizer, "small")
    records = generate_calibration(large, random_prompts(6), tmp_path / "c.jsonl", CALIBRATION)
    stripped = [replace(r, topk_ids=[], topk_logprobs=[]) for r in records]
    config = TrainConfig(kl_weight=1.0)

    def losses(batch_records):
        batch = make_batch(small, batch_records, config)
        with torch.no_grad():
            logits = batch_logits(small, batch)
        return batch_loss(logits, batch, 0.0).item(), batch_loss(logits, batch, 1.0).item()

    hard, soft = losses(records[:3] + stripped[3:])  # half with a stored top-k, half without (as the shipped data)
    assert math.isfinite(soft) and soft > hard + 0.1  # the soft cross-entropy of the first three is added
    assert losses(stripped) == (losses(stripped)[0],) * 2  # none with a top-k: cross-entropy alone


def test_raw_text_records_read_the_text_and_target_the_large_models_predictions():
    tokenizer = tiny_tokenizer()
    large = tiny_llama(2, 0, tokenizer, "large")
    texts = random_prompts(40, seed=3) * 2 + [" ".join(random_prompts(30, seed=4))]  # short ones, one long one
    records = distillation_records(large, texts, chunks=12, chunk_tokens=20, top_k=4, batch_size=5)
    assert len(records) == 8  # the long text's chunks (the short texts have under 16 tokens each)
    whole = tokenizer(texts[-1], add_special_tokens=False)["input_ids"]
    assert [r.input_ids + r.read_ids for r in records[:-1]] == [whole[i : i + 20] for i in range(0, 140, 20)]
    with torch.no_grad():
        logits = large.model(input_ids=torch.tensor([whole[:20]])).logits[0]
    assert records[0].output_ids == logits[:-1].argmax(-1).tolist()  # the prediction after each read token
    assert [ids[0] for ids in records[0].topk_ids] == records[0].output_ids
    assert agreement(large, records) == 1.0  # teacher forcing on the same text reproduces the targets exactly
    context, text = whole[:5], whole[5:12]  # a text read after a prompt of several tokens
    [record] = teacher_forced_records(large, [(context, text), (whole[:2], whole[2:4])], top_k=0, batch_size=2)[:1]
    assert record.input_ids == context and record.read_ids == text and record.topk_ids == []
    assert record.output_ids == logits[4:11].argmax(-1).tolist()


def test_distillation_on_raw_text_raises_agreement_on_the_large_models_own_outputs(tmp_path):
    tokenizer = tiny_tokenizer()
    large, small = tiny_llama(2, 0, tokenizer, "large"), tiny_llama(1, 1, tokenizer, "small")
    raw = distillation_records(large, [" ".join(random_prompts(300, seed=5))], chunks=64, chunk_tokens=24, top_k=4)
    heldout = generate_calibration(large, random_prompts(32, seed=6), tmp_path / "c.jsonl", CALIBRATION)
    before = agreement(small, heldout)
    finetune(small, raw, TrainConfig(epochs=10, batch_size=8, learning_rate=3e-3, kl_weight=1.0,
                                     freeze_embeddings=False))
    assert agreement(small, heldout) > before + 0.1


def test_encoder_decoder_pairs_are_refused_raw_text_distillation():
    large = tiny_bart(1, 0, tiny_tokenizer(), "large")
    with pytest.raises(AlignInputError, match="decoder-only"):
        distillation_records(large, [" ".join(WORDS)], chunks=1)


def test_missing_and_empty_input_files(tmp_path):
    with pytest.raises(AlignInputError, match="does not exist"):
        read_inputs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(AlignInputError, match="is empty"):
        read_inputs(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(AlignInputError, match="'prompt' or 'source'"):
        read_inputs(tmp_path / "bad.jsonl")


def test_input_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a b"}\n{"source": "c"}\n')
    (tmp_path / "p.txt").write_text("first line\n\nsecond\n")
    assert read_inputs(tmp_path / "p.jsonl") == ["a b", "c"]
    assert read_inputs(tmp_path / "p.txt") == ["first line", "second"]


def test_vocabulary_mismatch_is_refused(tmp_path):
    large = tiny_llama(2, 0, tiny_tokenizer(), "large")
    small = tiny_llama(1, 1, tiny_tokenizer(extra=5), "small")
    with pytest.raises(VocabularyMismatchError, match="do not share a vocabulary"):
        align(large, small, random_prompts(4), tmp_path)
    assert not (tmp_path / "calibration.jsonl").exists()


def test_align_command_end_to_end(tmp_path, capsys):
    from bild.cli import main

    tokenizer = tiny_tokenizer()
    for name, layers, seed in [("large", 2, 0), ("small", 1, 1)]:
        model = tiny_llama(layers, seed, tokenizer, name)
        model.model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.txt").write_text("\n".join(random_prompts(64)) + "\n")
    args = ["align", "--large", str(tmp_path / "large"), "--small", str(tmp_path / "small"), "--inputs",
            str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "out"), "--max-new-tokens", "8",
            "--batch-size", "16", "--epochs", "10", "--learning-rate", "3e-3", "--train-embeddings",
            "--heldout-fraction", "0.25"]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "align-report.json").read_text())
    assert report["agreement_after"] > report["agreement_before"]
    assert (tmp_path / "out" / "calibration" / "calibration.jsonl").is_file()
    assert main([*args[:6], str(tmp_path / "missing.txt"), *args[7:]]) == 2
    assert "does not exist" in capsys.readouterr().err


def _records_of_random_lengths(count: int) -> list[CalibrationRecord]:
    rng = random.Random(3)
    return [CalibrationRecord(i, f"p{i}", [1] * rng.randint(5, 200), [2] * rng.randint(1, 96)) for i in range(count)]


def _padded_cells(batches: list[list[CalibrationRecord]]) -> int:
    """Cells of the [prompt | target] rectangles make_batch builds for these batches."""
    return sum(len(b) * (max(len(r.input_ids) for r in b) + max(len(r.output_ids) for r in b)) for b in batches)


def test_plain_batches_are_consecutive_slices_of_shuffled_epochs():
    records = _records_of_random_lengths(20)
    batches = list(_batches(records, 8, random.Random(0), steps=5))
    rng, expected = random.Random(0), []
    for _ in range(2):
        epoch = list(range(20))
        rng.shuffle(epoch)
        expected.extend(epoch)
    assert [r.index for b in batches for r in b] == expected[:40]


def test_length_buckets_cover_every_record_once_per_epoch_with_less_padding():
    records = _records_of_random_lengths(300)
    steps_per_epoch = 300 // 32 * 4 + 2  # nine runs of 32 records make 4 batches each, the last run of 12 makes 2
    bucketed = list(_batches(records, 8, random.Random(0), steps=2 * steps_per_epoch, length_bucket=32))
    for epoch in (bucketed[:steps_per_epoch], bucketed[steps_per_epoch:]):
        assert sorted(r.index for b in epoch for r in b) == list(range(300))
        assert all(len(b) <= 8 for b in epoch)
    assert [r.index for b in bucketed[:steps_per_epoch] for r in b] != [r.index for b in bucketed[steps_per_epoch:] for r in b]
    plain = list(_batches(records, 8, random.Random(0), steps=len(bucketed)))
    assert _padded_cells(bucketed) < 0.85 * _padded_cells(plain)
