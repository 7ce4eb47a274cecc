"""`bild tune` and `--config FILE`: the pick rule, the settings file, resuming, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from bild.cli import main
from bild.config import BiLDConfig, DraftCosts, SettingsError, config_with_settings, read_settings
from bild.decoding import BiLD
from bild.eval.datasets import Example
from bild.eval.harness import MethodSummary
from bild.eval.tune import PointResult, TuneError, TuneGrid, TunePoint, TuneResult, keeps_bound
from bild.eval.tune import tune as run_tune
from conftest import TEST_COSTS, make_pair


def summary(speedup: float, exact: float = 1.0, vs_large: float = 100.0) -> MethodSummary:
    return MethodSummary(rougeL=None, bleu=None, time_s=1.0, speedup=speedup, tokens_per_s=1.0, exact_match=exact,
                         fallback_rate=None, rollback_rate=None, tokens_per_large_pass=None, new_tokens=1,
                         mean_time_s=1.0, large_passes=None, small_steps=None, small_time_s=None, large_time_s=None,
                         overhead_s=None, throughput_ratio=speedup, rougeL_vs_large=vs_large)


def result_of(rows: list[tuple[TunePoint, MethodSummary]], max_loss: float, costs=None) -> TuneResult:
    points = tuple(PointResult(point, row, keeps_bound(row, max_loss)) for point, row in rows)
    return TuneResult(points=points, vanilla=summary(1.0), n=3, total=3, max_loss=max_loss, interrupted=False,
                      costs=costs)


LOSSLESS = TunePoint("adaptive", 10, 0.6, 0.0)
LOSSY = TunePoint("fixed", 10, 0.4, 5.0)
EAGER = TunePoint("fixed", 20, 0.2, 10.0)


def test_the_pick_is_the_fastest_point_that_keeps_the_bound():
    rows = [(LOSSLESS, summary(1.2)), (LOSSY, summary(1.6, exact=0.3, vs_large=85.0)),
            (EAGER, summary(2.4, exact=0.0, vs_large=60.0))]
    assert result_of(rows, max_loss=0).pick.point == LOSSLESS  # identical outputs only
    assert result_of(rows, max_loss=20).pick.point == LOSSY  # ROUGE-L vs large >= 80
    assert result_of(rows, max_loss=50).pick.point == EAGER


def test_when_nothing_that_keeps_the_bound_is_faster_the_large_model_runs_alone():
    rows = [(LOSSLESS, summary(0.9)), (LOSSY, summary(1.8, exact=0.2, vs_large=70.0))]
    result = result_of(rows, max_loss=0)
    assert result.pick is None
    settings = result.settings("big", "little", BiLDConfig(max_new_tokens=32))
    assert settings["small"] == "none" and settings["large"] == "big"
    assert "alone" in settings["tuned"]["pick"]


def test_the_settings_file_holds_the_pick_and_reads_back(tmp_path):
    rows = [(LOSSLESS, summary(1.3)), (TunePoint("fixed", 5, 0.5, math.inf), summary(1.1, exact=0.5, vs_large=95.0))]
    costs = DraftCosts(small_step=0.008, large_base=0.06, large_per_token=0.003, large_passes=(0.06, 0.066))
    settings = result_of(rows, max_loss=10, costs=costs).settings("big", "little", BiLDConfig())
    assert (settings["policy"], settings["max_small_steps"], settings["fallback_threshold"],
            settings["rollback_threshold"]) == ("adaptive", 10, 0.6, 0.0)
    assert [row["label"] for row in settings["tuned"]["points"]] == [LOSSLESS.label, "fixed N=5 fb=0.5 rb=inf"]
    path = tmp_path / "bild.json"
    path.write_text(json.dumps(settings, allow_nan=False))
    read = read_settings(path)
    assert read["large"] == "big" and read["small"] == "little" and read["costs"] == costs
    assert "costs" not in result_of(rows, max_loss=10).settings("big", "little", BiLDConfig())  # none measured
    assert config_with_settings(read) == BiLDConfig(policy="adaptive", max_small_steps=10, fallback_threshold=0.6,
                                                    rollback_threshold=0.0)


def test_a_grid_with_a_bad_value_is_refused_naming_it():
    with pytest.raises(TuneError, match="fallback_threshold"):
        TuneGrid(fallback_thresholds=(0.5, 1.5))
    with pytest.raises(TuneError, match="policy"):
        TuneGrid(policies=("eager",))
    with pytest.raises(TuneError, match="empty"):
        TuneGrid(rollback_thresholds=())


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ("[1]", "expected a JSON object"),
    ('{"alpha": 1}', "unknown key 'alpha'"),
    ('{"fallback_threshold": 1.5}', "fallback_threshold"),
    ('{"rollback_threshold": "big"}', "rollback_threshold"),
    ('{"max_small_steps": true}', "max_small_steps"),
    ('{"small": 3}', "'small' must be a model name"),
    ('{"costs": [1, 2]}', "costs must be an object"),
    ('{"costs": {"small_step": 0.01}}', "'large_base' is missing"),
    ('{"costs": {"small_step": 0.01, "large_base": 0.1, "large_per_token": 0, "width": 2}}', "unknown key 'width'"),
    ('{"costs": {"small_step": -1, "large_base": 0.1, "large_per_token": 0}}', "small_step must be a finite number"),
    ('{"costs": {"small_step": 0.01, "large_base": 0.1, "large_per_token": 0, "large_passes": [0.1, 0]}}',
     r"large_passes\[1\] must be > 0"),
])
def test_a_bad_settings_file_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "bild.json"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message):
        read_settings(path)


def prompt_file(path, count: int = 5):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"w{i} w3 w5 w{i + 7}"}) + "\n" for i in range(count)))
    return path


def tune(llama_dirs, *extra: str) -> int:
    large, small = llama_dirs
    return main(["tune", "--large", str(large), "--small", str(small), "--no-chat", "--max-new-tokens", "8",
                 "--no-progress", "--fallback-thresholds", "0.5", "--rollback-thresholds", "0,5", *extra])


def test_tune_writes_settings_that_generate_takes_and_flags_override(llama_dirs, tmp_path, capsys):
    prompts, output = prompt_file(tmp_path / "prompts.jsonl"), tmp_path / "bild.json"
    assert tune(llama_dirs, "--input", str(prompts), "--output", str(output)) == 0
    table = capsys.readouterr().out
    assert "adaptive N=10 fb=0.5 rb=0" in table and "fixed N=10 fb=0.5 rb=5" in table
    settings = json.loads(output.read_text())
    assert settings["tuned"]["prompts"] == 5 and len(settings["tuned"]["points"]) == 4
    lossless = [row for row in settings["tuned"]["points"] if row["rollback_threshold"] == 0]
    assert all(row["exact_match"] == 1.0 and row["keeps_bound"] for row in lossless)  # alpha_RB = 0 stays exact
    assert settings["small"] in ("none", str(llama_dirs[1]))
    if settings["small"] != "none":  # the bound is "identical": the pick is a lossless point
        assert settings["rollback_threshold"] == 0

    # the file's settings are generate's defaults; a flag on the command line wins
    def generated(*flags: str) -> dict:
        capsys.readouterr()
        assert main(["generate", "--config", str(output), "--no-chat", "--json", "--max-new-tokens", "6", *flags,
                     "w1 w3 w5"]) == 0
        return json.loads(capsys.readouterr().out)

    alone = generated("--small", "none")
    assert alone["method"] == "vanilla"
    assert generated()["token_ids"] == alone["token_ids"]  # lossless pick, or the large model alone
    assert generated("--small", str(llama_dirs[1]), "--rollback-threshold", "0")["method"] == "bild"


def test_config_sets_the_defaults_of_eval_serve_and_sweep(tmp_path):
    from bild.cli import build_parser
    from bild.cli.common import apply_settings_file

    path = tmp_path / "bild.json"
    path.write_text(json.dumps({"large": "big", "small": "little", "fallback_threshold": 0.3,
                                "rollback_threshold": "inf", "policy": "fixed", "max_small_steps": 7}))
    parser = build_parser()
    for command in (["eval"], ["serve"], ["sweep"], ["generate", "hi"]):
        argv = command + ["--config", str(path), "--max-small-steps", "3"]
        apply_settings_file(parser.subcommands[command[0]], path)
        args = parser.parse_args(argv)
        assert (args.large, args.small, args.policy, args.max_small_steps) == ("big", "little", "fixed", 3)
        if command[0] != "sweep":  # sweep takes threshold grids, not one value
            assert (args.fallback_threshold, args.rollback_threshold) == (0.3, math.inf)
    path.write_text(json.dumps({"costs": {"small_step": 0.01, "large_base": 0.1, "large_per_token": 0.002}}))
    for command in (["serve"], ["generate", "hi"]):  # the commands that build an engine of their own
        assert parser.parse_args(command).costs is None
        apply_settings_file(parser.subcommands[command[0]], path)
        assert parser.parse_args(command + ["--config", str(path)]).costs == DraftCosts(0.01, 0.1, 0.002)


def no_clock(*_args, **_kwargs):
    raise AssertionError("the engine timed the pair although its costs were fixed")


def test_a_resumed_tune_plans_with_the_costs_of_its_first_part(tmp_path, monkeypatch):
    first = DraftCosts(small_step=0.05, large_base=1.0, large_per_token=0.02)
    examples = [Example(id=f"p{index}", source=f"w{index} w3 w5", reference="") for index in range(2)]
    grid = TuneGrid(policies=("adaptive",), max_small_steps=(4,), fallback_thresholds=(0.5,), rollback_thresholds=(0.0,))

    def run(count: int) -> TuneResult:
        return run_tune(make_pair("llama"), examples[:count], [example.source for example in examples[:count]], grid,
                        BiLDConfig(max_new_tokens=6), max_loss=0, work_dir=tmp_path, run_key={"test": 1}, chat=False)

    monkeypatch.setattr(BiLD, "measure_costs", lambda self, prompt_ids, longest, repeats=3: first)
    assert run(1).costs == first
    monkeypatch.setattr(BiLD, "measure_costs", no_clock)
    resumed = run(2)  # the second prompt runs now, planned with the costs the first one ran with
    assert resumed.n == 2 and resumed.costs == first
    assert run(2).costs == first  # nothing left to run: the kept costs still go into the settings


def test_a_settings_files_costs_are_what_the_engine_plans_with(llama_dirs, tmp_path, monkeypatch, capsys):
    costs = DraftCosts(small_step=0.3, large_base=1.0, large_per_token=0.05, large_passes=(1.0, 1.4))
    path = tmp_path / "bild.json"
    path.write_text(json.dumps({"large": str(llama_dirs[0]), "small": str(llama_dirs[1]), "costs": costs.as_dict()}))
    planned = []
    original = BiLD._start_adaptation

    def watch(self, config, prompt_ids):
        planned.append(self.costs)
        return original(self, config, prompt_ids)

    monkeypatch.setattr(BiLD, "_start_adaptation", watch)
    monkeypatch.setattr(BiLD, "measure_costs", no_clock)
    assert main(["generate", "--config", str(path), "--no-chat", "--json", "--max-new-tokens", "6", "w1 w3 w5"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "bild"
    assert planned == [costs]

    # `bild serve` (one process) plans with them too
    served = []
    monkeypatch.setattr("bild.serve.create_app", lambda engine, *_args, **_kwargs: served.append(engine.costs))
    monkeypatch.setattr("bild.serve.run", lambda *_args, **_kwargs: True)
    assert main(["serve", "--config", str(path)]) == 0
    assert served == [costs]

    # another small model on the command line than the file's: its costs were not timed with it, so it times its own
    timed = []
    monkeypatch.setattr(BiLD, "measure_costs", lambda self, prompt_ids, longest, repeats=3: timed.append(1) or TEST_COSTS)
    other = str(llama_dirs[1]) + "/"  # the same checkpoint, named otherwise: as good as another model here
    assert main(["generate", "--config", str(path), "--small", other, "--no-chat", "--max-new-tokens", "6", "w1"]) == 0
    assert planned[-1] is None and timed == [1]  # no fixed costs: the engine timed the pair
    assert "note: the settings file's costs were timed with its own small model" in capsys.readouterr().err


def test_an_interrupted_tune_keeps_its_rows_and_the_rerun_does_only_the_rest(llama_dirs, tmp_path, monkeypatch,
                                                                            capsys):
    prompts, output = prompt_file(tmp_path / "prompts.jsonl"), tmp_path / "bild.json"
    original = BiLD.generate_ids
    calls = {"n": 0}

    def interrupted(self, prompt_ids, config):
        calls["n"] += 1
        if calls["n"] == 4 * 3 + 2:  # 4 points; warm-up, prompts 1 and 2 done, then Ctrl-C during prompt 3
            raise KeyboardInterrupt
        return original(self, prompt_ids, config)

    monkeypatch.setattr(BiLD, "generate_ids", interrupted)
    assert tune(llama_dirs, "--input", str(prompts), "--output", str(output)) == 130
    assert "2 of 5 prompts done" in capsys.readouterr().err
    assert not output.exists()
    rows = (tmp_path / "bild.tune" / "examples.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 5  # vanilla and 4 points for each finished prompt
    with (tmp_path / "bild.tune" / "examples.jsonl").open("a") as handle:
        handle.write('{"index": 2, "id": "p2", "meth')  # a torn line from a crash mid-write

    counted = []
    monkeypatch.setattr(BiLD, "generate_ids", lambda self, ids, config: counted.append(1) or original(self, ids, config))
    assert tune(llama_dirs, "--input", str(prompts), "--output", str(output), "--warmup", "0") == 0
    assert len(counted) == 4 * 3  # only the three prompts not done
    settings = json.loads(output.read_text())
    assert settings["tuned"]["prompts"] == 5
    ids = [json.loads(row)["id"] for row in (tmp_path / "bild.tune" / "examples.jsonl").read_text().splitlines()]
    assert sorted(set(ids)) == [f"p{i}" for i in range(5)] and len(ids) == 25

    # other settings in the same work directory are refused before any model loads
    capsys.readouterr()
    assert tune(llama_dirs, "--input", str(prompts), "--output", str(output), "--max-small-steps", "4") == 2
    assert "holds a tune run with other settings (grid)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    ([], "--input FILE or --dataset NAME"),
    (["--input", "{prompts}", "--dataset", "docsum"], "--input FILE or --dataset NAME"),
    (["--input", "{prompts}", "--max-loss", "150"], "max loss must be in [0, 100]"),
    (["--input", "{prompts}", "--rollback-thresholds", "0,x"], "--rollback-thresholds must be comma-separated"),
    (["--input", "{prompts}", "--max-small-steps", "2.5"], "--max-small-steps must be comma-separated integers"),
    (["--input", "{prompts}", "--policies", "adaptive,eager"], "policy must be"),
    (["--input", "{settings_line}"], "tune chooses the settings itself; remove 'max_new_tokens'"),
    (["--input", "{prompts}", "--small", "none"], "tune needs a small model"),
])
def test_bad_tune_input_is_one_line_and_exit_code_2(llama_dirs, tmp_path, capsys, flags, message):
    prompts = prompt_file(tmp_path / "prompts.jsonl")
    settings_line = tmp_path / "settings.jsonl"
    settings_line.write_text('{"prompt": "w1", "max_new_tokens": 4}\n')
    flags = [flag.format(prompts=prompts, settings_line=settings_line) for flag in flags]
    assert tune(llama_dirs, "--output", str(tmp_path / "bild.json"), *flags) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("bild tune: error:") and message in error
