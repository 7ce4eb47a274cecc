"""The benchmark suite's own machinery: provenance stamps, never-overwritten result files, a script end to end on
tiny seeded models, and the results table (RESULTS.md and README.md's marked block)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import make_pair, save_pair

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import adaptive  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import common  # noqa: E402
import distil_trial  # noqa: E402
import paper_table  # noqa: E402
import results_table  # noqa: E402
import vocab_trial  # noqa: E402

README = "# project\n\nintro\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\nafter\n"


def fake_result(results_dir: Path, speedup: float, date: str, dataset: str = "docsum") -> Path:
    """A paper-table result file as paper_table.py writes it, with made-up figures and date."""
    stamp = common.provenance("benchmarks/paper_table.py", ["--limit", "2"])
    stamp["date_utc"] = date
    method = {"tokens_per_s": common.spread([10, 11, 12]), "rougeL": 12.5, "rep4": 1.0, "exact_match": 0.5,
              "fallback_rate": 0.1, "rollback_rate": 0.02, "tokens_per_large_pass": 3.25, "same_outputs_every_repeat": True}
    results = {
        "dataset": dataset, "n": 2, "repeats": 3,
        "config": {"max_new_tokens": 8, "fallback_threshold": 0.6, "rollback_threshold": 5.0, "max_small_steps": 10},
        "methods": {"vanilla": {**method, "speedup": common.spread([1, 1, 1]), "fallback_rate": None,
                                "exact_match": 1.0, "tokens_per_large_pass": None},
                    "bild": {**method, "speedup": common.spread([speedup - 0.1, speedup, speedup + 0.2])}},
    }
    path = common.result_path("paper-table", stamp, results_dir)
    return common.write_result(path, "paper-table", stamp, {"limit": 2}, results)


# ---- provenance and result files -------------------------------------------------------------------------------
def test_provenance_names_the_commit_weights_versions_and_machine():
    stamp = common.provenance("benchmarks/paper_table.py", ["--limit", "3"])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert stamp["git"]["commit"] == head and isinstance(stamp["git"]["dirty"], bool)
    from bild.drafters import WEIGHTS_DIR

    shipped = sorted(path.name for path in WEIGHTS_DIR.glob("*.safetensors"))
    assert sorted(stamp["drafter_weights_sha256"]) == shipped and "aligned.safetensors" in shipped
    assert stamp["drafter_weights_sha256"]["aligned.safetensors"] == common.sha256(WEIGHTS_DIR / "aligned.safetensors")
    assert re.fullmatch(r"[0-9a-f]{64}", stamp["drafter_weights_sha256"]["aligned.safetensors"])
    assert stamp["versions"]["torch"] == torch.__version__ and stamp["versions"]["bild"]
    assert stamp["cpu_count"] == os.cpu_count() and stamp["torch_threads"] == torch.get_num_threads()
    assert len(stamp["load"]["start"]["average"]) == 3 and stamp["load"]["end"] is None
    assert stamp["command"] == "python benchmarks/paper_table.py --limit 3"
    datetime.strptime(stamp["date_utc"], "%Y-%m-%dT%H:%M:%SZ")
    done = common.finish(stamp)
    assert done["load"]["one_minute_during_run"]["median"] >= 0 and "_sampler" not in done
    assert len(done["load"]["end"]["average"]) == 3 and done["wall_time_s"] >= 0 and "_started" not in done


def test_a_result_file_is_written_once_and_never_overwritten(tmp_path):
    stamp = common.provenance("benchmarks/lossless.py", [])
    path = common.result_path("lossless", stamp, tmp_path)
    assert re.fullmatch(r"lossless-\d{8}-\d{6}-[0-9a-f]{7}\.json", path.name)
    common.write_result(path, "lossless", stamp, {"limit": 1}, {"x": 1})
    data = json.loads(path.read_text())
    assert data["question"] == "lossless" and data["results"] == {"x": 1} and data["provenance"]["wall_time_s"] >= 0
    with pytest.raises(common.BenchmarkError, match="never overwritten"):
        common.result_path("lossless", stamp, tmp_path)
    with pytest.raises(common.BenchmarkError, match="never overwritten"):
        common.write_result(path, "lossless", stamp, {}, {"x": 2})
    assert json.loads(path.read_text())["results"] == {"x": 1}


def test_spread_is_median_min_max():
    assert common.spread([3.0, 1.0, 2.5]) == {"median": 2.5, "min": 1.0, "max": 3.0, "values": [3.0, 1.0, 2.5]}


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert common.main_guard(paper_table.main, ["--repeats", "2", "--results-dir", str(tmp_path)]) == 2
    assert common.main_guard(paper_table.main, ["--methods", "vanilla,nope", "--results-dir", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["paper_table.py: error: --repeats must be >= 3 (timed figures are medians of repeats), got 2",
                      errors[1]] and errors[1].startswith("paper_table.py: error: unknown method nope")
    assert not list(tmp_path.iterdir())
    out = tmp_path / "trial"
    assert common.main_guard(distil_trial.main, ["--mix", "raw", "--steps", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "distil_trial.py: error: --steps, --batch-size and --threads must be at least 1")
    assert not out.exists()
    with pytest.raises(common.BenchmarkError, match="--candidate takes DIR:variant"):
        common.load_candidate(f"{tmp_path}:aligned", large=None)  # no aligned.safetensors there
    for sizes, weights, error in (
            ("8192,x", None, "--sizes takes comma-separated integers, got '8192,x'"),
            ("8192,-1", None, "--sizes: -1 is not a draft vocabulary size (a positive number of tokens, or 0 for the "
                              "whole vocabulary)"),
            ("0", tmp_path, f"{tmp_path / 'aligned.safetensors'} does not exist (--weights takes a directory of "
                            "little-model weights)")):
        argv = ["--sizes", sizes, "--out", str(out)] + (["--weights", str(weights)] if weights else [])
        assert common.main_guard(vocab_trial.main, argv) == 2
        assert capsys.readouterr().err.strip() == f"vocab_trial.py: error: {error}"
    assert not out.exists()


# ---- a script end to end, then the table -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """paper_table.py on a tiny seeded pair and a three-example dataset: its one result file."""
    root = tmp_path_factory.mktemp("bench")
    pair = make_pair("llama", with_eos=True)
    for role in ("large", "small"):
        getattr(pair, role).model.save_pretrained(root / role)
        getattr(pair, role).tokenizer.save_pretrained(root / role)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"source": " ".join(f"w{4 + (7 * i + 3 * j) % 90}" for j in range(4 + i)),
                                        "reference": "w5 w6 w7"}) + "\n" for i in range(3)))
    results = root / "results"
    code = paper_table.main([
        "--large", str(root / "large"), "--small", str(root / "small"), "--dataset", str(data),
        "--prompt-template", "{source}", "--methods", "bild,bild-lossless,speculative", "--max-new-tokens", "6",
        "--threads", "1", "--results-dir", str(results),
    ])
    assert code == 0
    (path,) = results.iterdir()
    return path, json.loads(path.read_text())


def test_paper_table_runs_repeats_and_stamps_them(tiny_run):
    path, data = tiny_run
    assert path.name.startswith("paper-table-") and data["question"] == "paper-table"
    results = data["results"]
    assert results["n"] == 3 and results["repeats"] == 3 and data["settings"]["max_new_tokens"] == 6
    assert list(results["methods"]) == ["vanilla", "bild", "bild-lossless", "speculative"]
    for name, method in results["methods"].items():
        speed = method["speedup"]
        assert len(speed["values"]) == 3 and speed["min"] <= speed["median"] <= speed["max"]
        assert method["same_outputs_every_repeat"], name  # greedy: the same tokens in every repeat
    assert results["methods"]["vanilla"]["speedup"]["values"] == [1.0, 1.0, 1.0]
    assert results["methods"]["bild-lossless"]["exact_match"] == 1.0  # alpha_RB = 0 is the large model's output
    assert results["methods"]["speculative"]["exact_match"] == 1.0
    assert len(results["examples"]) == 3 * 4 and all(len(row["time_s"]) == 3 for row in results["examples"])
    assert data["provenance"]["torch_threads"] == 1 and data["provenance"]["load"]["end"]["average"]


def test_results_table_writes_results_md_and_the_readme_block(tiny_run, tmp_path):
    path, data = tiny_run
    readme, out = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text(README)
    argv = ["--results-dir", str(path.parent), "--cited", str(tmp_path / "none.json"), "--out", str(out),
            "--readme", str(readme)]
    assert results_table.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n\n<!-- results:start -->\n") and text.endswith("<!-- results:end -->\n\nafter\n")
    assert "old table" not in text
    link = os.path.relpath(path, tmp_path)
    bild = data["results"]["methods"]["bild"]["speedup"]
    assert f"[{bild['median']:.2f}x]({link}) ({bild['min']:.2f}-{bild['max']:.2f})" in text
    assert "| BiLD lossless (alpha_FB 0.6 / alpha_RB 0 / N 10) | [" in text and f"[1.00]({link})" in text  # its exact match
    results_md = out.read_text()
    assert f"[{bild['median']:.2f}x]({link})" in results_md and "No result yet: `python benchmarks/sweep.py`" in results_md
    assert results_table.main(argv) == 0 and readme.read_text() == text  # regenerating changes nothing


def test_a_result_measured_with_earlier_drafter_weights_says_so(tmp_path):
    results = tmp_path / "results"
    path = fake_result(results, 1.5, "2026-01-01T00:00:00Z")
    argv = ["--results-dir", str(results), "--out", str(tmp_path / "R.md"), "--no-readme",
            "--cited", str(tmp_path / "none.json")]
    assert results_table.main(argv) == 0
    assert "earlier drafter weights" not in (tmp_path / "R.md").read_text()
    data = json.loads(path.read_text())
    data["provenance"]["drafter_weights_sha256"]["aligned.safetensors"] = "0123456789abcdef" * 4
    path.write_text(json.dumps(data))
    assert results_table.main(argv) == 0
    assert ("**Measured with earlier drafter weights, not the ones shipped now:** `aligned.safetensors` 01234567."
            in (tmp_path / "R.md").read_text())


def test_readme_without_markers_is_left_alone(tmp_path, capsys):
    results = tmp_path / "results"
    fake_result(results, 1.5, "2026-01-01T00:00:00Z")
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    assert results_table.main(["--results-dir", str(results), "--out", str(tmp_path / "R.md"), "--readme", str(readme),
                               "--cited", str(tmp_path / "none.json")]) == 0
    assert readme.read_text() == "# no markers here\n"
    assert "has no '<!-- results:start -->'" in capsys.readouterr().err
    assert "[1.50x](results/paper-table-20260101-000000-" in (tmp_path / "R.md").read_text()


def test_the_newest_result_is_used_unless_one_is_cited(tmp_path, capsys):
    results = tmp_path / "results"
    older = fake_result(results, 1.25, "2026-01-01T00:00:00Z")
    fake_result(results, 1.75, "2026-02-01T00:00:00Z")
    argv = ["--results-dir", str(results), "--out", str(tmp_path / "R.md"), "--no-readme", "--cited", str(tmp_path / "cited.json")]
    assert results_table.main(argv) == 0
    assert "[1.75x]" in (tmp_path / "R.md").read_text() and "[1.25x]" not in (tmp_path / "R.md").read_text()
    (tmp_path / "cited.json").write_text(json.dumps({"paper-table": older.name}))
    assert results_table.main(argv) == 0
    assert "[1.25x]" in (tmp_path / "R.md").read_text() and "[1.75x]" not in (tmp_path / "R.md").read_text()
    (tmp_path / "cited.json").write_text(json.dumps({"paper-table": "gone.json"}))
    assert common.main_guard(results_table.main, argv) == 2
    assert capsys.readouterr().err.strip().endswith("does not exist")


def test_each_dataset_keeps_its_newest_result_and_a_list_cites_several(tmp_path):
    results = tmp_path / "results"
    docsum = fake_result(results, 1.25, "2026-01-01T00:00:00Z")
    mansum = fake_result(results, 0.95, "2026-01-02T00:00:00Z", dataset="mansum")
    argv = ["--results-dir", str(results), "--out", str(tmp_path / "R.md"), "--no-readme", "--cited", str(tmp_path / "cited.json")]
    assert results_table.main(argv) == 0
    text = (tmp_path / "R.md").read_text()
    assert "### docsum" in text and "### mansum" in text and "[1.25x]" in text and "[0.95x]" in text
    (tmp_path / "cited.json").write_text(json.dumps({"paper-table": [mansum.name]}))
    assert results_table.main(argv) == 0
    text = (tmp_path / "R.md").read_text()
    assert "[0.95x]" in text and "[1.25x]" not in text and "###" not in text
    (tmp_path / "cited.json").write_text(json.dumps({"paper-table": [docsum.name, mansum.name]}))
    assert results_table.main(argv) == 0
    assert "[1.25x]" in (tmp_path / "R.md").read_text() and "[0.95x]" in (tmp_path / "R.md").read_text()


# ---- adaptive.py: the perfect-policy ceiling and a tagged run ----------------------------------------------------

def test_a_perfect_policy_drafts_exactly_the_runs_the_large_model_accepts():
    from bild.policies import DraftCosts

    costs = DraftCosts(small_step=0.1, large_base=1.0, large_per_token=0.02)
    # the first token comes from the prefill; then a run of 2 (ended by a miss the large pass writes), then 3
    agrees = [False, True, True, False, True, True, True]
    assert adaptive.perfect_policy_cost(agrees, costs, longest=10) == pytest.approx(
        costs.round_time(2) + costs.round_time(3))
    assert adaptive.perfect_policy_cost([True] * 7, costs, longest=2) == pytest.approx(2 * costs.round_time(2))
    # a small model that is never right: the large model steps alone, exactly as fast as without drafting
    assert adaptive.perfect_policy_cost([False] * 7, costs, longest=10) == pytest.approx(6 * costs.large_base)


def test_teacher_forced_agreement_is_total_for_a_copy_and_partial_for_another_model():
    same, other = make_pair("llama", same=True), make_pair("llama", noise=0.5)
    prompt = [5, 9, 13, 17]
    greedy = same.large.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    output = greedy[0, len(prompt):].tolist()
    assert adaptive.teacher_forced_agreement(same.small, prompt, output) == [True] * 6
    assert adaptive.teacher_forced_agreement(other.small, prompt, output) != [True] * 6


@pytest.mark.parametrize("same, policy", [(False, "fixed"), (True, "fixed"), (True, "adaptive")])
def test_the_replay_charges_the_rounds_the_engine_runs(same, policy):
    """Lossless, with alpha_FB = 0 (no fallback depends on a confidence after a rejected draft), the replay of a
    policy from teacher-forced data runs the engine's rounds exactly: same passes, same drafts."""
    from bild.config import BiLDConfig
    from bild.decoding import BiLD
    from conftest import TEST_COSTS

    pair = make_pair("llama", same=same, noise=0.5)
    engine = BiLD(pair, costs=TEST_COSTS)
    config = BiLDConfig(fallback_threshold=0.0, rollback_threshold=0.0, max_new_tokens=40, policy=policy)
    costs = []
    for seed in range(3):
        prompt = [5 + seed, 9, 13, 17, 21]
        result = engine.generate_ids(prompt, config)
        stats = result.stats
        assert stats.rollbacks > 0 or same
        engine_cost = ((stats.large_passes - 1) * TEST_COSTS.large_base + stats.fallbacks * TEST_COSTS.small_step
                       + stats.small_tokens_drafted * (TEST_COSTS.small_step + TEST_COSTS.large_per_token))
        trace = adaptive.teacher_forced_trace(pair.small, pair.large, prompt, result.token_ids)
        costs.append((adaptive.replay_cost(engine, config, trace), engine_cost))
    assert [replayed for replayed, _ in costs] == pytest.approx([cost for _, cost in costs])


def test_adaptive_reports_every_kind_and_the_ceiling(tmp_path):
    large, small = save_pair(tmp_path, "llama", with_eos=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"source": " ".join(f"w{4 + (7 * i + 3 * j) % 90}" for j in range(4 + i)),
                                        "reference": "w5 w6", "kind": "ab"[i % 2]}) + "\n" for i in range(6)))
    code = adaptive.main(["--large", str(large), "--small", str(small), "--dataset",
                          str(data), "--prompt-template", "{source}", "--per-kind", "2", "--methods",
                          "bild,bild-lossless", "--max-new-tokens", "6", "--threads", "1", "--results-dir",
                          str(tmp_path / "results")])
    assert code == 0
    (path,) = (tmp_path / "results").iterdir()
    results = json.loads(path.read_text())["results"]
    assert results["n"] == 4 and sorted(results["kinds"]) == ["a", "b"]
    for kind in ("a", "b"):
        lossless = results["kinds"][kind]["bild-lossless"]
        assert lossless["exact_match"] == 1.0 and len(lossless["speedup"]["values"]) == 3
        ceiling = results["ceiling"]["kinds"][kind]
        assert 0.0 <= ceiling["agreement"] <= 1.0 and ceiling["perfect_lossless_speedup"] >= 1.0
        replayed = ceiling["replayed_speedup"]
        assert set(replayed) == set(adaptive.REPLAYED) and all(value > 0 for value in replayed.values())
        # no lossless policy beats the perfect one
        assert max(replayed["bild-lossless"], replayed["bild-lossless-fixed"]) <= ceiling["perfect_lossless_speedup"]
    assert set(results["ceiling"]["kinds"]) == {"a", "b", "overall"}


def test_adaptive_replay_only_runs_nothing_timed(tmp_path):
    large, small = save_pair(tmp_path, "llama", with_eos=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"source": f"w{5 + i} w{9 + i}", "reference": "", "kind": "ab"[i % 2]}) + "\n"
                            for i in range(4)))
    code = adaptive.main(["--large", str(large), "--small", str(small), "--dataset", str(data), "--prompt-template",
                          "{source}", "--replay-only", "--max-new-tokens", "6", "--threads", "1", "--results-dir",
                          str(tmp_path / "results")])
    assert code == 0
    (path,) = (tmp_path / "results").iterdir()
    results = json.loads(path.read_text())["results"]
    assert "methods" not in results and set(results["ceiling"]["kinds"]) == {"a", "b", "overall"}
    refused = ["--replay-only", "--no-ceiling", "--results-dir", str(tmp_path / "results")]
    assert common.main_guard(adaptive.main, refused) == 2


def test_agreement_is_total_for_a_copy_of_the_large_model_per_kind(tmp_path):
    import agreement

    large, _ = save_pair(tmp_path, "llama", with_eos=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"source": f"w{5 + i} w{9 + i} w{20 + i}", "reference": "", "kind": "ab"[i % 2]})
                            + "\n" for i in range(4)))
    code = agreement.main(["--large", str(large), "--drafters", str(large), "--datasets", str(data),
                           "--max-new-tokens", "6", "--threads", "1", "--results-dir", str(tmp_path / "results")])
    assert code == 0
    (path,) = (tmp_path / "results").iterdir()
    rows = json.loads(path.read_text())["results"]["datasets"][str(data)]["drafters"][str(large)]
    assert sorted(rows) == ["a", "b", "overall"]
    assert all(row["agreement"] == 1.0 and row["tokens"] > 0 for row in rows.values())  # the large model drafting
