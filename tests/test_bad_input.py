"""Every subcommand answers bad command-line input with exit code 2 and one line, before any model loads, and a
write that fails after a finished run still leaves its results on the screen.

The server's bad-input cases (oversized and chunked bodies, NaN, surrogates, Content-Type, shutdown) are in
test_serve.py.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bild.models
from bild.cli import main

from test_eval import saved_pair, write_tiny_jsonl  # noqa: F401  (saved_pair is a fixture)

NO_PROC = not Path("/proc/self").is_dir()  # /proc/x: a place where nothing can be created, on Linux


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input must be refused before any model loads or training starts: either fails the test here."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    # Modules that bind load_model at import are imported (and patched) first: imported while the patch is on, they
    # would keep `refuse` after the test and break every later test that loads a model through them.
    for name in BINDS_LOADERS:
        module = importlib.import_module(name)
        for loader in ("load_model", "load_pair"):
            if hasattr(module, loader):
                monkeypatch.setattr(module, loader, refuse)
    monkeypatch.setattr(bild.models, "load_model", refuse)
    monkeypatch.setattr(bild.models, "load_pair", refuse)
    monkeypatch.setattr("bild.train.early_exit.train_exits", refuse)


BINDS_LOADERS = ("bild.drafters.little", "bild.drafters.early_exit", "bild.train.little", "bild.train.early_exit")


def assert_one_line_exit_2(argv: list[str], message: str, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"bild {argv[0]}: error: ") and "Traceback" not in err[0]
    assert re.search(message, err[0]), err[0]
    return err[0]


# ---- text that is not UTF-8 ------------------------------------------------------------------------------------
# Python decodes argv with surrogateescape: the byte 0xff arrives as the lone surrogate U+DCFF.

@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi \udcff\udcfe there"], r"prompt is not valid UTF-8 text \(byte 0xff at character 3\)"),
        (["demo", "--large", "x\udcff"], r"--large is not valid UTF-8"),
        (["eval", "--prompt-template", "{source}\udce9"], r"--prompt-template is not valid UTF-8 text \(byte 0xe9"),
        (["sweep", "--small-unaligned", "\udcff"], r"--small-unaligned is not valid UTF-8"),
        (["serve", "--model-name", "m\udcff"], r"--model-name is not valid UTF-8"),
        (["align", "--small", "s\udcff", "--inputs", "in.txt", "--out", "out"], r"--small is not valid UTF-8"),
        (["little", "--variants", "aligned\udcff"], r"--variants is not valid UTF-8"),
        (["early-exit", "cost", "--small", "\udcff"], r"--small is not valid UTF-8"),
        (["early-exit", "agreement", "--small", "\udcff"], r"--small is not valid UTF-8"),
    ],
)
def test_text_that_is_not_utf8_is_named(argv, message, capsys):
    assert_one_line_exit_2(argv, message, capsys)


def test_invalid_utf8_prompt_from_a_shell(tmp_path):
    """The reproduction: bild generate "$(printf 'hi \\xff\\xfe there')" in a real process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.run(
        [sys.executable, "-m", "bild", "generate", b"hi \xff\xfe there"], capture_output=True, env=env, timeout=120,
        cwd=tmp_path,
    )
    err = process.stderr.decode(errors="replace").strip().splitlines()
    assert process.returncode == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert "prompt is not valid UTF-8 text (byte 0xff at character 3)" in err[0]


# ---- outputs that cannot be written, checked before the run ------------------------------------------------------

OUTPUTS = [
    (["eval", "--json-out", "{proc}/out.json"], "--json-out", "No such file or directory"),
    (["eval", "--json-out", "{dir}"], "--json-out", "is a directory"),
    (["eval", "--out-dir", "{proc}"], "--out-dir", "No such file or directory"),
    (["eval", "--out-dir", "{file}"], "--out-dir", "is a file, not a directory"),
    (["eval", "--json-out", "{file}/out.json"], "--json-out", "is a file, not a directory"),
    (["sweep", "--json-out", "{proc}/sweep.json"], "--json-out", "No such file or directory"),
    (["sweep", "--plot", "{proc}/sweep.png"], "--plot", "No such file or directory"),
    (["sweep", "--plot", "{dir}"], "--plot", "is a directory"),
    (["sweep", "--out-dir", "{proc}"], "--out-dir", "No such file or directory"),
    (["align", "--small", "s", "--inputs", "{inputs}", "--out", "{proc}/out"], "--out", "No such file or directory"),
    (["align", "--small", "s", "--inputs", "{inputs}", "--out", "{file}"], "--out", "is a file"),
    (["align", "--small", "s", "--inputs", "{inputs}", "--out", "{dir}/o", "--work-dir", "{proc}"], "--work-dir", "No such"),
    (["little", "--out", "{proc}/weights"], "--out", "No such file or directory"),
    (["little", "--work-dir", "{file}"], "--work-dir", "is a file"),
    (["early-exit", "train", "--report", "{proc}/report.json"], "--report", "No such file or directory"),
    (["early-exit", "train", "--out-dir", "{proc}"], "--out-dir", "No such file or directory"),
]


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.skipif(NO_PROC, reason="needs Linux's /proc")
@pytest.mark.parametrize("argv, option, message", OUTPUTS, ids=[" ".join(case[0][:3]) for case in OUTPUTS])
def test_unwritable_outputs_are_refused_before_the_run(argv, option, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "inputs.txt").write_text("a prompt\n")
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("{}\n")
    paths = {"proc": "/proc/no-such-dir", "dir": str(tmp_path), "file": str(tmp_path / "a-file"),
             "inputs": str(tmp_path / "inputs.txt")}
    argv = [part.format(**paths) for part in argv]
    if argv[:2] == ["early-exit", "train"]:
        argv += ["--calibration", str(calibration)]
    line = assert_one_line_exit_2(argv, re.escape(message), capsys)
    assert f"{option} " in line


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_a_write_failing_after_the_run_keeps_the_results(command, tmp_path, saved_pair, capsys, monkeypatch):  # noqa: F811
    """The disk fills up after the run: the results and the summary JSON are on stdout, one line says what failed."""
    large, small = saved_pair
    data = write_tiny_jsonl(tmp_path / "d.jsonl", n=2)

    def disk_full(data, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("bild.eval.harness.write_json", disk_full)
    grid = ["--methods", "vanilla,bild"] if command == "eval" else ["--fallback-thresholds", "0.4", "--rollback-thresholds", "2"]
    argv = [command, "--dataset", str(data), "--large", str(large), "--small", str(small), "--prompt-template",
            "{source}", *grid, "--max-new-tokens", "3", "--json-out", str(tmp_path / "s.json"), "--no-progress",
            "--threads", "1", "--warmup", "0"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(f"^bild {command}: error: could not write .*s.json: No space left on device", errors[0])
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["n"] == 2 and ("vanilla" in captured.out)


# ---- numbers and lists -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--fallback-thresholds", ""], "--fallback-thresholds is empty"),
        (["sweep", "--rollback-thresholds", " , "], "--rollback-thresholds is empty"),
        (["align", "--small", "s", "--inputs", "{inputs}", "--out", "{out}", "--epochs", "-1"], "--epochs must be > 0, got -1"),
        (["align", "--small", "s", "--inputs", "{inputs}", "--out", "{out}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["align", "--small", "s", "--inputs", "{inputs}", "--out", "{out}", "--learning-rate", "nan"], "--learning-rate must be > 0"),
        (["align", "--small", "s", "--inputs", "{dir}", "--out", "{out}"], "is a directory; give a JSONL or text file"),
        (["little", "--epochs", "0"], "--epochs must be > 0"),
        (["serve", "--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1"),
        (["generate", "a prompt", "--lookup", "-1"], "lookup must be an integer >= 0"),
        (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
        (["early-exit", "cost", "--steps", "0"], "--steps and --rounds must be >= 1"),
        (["early-exit", "agreement", "--calibration", "{dir}"], "--calibration .* is a directory"),
        (["early-exit", "train", "--calibration", "{dir}/missing.jsonl"], "--calibration .* does not exist"),
        (["early-exit", "train", "--calibration", "{inputs}", "--epochs", "-1"], "--epochs must be > 0"),
    ],
)
@pytest.mark.usefixtures("no_model_loads")
def test_bad_numbers_and_inputs_are_refused_up_front(argv, message, tmp_path, capsys):
    (tmp_path / "inputs.txt").write_text("a prompt\n")
    paths = {"inputs": str(tmp_path / "inputs.txt"), "out": str(tmp_path / "out"), "dir": str(tmp_path)}
    assert_one_line_exit_2([part.format(**paths) for part in argv], message, capsys)
