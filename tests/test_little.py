"""The shared text source rule, the little-model prompts, and (slow) the little model's save/load round trip."""

from __future__ import annotations

import zlib

import pytest
import torch

from bild.train.sources import is_eval_module, iter_docstrings, module_name, paragraphs, stdlib_dir


def test_eval_rule_uses_the_top_level_package():
    for name in ["json", "json.decoder", "os", "email.mime.text", "asyncio"]:
        top = name.split(".")[0]
        assert is_eval_module(name) == (zlib.crc32(top.encode()) % 5 == 0)
    assert is_eval_module("json.decoder") == is_eval_module("json")


def test_train_split_never_contains_eval_modules():
    docs = list(iter_docstrings("train"))
    assert len(docs) > 1000
    assert not any(is_eval_module(doc.module) for doc in docs)
    assert all(is_eval_module(doc.module) for doc in iter_docstrings("eval"))


def test_module_names_skip_tests_and_site_packages():
    root = stdlib_dir()
    assert module_name(root / "json" / "__init__.py", root) == "json"
    assert module_name(root / "email" / "mime" / "text.py", root) == "email.mime.text"
    assert module_name(root / "test" / "test_json.py", root) is None
    assert module_name(root / "site-packages" / "x.py", root) is None


def test_paragraphs_skip_doctests():
    text = "A first paragraph that is long enough to be kept as prose text here.\n\n>>> 1 + 1\n2\n"
    assert paragraphs(text, min_chars=20) == ["A first paragraph that is long enough to be kept as prose text here."]


def test_prompts_are_seeded_prefix_stable_and_train_only():
    from bild.train.prompts import build_prompts

    few, many = build_prompts(20, seed=0), build_prompts(40, seed=0)
    assert few == many[:20]  # a smaller run uses a prefix of the same prompts (and of the calibration file)
    assert not any(is_eval_module(example.source) for example in many)
    assert all(example.prompt and example.reference for example in many)


def test_more_prompts_than_docstrings_ask_again_about_the_same_docstrings():
    from bild.train.prompts import build_prompts

    first_round = build_prompts(10**6, seed=0, max_rounds=1)  # one prompt per training docstring
    more = build_prompts(len(first_round) + 50, seed=0)
    assert more[: len(first_round)] == first_round  # still prefix-stable across rounds
    assert len(more) == len(first_round) + 50
    assert {example.source for example in more[len(first_round) :]} <= {example.source for example in first_round}


def test_held_out_docstrings_stay_held_out_in_every_round():
    from bild.train.align import CalibrationRecord
    from bild.train.prompts import build_prompts, prompts_per_round
    from bild.train.little import split_by_index

    per_round = prompts_per_round()
    examples = build_prompts(2 * per_round, seed=0)
    records = [CalibrationRecord(index, example.prompt, [1], [2]) for index, example in enumerate(examples)]
    train, heldout = split_by_index(records, heldout_every=10)
    assert len(train) + len(heldout) == len(records)
    assert [record.index for record in heldout[:3]] == [0, 10, 20]  # round one: unchanged by the second round
    train_sources = {examples[record.index].source for record in train}
    heldout_sources = {examples[record.index].source for record in heldout}
    assert not train_sources & heldout_sources  # no held-out docstring is ever trained on
    assert len(heldout) == 2 * len(heldout_sources)


@pytest.mark.slow
def test_little_model_round_trip_and_assisted_generation(tmp_path):
    from bild.drafters.little import build_little, load_little, own_state, save_little
    from bild.models import load_model
    from bild.drafters.quantize import DraftHead

    large = load_model("smollm2-135m-instruct")
    little = build_little(large, (0, 1))
    assert little.model.model.embed_tokens is large.model.model.embed_tokens  # shared, not copied
    assert little.model.lm_head.weight.data_ptr() == large.model.model.embed_tokens.weight.data_ptr()
    assert all(tensor.dtype == torch.float16 for tensor in own_state(little).values())
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 282, 260, 1345, 314, 1071, 28, 339, 4567, 30, 253]])
    with torch.inference_mode():
        expected = little.model(ids).logits  # (1, 16, vocab)
    draft_vocab = torch.cat([expected[0].topk(200, dim=-1).indices.flatten(), torch.arange(2000)]).unique()
    save_little(little, "aligned", (0, 1), {}, tmp_path, draft_vocab=draft_vocab)
    assert (tmp_path / "aligned.safetensors").stat().st_size < 16e6
    exact = load_little("aligned", large, weights_dir=tmp_path, int8=False)
    loaded = load_little("aligned", large, weights_dir=tmp_path)  # the drafting form: fp32 layers, int8 draft head
    assert isinstance(loaded.model.lm_head, DraftHead) and torch.equal(loaded.model.lm_head.draft_vocab, draft_vocab)
    assert type(loaded.model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    all_int8 = load_little("aligned", large, weights_dir=tmp_path, int8_layers=True)
    assert type(all_int8.model.model.layers[0].mlp.up_proj) is not torch.nn.Linear
    with torch.inference_mode():
        got, quantized = exact.model(ids).logits, loaded.model(ids).logits
        quantized_layers = all_int8.model(ids).logits
    assert torch.allclose(expected, got, atol=0.05)  # fp16 storage
    # untrained layers give near-ties, so ask only that int8 drafting picks one of the fp32 model's top 5
    top5 = expected.topk(5, dim=-1).indices  # (1, 16, 5)
    for logits in (quantized, quantized_layers):
        assert (top5 == logits.argmax(-1, keepdim=True)).any(-1).float().mean() >= 0.9
    outside = torch.ones(quantized.shape[-1], dtype=torch.bool)
    outside[draft_vocab] = False
    assert torch.isneginf(quantized[..., outside]).all()  # tokens outside the draft vocabulary are never drafted
    assert large.model.lm_head.weight.dtype == torch.float32  # the large model keeps its fp32 head
    prompt = large.tokenizer("The Python standard library", return_tensors="pt")
    greedy = large.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assisted = large.model.generate(**prompt, max_new_tokens=8, do_sample=False, assistant_model=loaded.model)
    assert torch.equal(greedy, assisted)


def test_shipped_weights_were_built_by_the_recipe_make_little_runs():
    import json
    from dataclasses import asdict

    from bild.drafters import WEIGHTS_DIR
    from bild.train.little import LittleConfig

    config = LittleConfig()
    report = json.loads((WEIGHTS_DIR / "little-report.json").read_text())
    expected = json.loads(json.dumps(asdict(config)))
    added = {key for key in expected if key not in report["config"]}  # options newer than the weights: off by default
    assert added <= {"broad_prompts"} and all(expected[key] == 0 for key in added)
    assert report["config"] == {key: value for key, value in expected.items() if key not in added}
    assert sorted(variant["variant"] for variant in report["variants"]) == ["aligned", "unaligned"]
    for variant in ("aligned", "unaligned"):
        meta = json.loads((WEIGHTS_DIR / f"{variant}.json").read_text())
        assert (tuple(meta["init_layers"]), meta["delta_rank"]) == (config.init_layers, config.delta_rank)


@pytest.mark.slow
def test_shipped_little_models_load_by_name_and_fit_the_budget():
    from bild.drafters import WEIGHTS_DIR
    from bild.drafters.little import load_little
    from bild.train.little import LittleConfig
    from bild.models import check_same_vocabulary, load_model
    from bild.drafters.quantize import DraftHead

    total = sum((WEIGHTS_DIR / f"{v}.safetensors").stat().st_size for v in ("aligned", "unaligned"))
    assert total <= 32e6
    large = load_model("smollm2-135m-instruct")
    for name in ("smollm2-little", "smollm2-little-unaligned", "smollm2-little-int8"):
        little = load_model(name, large=large)
        check_same_vocabulary(large, little)
        assert little.name == name and little.model.config.num_hidden_layers == len(LittleConfig().init_layers)
        assert little.model.model.embed_tokens is large.model.model.embed_tokens
    # the trained model drafts through its int8 draft head, and picks what its fp32 form picks where it drafts: on
    # the large model's answers to chat prompts (both shipped generations of the weights: 91-93% on these three)
    drafting = load_model("smollm2-little", large=large)
    assert isinstance(drafting.model.lm_head, DraftHead) and len(drafting.model.lm_head.draft_vocab) == 8192
    int8_layers = load_model("smollm2-little-int8", large=large)
    assert type(int8_layers.model.model.layers[0].mlp.up_proj) is not torch.nn.Linear  # int8 decoder layers too
    fp32 = load_little("aligned", large, int8=False)
    agree, agree_int8_layers = [], []
    for question in ("What does the json module do in Python?", "Explain what a hash table is.",
                     "Translate to German: The file could not be opened."):
        ids = large.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            answered = large.model.generate(ids, max_new_tokens=40, do_sample=False)
            window = slice(ids.shape[1] - 1, -1)
            picks = [model.model(input_ids=answered).logits[0, window].argmax(-1)
                     for model in (drafting, int8_layers, fp32)]
        agree += (picks[0] == picks[2]).tolist()
        agree_int8_layers += (picks[1] == picks[2]).tolist()
    assert sum(agree) / len(agree) >= 0.85, agree
    # the default drafting form (int8 decoder layers too): 87% on these three when its layers were made int8
    assert sum(agree_int8_layers) / len(agree_int8_layers) >= 0.8, agree_int8_layers


@pytest.mark.slow
def test_bild_little_calibration_only_writes_calibration_and_no_weights(tmp_path, monkeypatch):
    import json

    import bild.train.little
    from bild.cli import main
    from bild.train.prompts import PromptExample

    asked = []

    def broad_prompts(count: int, seed: int = 0) -> list[PromptExample]:  # the corpus's packages may be missing here
        asked.append((count, seed))
        return [PromptExample("Define in one sentence: harbour", "a sheltered port", "wordnet:harbour", "define"),
                PromptExample("Translate into German:\nOpen the file.", "Datei öffnen.", "catalog:x/de", "translate")]

    monkeypatch.setattr(bild.train.little, "build_broad_prompts", broad_prompts)
    out, work = tmp_path / "weights", tmp_path / "work"
    code = main(["little", "--calibration-only", "--prompts", "2", "--broad-prompts", "2", "--out", str(out),
                 "--work-dir", str(work)])
    assert code == 0
    records = [json.loads(line) for line in (work / "calibration.jsonl").read_text().splitlines()]
    assert sorted(record["index"] for record in records) == [0, 1]
    assert all(record["output_ids"] for record in records)
    broad = [json.loads(line) for line in (work / "calibration-broad.jsonl").read_text().splitlines()]
    assert asked == [(2, 0)] and [record["prompt"] for record in sorted(broad, key=lambda r: r["index"])] == [
        "Define in one sentence: harbour", "Translate into German:\nOpen the file."]
    assert not list(out.glob("*"))  # the variants are trained by separate runs; the shipped report is left alone


def test_low_rank_little_trains_only_deltas_and_merges_into_an_ordinary_llama(tmp_path):
    from conftest import loaded, tiny_llama, tiny_tokenizer
    from safetensors.torch import load_file, save_file

    from bild.drafters.little import LowRankDelta, build_little, merge_low_rank, own_state

    large = loaded("large", tiny_llama(0, layers=4), tiny_tokenizer())
    little = build_little(large, (0, 3), delta_rank=2)
    assert little.model.model.embed_tokens is large.model.model.embed_tokens
    ids = torch.tensor([[2, 5, 9, 14, 30, 7]])
    with torch.no_grad():
        untrained = little.model(ids).logits
        for module in little.model.modules():
            if isinstance(module, LowRankDelta):
                module.up.normal_(std=0.1)  # stands in for training: a non-zero delta
        trained = little.model(ids).logits
    assert not torch.allclose(untrained, trained)
    trainable = {name for name, p in little.model.named_parameters()
                 if p.requires_grad and not name.startswith(("model.embed_tokens", "lm_head"))}  # frozen by finetune
    assert trainable and all(name.endswith((".down", ".up")) or "norm" in name for name in trainable)
    stored = own_state(little)
    assert not any(".base." in name for name in stored)  # the frozen copies of the large layers are not stored
    save_file(stored, tmp_path / "little.safetensors")

    rebuilt = build_little(large, (0, 3), delta_rank=2)
    rebuilt.model.load_state_dict({k: v.float() for k, v in load_file(tmp_path / "little.safetensors").items()},
                                  strict=False)
    merge_low_rank(rebuilt)
    assert not any(isinstance(module, LowRankDelta) for module in rebuilt.model.modules())
    assert all(type(layer.mlp.up_proj) is torch.nn.Linear for layer in rebuilt.model.model.layers)
    with torch.no_grad():
        assert torch.allclose(rebuilt.model(ids).logits, trained, atol=2e-2)  # fp16 storage of the deltas


def _committed_records(name: str) -> list:
    import gzip
    import json
    from pathlib import Path

    from bild.train.align import CalibrationRecord

    path = Path(__file__).parent.parent / "data" / f"{name}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as source:
        return [CalibrationRecord(**json.loads(line)) for line in source]


def test_committed_calibration_data_matches_the_prompts_it_was_made_for():
    import sys

    from bild.train.prompts import build_prompts

    records = _committed_records("little-calibration")
    assert [record.index for record in records] == list(range(3333))
    assert all(record.output_ids and len(record.output_ids) <= 96 for record in records)
    if sys.version_info[:2] != (3, 11):
        pytest.skip("made from Python 3.11's stdlib docstrings; another version builds other prompts")
    assert [record.prompt for record in records] == [example.prompt for example in build_prompts(3333)]


def test_committed_package_calibration_data_matches_the_torch_prompts():
    from bild.train.prompts import build_package_prompts
    from bild.train.little import LittleConfig

    config = LittleConfig()
    records = _committed_records(f"little-calibration-{config.package}")
    assert [record.index for record in records] == list(range(3000))
    assert all(record.output_ids and len(record.output_ids) <= 96 for record in records)
    if not torch.__version__.startswith("2.13.0"):
        pytest.skip("made from torch 2.13.0's docstrings; another version builds other prompts")
    expected = build_package_prompts(config.package, len(records), seed=config.seed)
    assert [record.prompt for record in records] == [example.prompt for example in expected]


def test_committed_broad_calibration_data_matches_the_broad_prompts():
    from bild.train.corpus import CorpusSourceMissing
    from bild.train.tasks import build_broad_prompts

    records = _committed_records("little-calibration-broad")
    assert [record.index for record in records] == list(range(4000))
    assert all(record.output_ids and len(record.output_ids) <= 96 for record in records)
    try:
        expected = build_broad_prompts(200)
    except CorpusSourceMissing as error:
        pytest.skip(f"the broad corpus's packages are not installed here ({error})")
    assert [record.prompt for record in records[:200]] == [example.prompt for example in expected]


def _fake_package(root, name="fakepkg"):
    """A tiny installed package with prose docstrings, one vendored and one testing module that must be skipped."""
    package = root / name
    for sub in ("", "_vendor", "testing"):
        (package / sub).mkdir(parents=True, exist_ok=True)
        (package / sub / "__init__.py").write_text("")
    prose = "This paragraph explains what the function computes and why a user would call it in practice."
    functions = "\n".join(f'def f{i}():\n    """{prose} Variant {i}."""\n' for i in range(30))
    (package / "core.py").write_text(f'"""{prose} Module."""\n{functions}')
    (package / "_vendor" / "other.py").write_text(f'def vendored():\n    """{prose}"""\n')
    (package / "testing" / "helpers.py").write_text(f'def helper():\n    """{prose}"""\n')
    return name


def test_package_prompts_skip_vendored_and_testing_code_and_are_prefix_stable(tmp_path, monkeypatch):
    from bild.train.prompts import build_package_prompts
    from bild.train.sources import iter_package_docstrings

    name = _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = {doc.module for doc in iter_package_docstrings(name)}
    assert modules == {"fakepkg.core"}
    few, many = build_package_prompts(name, 5), build_package_prompts(name, 20)
    assert few == many[:5] and len(many) == 20
    assert len(build_package_prompts(name, 100)) == 31  # one prompt per docstring, no second round
    assert all(example.source.startswith("fakepkg.core") for example in many)


def test_missing_package_is_a_clear_error():
    from bild.train.sources import package_dir

    with pytest.raises(FileNotFoundError, match="not installed"):
        package_dir("no_such_package_bild_test")


def test_package_prompts_are_held_out_by_index():
    from bild.train.align import CalibrationRecord
    from bild.train.little import split_by_index

    records = [CalibrationRecord(index, f"p{index}", [1], [2]) for index in range(25)]
    train, heldout = split_by_index(records, heldout_every=10, per_round=25)
    assert [record.index for record in heldout] == [0, 10, 20]
    assert len(train) == 22
