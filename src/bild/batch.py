"""Files of prompts: read prompt records, answer them one by one, write each answer as it finishes, resume a run.

Input, one JSON object a line (blank lines are skipped)::

    {"id": "q1", "prompt": "Explain photosynthesis.", "max_new_tokens": 64}
    {"messages": [{"role": "user", "content": "Hi"}], "rollback_threshold": 0}

- ``prompt`` (a string) or ``messages`` (chat messages, {"role", "content"}): exactly one of them;
- ``id`` (a string or an integer; default: the line number, counted from 1): what a rerun keys on, so give ids to a
  file whose lines may move;
- optional settings for that line: see :data:`LINE_SETTINGS`; the command line's settings hold for the rest.

Output, one JSON object a line, appended as each answer finishes: ``id``, ``text``, ``finish_reason``, ``method``
("bild" or "vanilla"), ``token_ids`` and ``stats`` (:class:`bild.config.GenerationStats`). A rerun with the same
output skips every id already there; a torn last line (a write cut short by a crash) is dropped and its prompt
answered again. Nothing already written is ever rewritten.

The parts are separate so that other runners (e.g. Ray Data, whose rows are already dicts) can reuse them:
:func:`prompt_record` validates one row, :meth:`PromptRecord.config` gives its settings, :func:`answer_row` makes
the output row, :func:`answered_ids` and :class:`AnswerWriter` handle the output file. No printing here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from bild.config import BiLDConfig, GenerationResult, GenerationStats, SamplingConfig
from bild.decoding import BiLD, Prompt

BILD_SETTINGS = ("fallback_threshold", "rollback_threshold", "max_small_steps", "max_new_tokens", "repeat_ngram")
SAMPLING_SETTINGS = ("temperature", "top_p", "seed")
LINE_SETTINGS = BILD_SETTINGS + SAMPLING_SETTINGS + ("chat",)  # per-line overrides
FIELDS = ("id", "prompt", "messages") + LINE_SETTINGS


class PromptFileError(ValueError):
    """A bad line in a file of prompts or answers; the message names the file and the line."""


@dataclass(frozen=True)
class PromptRecord:
    """One validated prompt line."""

    id: str | int  # the line's "id", or its line number
    line: int  # 1-based line number in the input
    prompt: Prompt  # a string, or chat messages
    settings: tuple[tuple[str, object], ...] = ()  # (name, value) overrides from LINE_SETTINGS except "chat"
    chat: bool | None = None  # None: the chat template when the large model has one

    @property
    def key(self) -> str:
        return id_key(self.id)

    def config(self, base: BiLDConfig) -> BiLDConfig:
        """``base`` with this line's settings; a ValueError names the bad value."""
        overrides = dict(self.settings)
        sampling = replace(base.sampling, **{k: v for k, v in overrides.items() if k in SAMPLING_SETTINGS})
        return replace(base, sampling=sampling, **{k: v for k, v in overrides.items() if k in BILD_SETTINGS})


def id_key(value: str | int) -> str:
    """The key ids are compared by: 5 and "5" differ, as they do in JSON."""
    return json.dumps(value)


def prompt_record(row: dict, line: int, source: str = "input", base: BiLDConfig | None = None) -> PromptRecord:
    """Validate one row (a parsed JSON object); raise :class:`PromptFileError` naming ``source`` and ``line``.

    base: when given, the line's settings are checked against it (bad values are reported here, not mid-run).
    """
    where = f"{source} line {line}"
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise PromptFileError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    if ("prompt" in row) == ("messages" in row):
        raise PromptFileError(f"{where}: give exactly one of 'prompt' (a string) and 'messages' (chat messages)")
    prompt = row["prompt"] if "prompt" in row else row["messages"]
    problem = _prompt_problem(prompt)
    if problem:
        raise PromptFileError(f"{where}: {problem}")
    record_id = row.get("id", line)
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
        raise PromptFileError(f"{where}: 'id' must be a non-empty string or an integer, got {record_id!r}")
    chat = row.get("chat")
    if chat is not None and not isinstance(chat, bool):
        raise PromptFileError(f"{where}: 'chat' must be true or false, got {chat!r}")
    settings = tuple((name, row[name]) for name in BILD_SETTINGS + SAMPLING_SETTINGS if name in row)
    record = PromptRecord(id=record_id, line=line, prompt=prompt, settings=settings, chat=chat)
    if base is not None:
        try:
            record.config(base)
        except (ValueError, TypeError) as error:
            raise PromptFileError(f"{where}: {error}") from None
    return record


def _prompt_problem(prompt: object) -> str | None:
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is empty"
    if not isinstance(prompt, list) or not prompt:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for index, message in enumerate(prompt):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return f"message {index} must be an object with string 'role' and 'content'"
    return None


def parse_prompt_line(text: str, line: int, source: str = "input", base: BiLDConfig | None = None
                      ) -> PromptRecord | None:
    """One line of a prompt file -> a record; None for a blank line."""
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{source} line {line}: not valid JSON ({error.msg} at column {error.colno})") from None
    return prompt_record(row, line, source, base)


def read_prompts(path: str | Path, base: BiLDConfig | None = None) -> list[PromptRecord]:
    """Every record of a prompt file, checked before anything runs: the first bad line raises, naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"cannot read {path}: {error}") from None
    records: list[PromptRecord] = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        record = parse_prompt_line(text, number, str(path), base)
        if record is None:
            continue
        if record.key in first_line:
            raise PromptFileError(f"{path} line {number}: id {record.id!r} is already used on line "
                                  f"{first_line[record.key]}; ids must be unique")
        first_line[record.key] = number
        records.append(record)
    if not records:
        raise PromptFileError(f"{path} has no prompts")
    return records


# ---- the output file --------------------------------------------------------------------------------------------
def answer_row(record: PromptRecord, result: GenerationResult, method: str) -> dict:
    """The output row of one answered prompt."""
    return {"id": record.id, "text": result.text, "finish_reason": result.finish_reason, "method": method,
            "token_ids": result.token_ids, "stats": result.stats.as_dict()}


def answered_ids(path: str | Path) -> tuple[set[str], int]:
    """(keys of the ids already answered in ``path``, byte length of its intact part).

    A missing file has none. Text after the last newline is a torn write (each row is written with its newline in
    one call): it is not counted, and the intact part stops before it. A bad whole line raises, naming it.
    """
    path = Path(path)
    if not path.exists():
        return set(), 0
    *lines, _torn = path.read_bytes().split(b"\n")
    done: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PromptFileError(f"{path} line {number}: not valid JSON; is it a file of answers bild wrote?") from None
        if not isinstance(row, dict) or "id" not in row:
            raise PromptFileError(f"{path} line {number}: an answer needs an 'id'")
        done.add(id_key(row["id"]))
    return done, sum(len(raw) + 1 for raw in lines)


class AnswerWriter:
    """Appends answer rows to a JSONL file, one whole line per write, flushed and synced to disk (``fsync``) so an
    answer once written survives a crash. Opening drops a torn last line first (``dropped_bytes``); nothing else
    already in the file is touched."""

    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        _, intact = answered_ids(self.path)
        self.dropped_bytes = self.path.stat().st_size - intact if self.path.exists() else 0
        if self.dropped_bytes:
            with open(self.path, "r+b") as handle:
                handle.truncate(intact)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass
class BatchTotals:
    """Running totals over the answers of one run (the progress bar and the summary read them)."""

    answered: int = 0
    skipped: int = 0  # already in the output
    new_tokens: int = 0
    small_tokens_kept: int = 0
    fallbacks: int = 0
    rollbacks: int = 0
    wall_time_s: float = 0.0  # generation time of the answered prompts
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def add(self, result: GenerationResult) -> None:
        stats: GenerationStats = result.stats
        self.answered += 1
        self.new_tokens += stats.new_tokens
        self.small_tokens_kept += stats.small_tokens_kept
        self.fallbacks += stats.fallbacks
        self.rollbacks += stats.rollbacks
        self.wall_time_s += stats.wall_time_s
        self.finish_reasons[result.finish_reason] = self.finish_reasons.get(result.finish_reason, 0) + 1

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s else 0.0

    def rate(self, count: str) -> float:
        """``small_tokens_kept``, ``fallbacks`` or ``rollbacks`` per generated token."""
        return getattr(self, count) / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict:
        names = [f.name for f in fields(self)]
        return {**{name: getattr(self, name) for name in names}, "tokens_per_s": self.tokens_per_s,
                "small_share": self.rate("small_tokens_kept"), "fallback_rate": self.rate("fallbacks"),
                "rollback_rate": self.rate("rollbacks")}


def pending(records: Iterable[PromptRecord], done: set[str]) -> list[PromptRecord]:
    """The records whose id is not answered yet, in file order."""
    return [record for record in records if record.key not in done]


def encode_all(engine: BiLD, records: Iterable[PromptRecord], source: str = "input", chat: bool | None = None
               ) -> list[list[int]]:
    """Every record's prompt token ids, before any generation: a prompt that cannot be encoded (too long for the
    model, chat messages without a chat template) raises, naming its line. chat: for lines that do not say."""
    encoded = []
    for record in records:
        try:
            encoded.append(engine.encode(record.prompt, chat if record.chat is None else record.chat))
        except ValueError as error:
            raise PromptFileError(f"{source} line {record.line}: {error}") from None
    return encoded


def answer_all(engine: BiLD, records: list[PromptRecord], prompt_ids: list[list[int]], base: BiLDConfig,
               writer: AnswerWriter, totals: BatchTotals | None = None,
               on_answer: Callable[[PromptRecord, GenerationResult, BatchTotals], None] | None = None
               ) -> Iterator[BatchTotals]:
    """Answer ``records`` in order with BiLD (the large model alone when the pair has no small model), writing each
    row as soon as it is done; yields the totals after every answer. Stopping the iteration (or Ctrl-C) loses only
    the answer in progress."""
    totals = totals or BatchTotals()
    bild = engine.pair.small is not None
    method = "bild" if bild else "vanilla"
    run = engine.generate_ids if bild else engine.vanilla_ids
    for record, ids in zip(records, prompt_ids):
        result = run(ids, record.config(base))
        writer.write(answer_row(record, result, method))
        totals.add(result)
        if on_answer is not None:
            on_answer(record, result, totals)
        yield totals
