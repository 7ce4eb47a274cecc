"""Files of prompts: every bad line is named, answers are written as they finish, and a rerun resumes exactly."""

from __future__ import annotations

import json

import pytest

from bild.batch import (
    AnswerWriter,
    PromptFileError,
    answered_ids,
    parse_prompt_line,
    prompt_record,
    read_prompts,
)
from bild.cli import main
from bild.config import BiLDConfig
from bild.decoding import BiLD


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def twenty_prompts(path, **extra):
    """20 prompt lines of the tiny word-level vocabulary, half with ids, some with their own settings."""
    rows = []
    for index in range(20):
        row = {"prompt": " ".join(f"w{4 + (index * 7 + k) % 90}" for k in range(3 + index % 4)), **extra}
        if index % 2:
            row["id"] = f"q{index}"
        if index % 5 == 0:
            row["max_new_tokens"] = 4
        rows.append(row)
    return write_lines(path, rows)


# ---- lines ------------------------------------------------------------------------------------------------------
def test_a_line_gives_its_prompt_id_and_settings():
    record = parse_prompt_line('{"id": "a", "prompt": "hi", "rollback_threshold": 0, "temperature": 0.5, "chat": false}', 3)
    assert (record.id, record.line, record.prompt, record.chat) == ("a", 3, "hi", False)
    config = record.config(BiLDConfig(max_new_tokens=9))
    assert config.rollback_threshold == 0 and config.sampling.temperature == 0.5 and config.max_new_tokens == 9
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_record({"messages": messages}, 7).id == 7  # the line number by default
    assert parse_prompt_line("   ", 2) is None


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi"', "input line 4: not valid JSON"),
    ('["hi"]', "input line 4: expected a JSON object"),
    ('{"prompt": "hi", "messages": []}', "input line 4: give exactly one of 'prompt'"),
    ('{"id": 1}', "input line 4: give exactly one of 'prompt'"),
    ('{"prompt": "  "}', "input line 4: the prompt is empty"),
    ('{"messages": [{"role": "user"}]}', "input line 4: message 0 must be an object"),
    ('{"prompt": "hi", "max_new_token": 5}', "input line 4: unknown field 'max_new_token'; allowed: id, prompt"),
    ('{"prompt": "hi", "id": 1.5}', "input line 4: 'id' must be"),
    ('{"prompt": "hi", "fallback_threshold": 2}', "input line 4: fallback_threshold (alpha_FB) must be"),
    ('{"prompt": "hi", "chat": "yes"}', "input line 4: 'chat' must be true or false"),
])
def test_bad_lines_are_named(line, message):
    with pytest.raises(PromptFileError) as error:
        parse_prompt_line(line, 4, base=BiLDConfig())
    assert message in str(error.value)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"id": "x", "prompt": "a"}, {"prompt": "b"}, {"id": "x", "prompt": "c"}])
    with pytest.raises(PromptFileError, match=r"line 3: id 'x' is already used on line 1"):
        read_prompts(path)
    # 2 and "2" are different ids, as in JSON
    assert [r.id for r in read_prompts(write_lines(tmp_path / "q.jsonl", [{"id": 2, "prompt": "a"}, {"id": "2", "prompt": "b"}]))] == [2, "2"]


# ---- the output file --------------------------------------------------------------------------------------------
def test_a_torn_last_line_is_dropped_and_nothing_else_is_touched(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": "q2", "text": "b"}\n{"id": 3, "te')
    done, intact = answered_ids(path)
    assert done == {"1", '"q2"'} and intact == len('{"id": 1, "text": "a"}\n{"id": "q2", "text": "b"}\n')
    with AnswerWriter(path) as writer:
        assert writer.dropped_bytes == len('{"id": 3, "te')
        writer.write({"id": 3, "text": "c"})
    assert [row["id"] for row in read_rows(path)] == [1, "q2", 3]


def test_a_bad_whole_line_in_the_output_is_an_error_and_the_file_is_kept(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(PromptFileError, match="answers.jsonl line 2: not valid JSON"):
        AnswerWriter(path)
    assert path.read_text() == '{"id": 1}\nnot json\n{"id": 2}\n'


# ---- bild generate --input --------------------------------------------------------------------------------------
def generate(llama_dirs, *argv):
    large, small = llama_dirs
    return main(["generate", "--large", str(large), "--small", str(small), "--no-progress", "--max-new-tokens", "12",
                 *argv])


def test_twenty_prompts_resume_after_an_interrupt(llama_dirs, tmp_path, monkeypatch, capsys):
    prompts = twenty_prompts(tmp_path / "prompts.jsonl")
    straight = tmp_path / "straight.jsonl"
    assert generate(llama_dirs, "--input", str(prompts), "--output", str(straight)) == 0
    reference = {json.dumps(row["id"]): row for row in read_rows(straight)}
    assert len(reference) == 20

    # Ctrl-C during the 8th prompt: 7 answers are on disk, the command exits 130
    calls = {"n": 0}
    original = BiLD.generate_ids

    def interrupted(self, prompt_ids, config):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(self, prompt_ids, config)

    monkeypatch.setattr(BiLD, "generate_ids", interrupted)
    answers = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert generate(llama_dirs, "--input", str(prompts), "--output", str(answers)) == 130
    assert "interrupted" in capsys.readouterr().out
    first = read_rows(answers)
    assert len(first) == 7
    with answers.open("a") as handle:  # and a crash mid-write leaves a torn line behind
        handle.write('{"id": "q7", "text": "cut sh')
    monkeypatch.setattr(BiLD, "generate_ids", original)

    calls["n"] = 0
    counted = []
    monkeypatch.setattr(BiLD, "generate_ids", lambda self, ids, config: counted.append(1) or original(self, ids, config))
    assert generate(llama_dirs, "--input", str(prompts), "--output", str(answers)) == 0
    out = capsys.readouterr()
    assert "dropped a torn last line" in out.err
    assert len(counted) == 13  # only the 13 prompts not answered before
    rows = read_rows(answers)
    assert rows[:7] == first  # nothing written before was rewritten
    assert sorted(json.dumps(row["id"]) for row in rows) == sorted(reference)  # every id once
    for row in rows:  # and the same answers as the uninterrupted run, token for token
        assert row["token_ids"] == reference[json.dumps(row["id"])]["token_ids"]
    assert "13 answered now, 7 before, 0 left of 20" in out.out

    assert generate(llama_dirs, "--input", str(prompts), "--output", str(answers)) == 0  # a third run: nothing to do
    assert "already answered" in capsys.readouterr().out and len(read_rows(answers)) == 20


def test_answers_carry_their_statistics_and_per_line_settings(llama_dirs, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [
        {"id": "short", "prompt": "w5 w6 w7", "max_new_tokens": 3},
        {"id": "lossless", "prompt": "w5 w6 w7", "rollback_threshold": 0, "fallback_threshold": 0.3},
    ])
    answers = tmp_path / "a.jsonl"
    assert generate(llama_dirs, "--input", str(prompts), "--output", str(answers)) == 0
    short, lossless = read_rows(answers)
    assert short["id"] == "short" and len(short["token_ids"]) == 3 and short["method"] == "bild"
    assert set(short["stats"]) >= {"new_tokens", "small_tokens_kept", "large_passes", "fallbacks", "rollbacks",
                                   "wall_time_s", "tokens_per_large_pass"}
    assert lossless["stats"]["new_tokens"] == 12
    large, _ = llama_dirs
    vanilla = tmp_path / "vanilla.jsonl"
    assert main(["generate", "--large", str(large), "--small", "none", "--no-progress", "--max-new-tokens", "12",
                 "--input", str(prompts), "--output", str(vanilla)]) == 0
    assert read_rows(vanilla)[1]["method"] == "vanilla"
    assert read_rows(vanilla)[1]["token_ids"] == lossless["token_ids"]  # alpha_RB = 0: the large model's own output
    summary = capsys.readouterr().out
    assert "2 answered now, 0 before, 0 left of 2" in summary and "tok/s" in summary and "rollback" in summary


def test_a_bad_line_stops_the_run_before_anything_and_keeps_the_output(llama_dirs, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "w5"}, {"prompt": "w6"}, '{"prompt": w7}'])
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"id": "old", "text": "kept"}\n')
    assert generate(llama_dirs, "--input", str(prompts), "--output", str(answers)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl line 3: not valid JSON" in err[0]
    assert answers.read_text() == '{"id": "old", "text": "kept"}\n'


@pytest.mark.parametrize("argv, message", [
    (["--input", "p.jsonl"], "--input needs --output"),
    (["--output", "a.jsonl", "hi"], "--output goes with --input"),
    (["--input", "p.jsonl", "--output", "a.jsonl", "hi"], "either a prompt or --input"),
    (["--input", "p.jsonl", "--output", "a.jsonl", "--stream"], "--stream is for one prompt"),
    (["--input", "p.jsonl", "--output", "no/such/dir/a.jsonl"], "must be a file in an existing directory"),
    (["--input", "missing.jsonl", "--output", "a.jsonl"], "cannot read missing.jsonl"),
    ([], "give a prompt, or --input"),
])
def test_file_flags_are_checked(llama_dirs, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "p.jsonl", [{"prompt": "w5"}])
    assert generate(llama_dirs, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
