"""`bild eval` / `bild sweep`: metrics, data files, the summary JSON, lossless baselines, the CLI end to end."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from bild.cli import main as bild_main
from bild.config import BiLDConfig
from bild.eval import datasets, docsum, mansum, metrics
from bild.eval.datasets import DataFormatError, DatasetError, EvalDataset, Example, load_dataset
from bild.eval.harness import evaluate, summarize
from bild.cli.eval import format_table
from bild.eval.methods import method_names
from bild.eval.sweep import SweepPoint, SweepResult, plot, run_sweep
from bild.train.sources import is_eval_module

from conftest import make_pair

ISSUE_KEYS = {"rougeL", "bleu", "time_s", "speedup", "tokens_per_s", "exact_match", "fallback_rate", "rollback_rate"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (10-30x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dataset(n: int = 4) -> EvalDataset:
    examples = tuple(
        Example(str(i), " ".join(f"w{4 + (7 * i + 3 * j) % 90}" for j in range(4 + i)), "w5 w6 w7 w8") for i in range(n)
    )
    return EvalDataset("tiny", examples, "{source}", "rougeL")


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_rouge_l_known_values():
    assert metrics.rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # LCS 3 of 3 predicted and 6 reference words: P = 1, R = 0.5, F = 2/3; the mean over examples is plain
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert metrics.rouge_l(["the cat sat", "dog"], ["the cat sat on the mat", "cat"]) == pytest.approx(100 / 3)
    assert metrics.rouge_l([], []) is None


def test_bleu_known_values():
    assert metrics.bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(100.0)
    assert metrics.bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
    assert 0 < metrics.bleu(["the cat sat on a mat today"], ["the cat sat on the mat today"]) < 100
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.bleu(["a", "b"], ["a"])


def test_repetition_counts_repeated_word_ngrams_within_each_output():
    assert metrics.repetition(["a b c d e f"]) == pytest.approx(0.0)
    # 5 four-grams, the last one ("a b c d") repeats the first: 1 / 5; a loop of 4 words over 11 words: 4 / 8
    assert metrics.repetition(["a b c d a b c d"]) == pytest.approx(20.0)
    assert metrics.repetition(["a b c d a b c d a b c"]) == pytest.approx(50.0)
    # outputs too short for a 4-gram are left out of the mean, not counted as 0
    assert metrics.repetition(["a b", "a b c d a b c d a b c"]) == pytest.approx(50.0)
    assert metrics.repetition(["a b c d e", "a b c d a b c d"]) == pytest.approx(10.0)
    assert metrics.repetition(["x y z", ""]) is None


# ---- data files --------------------------------------------------------------------------------------------------
def test_reads_jsonl_csv_tsv(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"source": "s1", "reference": "r1", "id": "x"}\n\n{"source": "s2", "reference": "r2"}\n')
    (tmp_path / "d.csv").write_text('source,reference\n"s1, with comma",r1\ns2,r2\n')
    (tmp_path / "d.tsv").write_text("id\tsource\treference\na\ts1\tr1\n")
    jsonl = load_dataset(str(tmp_path / "d.jsonl"), prompt_template="Summarize: {source}")
    assert [e.id for e in jsonl.examples] == ["x", "1"]
    assert jsonl.prompt(jsonl.examples[1]) == "Summarize: s2"
    assert load_dataset(str(tmp_path / "d.csv")).examples[0].source == "s1, with comma"
    assert load_dataset(str(tmp_path / "d.tsv")).examples == (Example("a", "s1", "r1"),)
    assert len(load_dataset(str(tmp_path / "d.jsonl"), limit=1).examples) == 1


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"source": "a", "reference": "b"}\n{"source": "a", \n', r"bad\.jsonl:2: not valid JSON"),
        ("missing.jsonl", '{"source": "a", "reference": "b"}\n\n{"source": "a"}\n', r"missing\.jsonl:3: missing field 'reference'"),
        ("both.jsonl", '{"text": "a"}\n', r"both\.jsonl:1: missing field 'source' and 'reference'"),
        ("list.jsonl", '["a", "b"]\n', r"list\.jsonl:1: expected an object"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: the file has no examples"),
        ("header.csv", "text,reference\na,b\n", r"header\.csv:1: header has no column 'source'"),
        ("short.csv", "source,reference\na,b\nc\n", r"short\.csv:3: missing field 'reference'"),
        ("number.jsonl", '{"source": 3, "reference": "b"}\n', r"number\.jsonl:1: field 'source' must be a string"),
    ],
)
def test_malformed_files_name_file_line_and_field(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataFormatError, match=message):
        load_dataset(str(tmp_path / name))


def test_dataset_errors_are_value_errors(tmp_path):
    assert issubclass(DataFormatError, ValueError)
    with pytest.raises(DatasetError, match="not a file, and not one of the names docsum"):
        load_dataset("no-such-set")
    with pytest.raises(DatasetError, match="must contain '{source}'"):
        load_dataset("docsum", prompt_template="Summarize")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DatasetError, match="unknown file type '.txt'"):
        load_dataset(str(tmp_path / "d.txt"))


def test_paper_datasets_offline_give_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DatasetError, match=r"pip install 'bild\[datasets\]'"):
        load_dataset("xsum")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'EdinburghNLP/xsum' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(DatasetError, match="cannot load 'xsum'.*Couldn't reach.*--dataset docsum"):
        load_dataset("xsum", limit=5)


def test_paper_dataset_fields(monkeypatch):
    rows = [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    dataset = load_dataset("iwslt2017")
    assert dataset.examples == (Example("iwslt2017-0", "Hallo Welt", "Hello world"),)
    assert dataset.metric == "bleu" and "German" in dataset.prompt_template


def test_docsum_is_shipped_and_uses_only_eval_modules():
    dataset = load_dataset("docsum")
    assert len(dataset.examples) >= 200
    assert all(is_eval_module(example.id) for example in dataset.examples)
    assert all(example.reference.endswith(".") and len(example.source) >= 150 for example in dataset.examples)
    assert len({example.source for example in dataset.examples}) == len(dataset.examples)


def test_docsum_builder_reproduces_the_shipped_file(tmp_path):
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the shipped set was built from CPython 3.11's standard library")
    assert docsum.build(tmp_path / "docsum.jsonl") == len(load_dataset("docsum").examples)
    assert (tmp_path / "docsum.jsonl").read_text() == docsum.DEFAULT_PATH.read_text()


FOO_PAGE = r""".TH FOO 1
.SH NAME
foo \- frobnicate the widgets of a file
.SH SYNOPSIS
.B foo
[\fIOPTION\fR]... \fIFILE\fR
.SH DESCRIPTION
.B foo
reads each FILE and frobnicates every widget it finds there, in the order the widgets appear.
Widgets that are already frobnicated are left alone.

The result is written to standard output, so the input file is never changed.
.TP
.B \-v
print every widget as it is frobnicated.
"""


def write_page(directory: Path, name: str, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / name, "wt") as handle:
        handle.write(text)


@pytest.mark.skipif(shutil.which("groff") is None, reason="mansum renders man pages with groff")
def test_mansum_takes_name_and_leading_description_one_page_per_family(tmp_path):
    man = tmp_path / "man1"
    write_page(man, "foo.1.gz", FOO_PAGE)
    write_page(man, "foo-extra.1.gz", FOO_PAGE)  # the same family as foo: left out
    write_page(man, "bar.1.gz", ".TH BAR 1\n.SH NAME\nbar \\- no description section at all\n")
    assert mansum.build(tmp_path / "set.jsonl", man, size=5) == 1
    example = json.loads((tmp_path / "set.jsonl").read_text())
    assert example["id"] in ("foo(1)", "foo-extra(1)")
    assert example["reference"] == "frobnicate the widgets of a file"
    assert example["source"] == ("foo reads each FILE and frobnicates every widget it finds there, in the order the "
                                 "widgets appear. Widgets that are already frobnicated are left alone. The result is "
                                 "written to standard output, so the input file is never changed.")


def test_mansum_without_man_pages_is_a_clear_dataset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mansum, "MAN_DIR", tmp_path / "no-man-pages")
    with pytest.raises(DatasetError, match="mansum"):
        load_dataset("mansum")

# ---- harness -----------------------------------------------------------------------------------------------------
def test_summary_json_shape(tmp_path):
    pair = make_pair("llama", with_eos=True)
    config = BiLDConfig(max_new_tokens=6, fallback_threshold=0.5, rollback_threshold=2.0)
    result = evaluate(pair, tiny_dataset(3), ["bild", "small"], config, out_dir=tmp_path, warmup=1)
    summary = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert {"dataset", "n", "large", "small", "methods"} <= set(summary)
    assert (summary["dataset"], summary["n"], summary["large"], summary["small"]) == ("tiny", 3, "llama-large", "llama-small")
    assert list(summary["methods"]) == ["vanilla", "bild", "small"]  # vanilla always runs, first
    for name, values in summary["methods"].items():
        assert ISSUE_KEYS <= set(values)
        for key in ("time_s", "speedup", "tokens_per_s", "exact_match"):
            assert isinstance(values[key], float) and values[key] >= 0
        for key in ("rougeL", "bleu"):
            assert isinstance(values[key], float) and 0 <= values[key] <= 100
    assert summary["methods"]["vanilla"]["speedup"] == 1.0 and summary["methods"]["vanilla"]["exact_match"] == 1.0
    assert summary["methods"]["vanilla"]["fallback_rate"] is None  # transformers generate: no BiLD statistics
    assert isinstance(summary["methods"]["bild"]["fallback_rate"], float)
    rows = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 and {row["method"] for row in rows} == {"vanilla", "bild", "small"}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_lossless_methods_give_the_vanilla_output(family):
    """hf-assisted and hf-prompt-lookup (exact-match verification), speculative and bild-lossless (alpha_RB = 0) are
    lossless by construction."""
    pair = make_pair(family, with_eos=False)  # no EOS: every example runs the full length through many rounds
    config = BiLDConfig(max_new_tokens=12, fallback_threshold=0.5, rollback_threshold=2.0)
    lossless = ["hf-assisted", "hf-prompt-lookup", "speculative", "bild-lossless", "bild-lossless-no-lookup", "vanilla-loop"]
    result = evaluate(pair, tiny_dataset(3), lossless, config, warmup=0)
    for name in lossless:
        assert result.summaries[name].exact_match == 1.0, name
        assert result.summaries[name].new_tokens == 3 * 12
    assert result.summaries["speculative"].fallback_rate == 0.0  # a fixed window: only N triggers the large pass


def test_every_method_runs():
    pair = make_pair("llama", with_eos=True)
    result = evaluate(pair, tiny_dataset(1), method_names(), BiLDConfig(max_new_tokens=4), warmup=0)
    assert set(result.summaries) == set(method_names())


def test_ctrl_c_keeps_finished_examples(tmp_path, monkeypatch):
    pair = make_pair("llama", with_eos=True)
    calls = {"n": 0}
    from bild.eval import methods as methods_module

    real = methods_module._hf_generate

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(methods_module, "_hf_generate", interrupt_on_third)
    result = evaluate(pair, tiny_dataset(4), ["small"], BiLDConfig(max_new_tokens=4), out_dir=tmp_path, warmup=0)
    assert result.interrupted and result.n == 2
    rows = (tmp_path / "examples.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 and result.to_json()["interrupted"] is True


def test_summarize_rates_per_generated_token():
    from bild.eval.harness import ExampleRecord

    stats = {"fallbacks": 2, "rollbacks": 1, "large_passes": 4, "small_time_s": 0.2, "large_time_s": 0.5, "small_tokens_drafted": 7,
             "small_steps": 9}
    record = ExampleRecord(0, "0", "bild", "a b", "a b", 1.0, 8, True, stats)
    baseline = ExampleRecord(0, "0", "vanilla", "a b", "a b", 2.0, 8, True, None)
    summary = summarize([record], [baseline])
    assert (summary.speedup, summary.fallback_rate, summary.rollback_rate) == (2.0, 0.25, 0.125)
    assert summary.tokens_per_large_pass == 2.0 and summary.overhead_s == pytest.approx(0.3) and summary.small_steps == 9
    looping = ExampleRecord(0, "0", "bild", "a b c d a b c d", "a b", 1.0, 8, False, stats)
    assert summary.rep4 is None and summarize([looping], [baseline]).rep4 == pytest.approx(20.0)
    # 8 tokens in 1 s against the baseline's 8 in 2 s: twice the throughput; the same text as the large model's
    assert summary.throughput_ratio == 2.0 and summary.rougeL_vs_large == pytest.approx(100.0)


def test_every_kind_is_summarized_on_its_own(tmp_path):
    pair = make_pair("llama", with_eos=True)
    rows = [{"id": str(i), "kind": "odd" if i % 2 else "even", "source": f"w{5 + i} w9 w10", "reference": "w5 w6"}
            for i in range(4)]
    path = tmp_path / "kinds.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_dataset(str(path), prompt_template="{source}")
    assert [example.kind for example in dataset.examples] == ["even", "odd", "even", "odd"]
    result = evaluate(pair, dataset, ["bild"], BiLDConfig(max_new_tokens=4), warmup=0)
    summary = result.to_json()
    assert set(summary["kinds"]) == {"even", "odd"}
    for kind, methods in summary["kinds"].items():
        assert set(methods) == {"vanilla", "bild"}
        assert methods["vanilla"]["new_tokens"] == sum(r.new_tokens for r in result.records["vanilla"] if r.kind == kind)
    assert "kind odd:" in format_table(summary)


def test_the_mixed_set_has_six_kinds_from_disjoint_sources(tmp_path):
    from bild.eval import mixed

    try:
        mixed.build(tmp_path / "mixed.jsonl")
    except mixed.MixedSourcesMissing as error:
        pytest.skip(str(error))
    rows = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    kinds = {kind: [row for row in rows if row["kind"] == kind] for kind in mixed.KINDS}
    assert all(len(kind_rows) >= 20 for kind_rows in kinds.values())
    assert len({row["id"] for row in rows}) == len(rows)
    packages = {kind: {row["id"].split("-", 1)[1] for row in kinds[kind]} for kind in ("summarize", "question", "passage", "write")}
    assert all(not (packages[a] & packages[b]) for a in packages for b in packages if a < b)  # one kind per package
    for row in kinds["arithmetic"]:
        assert row["reference"].isdigit() or row["reference"].lstrip("-").isdigit()
    assert all(row["reference"] for row in rows if row["kind"] != "write")


# ---- sweep -------------------------------------------------------------------------------------------------------
def test_sweep_reuses_vanilla_and_plots(tmp_path):
    pair = make_pair("llama", with_eos=True)
    smalls = {"aligned": pair.small, "unaligned": pair.small}
    result, evaluation = run_sweep(
        pair.large, smalls, tiny_dataset(2), (0.3, 0.7), (0.0, 3.0), BiLDConfig(max_new_tokens=5), warmup=0
    )
    assert len(result.points) == 2 * 2 * 2 and result.n == 2
    assert sum(name == "vanilla" for name in evaluation.records) == 1
    assert all(p.exact_match == 1.0 for p in (point.summary for point in result.points if point.rollback_threshold == 0))
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert set(data["picks"]) == {"aligned", "unaligned"} and data["vanilla"]["quality"] == result.vanilla_quality
    plot(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_one_picks():
    def point(fb, quality, speedup):
        summary = summarize([], [])
        return SweepPoint("aligned", "s", fb, 2.0, quality, 1 / speedup, speedup, summary)

    points = (point(0.2, 35.0, 1.3), point(0.3, 34.5, 1.6), point(0.4, 33.0, 2.5), point(0.5, 35.2, 1.2))
    result = SweepResult("d", "rougeL", "L", summarize([], []), 35.0, points, 10, False)
    picks = result.picks("aligned")
    assert picks["no_loss"].fallback_threshold == 0.2  # fastest at >= vanilla quality
    assert picks["within_1"].fallback_threshold == 0.3  # fastest within one point


# ---- CLI ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory) -> tuple[Path, Path]:
    pair = make_pair("llama", with_eos=True)
    root = tmp_path_factory.mktemp("pair")
    for role in ("large", "small"):
        loaded = getattr(pair, role)
        loaded.model.save_pretrained(root / role)
        loaded.tokenizer.save_pretrained(root / role)
    return root / "large", root / "small"


def write_tiny_jsonl(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"source": e.source, "reference": e.reference}) + "\n" for e in tiny_dataset(n).examples))
    return path


def test_cli_eval_end_to_end(tmp_path, saved_pair, capsys):
    large, small = saved_pair
    data = write_tiny_jsonl(tmp_path / "d.jsonl")
    code = bild_main([
        "eval", "--dataset", str(data), "--large", str(large), "--small", str(small), "--prompt-template", "{source}",
        "--methods", "vanilla,bild,bild-lossless", "--max-new-tokens", "5", "--json-out", str(tmp_path / "s.json"),
        "--out-dir", str(tmp_path / "rows"), "--no-progress", "--threads", "1",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "bild-lossless" in out and "speedup" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["n"] == 3 and summary["methods"]["bild-lossless"]["exact_match"] == 1.0
    assert (tmp_path / "rows" / "examples.jsonl").is_file() and (tmp_path / "rows" / "summary.json").is_file()


def test_cli_sweep_end_to_end(tmp_path, saved_pair, capsys):
    large, small = saved_pair
    data = write_tiny_jsonl(tmp_path / "d.jsonl", n=2)
    code = bild_main([
        "sweep", "--dataset", str(data), "--large", str(large), "--small", str(small), "--small-unaligned", str(small),
        "--prompt-template", "{source}", "--fallback-thresholds", "0.4", "--rollback-thresholds", "0,2",
        "--max-new-tokens", "4", "--json-out", str(tmp_path / "sweep.json"), "--no-progress",
    ])
    assert code == 0
    assert "no loss" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "sweep.json").read_text())["points"]) == 4
    assert (tmp_path / "sweep.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--methods", "vanilla,nope"], "unknown method nope"),
        (["eval", "--dataset", "{bad}", "--methods", "vanilla"], r"bad\.jsonl:2: not valid JSON"),
        (["eval", "--rollback-threshold", "-1"], "rollback_threshold"),
        (["sweep", "--fallback-thresholds", "0.2,x"], "--fallback-thresholds must be comma-separated numbers"),
        (["sweep", "--fallback-thresholds", "1.5"], "fallback_threshold"),
        (["eval", "--dataset", "xsum-typo"], "not one of the names"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "reference": "b"}\n{oops\n')
    argv = [str(bad) if part == "{bad}" else part for part in argv]
    assert bild_main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("bild ") and re.search(message, error[0])
