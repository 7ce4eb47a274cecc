"""Evaluation data: local JSONL/CSV/TSV files, the built-in offline sets and the paper's datasets by name.

Every source is turned into the same thing, an :class:`EvalDataset` of ``(id, source, reference)`` examples with a
prompt template (``{source}`` is replaced by the example's source text) and the metric the task is judged by.
A malformed file fails as a whole with :class:`DataFormatError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from bild.eval import docsum, mansum, mixed

logger = logging.getLogger(__name__)

Metric = Literal["rougeL", "bleu"]
SUMMARIZE_ONE_SENTENCE = "Summarize in one sentence:\n{source}"
TRANSLATE_DE_EN = "Translate from German to English:\n{source}"


class DatasetError(ValueError):
    """A dataset could not be found, reached or read; the message says which and why."""


class DataFormatError(DatasetError):
    """A data file is malformed; the message names the file, the line and what is missing."""


@dataclass(frozen=True)
class Example:
    id: str
    source: str
    reference: str
    kind: str = ""  # a tag `bild eval` reports separately (the mixed set's kinds); "" for untagged data


@dataclass(frozen=True)
class EvalDataset:
    name: str
    examples: tuple[Example, ...]
    prompt_template: str  # contains "{source}"
    metric: Metric  # the task's quality metric, used for sweep picks and plots

    def prompt(self, example: Example) -> str:
        return self.prompt_template.replace("{source}", example.source)


@dataclass(frozen=True)
class HubDataset:
    """Where one of the paper's datasets lives on the Hugging Face Hub and which fields hold source and reference."""

    path: str
    config: str | None
    split: str
    source_field: str  # dotted, e.g. "translation.de"
    reference_field: str
    prompt_template: str
    metric: Metric


HUB_DATASETS: dict[str, HubDataset] = {
    "iwslt2017": HubDataset("iwslt2017", "iwslt2017-de-en", "test", "translation.de", "translation.en", TRANSLATE_DE_EN, "bleu"),
    "wmt14": HubDataset("wmt14", "de-en", "test", "translation.de", "translation.en", TRANSLATE_DE_EN, "bleu"),
    "xsum": HubDataset("EdinburghNLP/xsum", None, "test", "document", "summary", SUMMARIZE_ONE_SENTENCE, "rougeL"),
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", "test", "article", "highlights", "Summarize:\n{source}", "rougeL"),
}
BUILTIN_DATASETS: dict[str, Callable[[], Path]] = {  # name -> its file (mansum is built on first use)
    "docsum": lambda: docsum.DEFAULT_PATH,
    "mansum": mansum.ensure_built,
    "mixed": mixed.ensure_built,
}
BUILTIN_TEMPLATES: dict[str, str] = {"mixed": "{source}"}  # the mixed set's sources are whole prompts


def dataset_names() -> list[str]:
    return sorted(BUILTIN_DATASETS) + sorted(HUB_DATASETS)


def load_dataset(
    name_or_path: str, prompt_template: str | None = None, limit: int | None = None, metric: Metric | None = None,
    per_kind: int | None = None,
) -> EvalDataset:
    """A built-in name, one of the paper's dataset names or a path to a .jsonl/.csv/.tsv file.

    limit: the first ``limit`` examples; per_kind: the first ``per_kind`` examples of each kind (for tagged sets such
    as ``mixed``), applied before ``limit``."""
    if prompt_template is not None and "{source}" not in prompt_template:
        raise DatasetError(f"prompt template must contain '{{source}}', got {prompt_template!r}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of examples, got {limit}")
    if per_kind is not None and per_kind < 1:
        raise DatasetError(f"per kind must be a positive number of examples, got {per_kind}")
    if name_or_path in BUILTIN_DATASETS:
        try:
            examples = read_file(BUILTIN_DATASETS[name_or_path]())
        except (mansum.ManPagesMissing, mixed.MixedSourcesMissing) as error:
            raise DatasetError(str(error)) from None
        default_template = BUILTIN_TEMPLATES.get(name_or_path, SUMMARIZE_ONE_SENTENCE)
        default_metric = "rougeL"
    elif name_or_path in HUB_DATASETS:
        spec = HUB_DATASETS[name_or_path]
        examples = _read_hub(name_or_path, spec, limit)
        default_template, default_metric = spec.prompt_template, spec.metric
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise DatasetError(
                f"no dataset {name_or_path!r}: not a file, and not one of the names {', '.join(dataset_names())}"
            )
        examples = read_file(path)
        default_template, default_metric = SUMMARIZE_ONE_SENTENCE, "rougeL"
    if per_kind is not None:
        examples = first_of_each_kind(examples, per_kind)
    return EvalDataset(
        name=name_or_path,
        examples=tuple(examples[:limit] if limit else examples),
        prompt_template=prompt_template or default_template,
        metric=metric or default_metric,
    )


def first_of_each_kind(examples: list[Example], count: int) -> list[Example]:
    """The first ``count`` examples of every kind, in their order."""
    taken: dict[str, int] = {}
    kept = []
    for example in examples:
        taken[example.kind] = taken.get(example.kind, 0) + 1
        if taken[example.kind] <= count:
            kept.append(example)
    return kept


def read_file(path: Path) -> list[Example]:
    """Examples from a JSONL, CSV or TSV file with ``source`` and ``reference`` (an optional ``id``)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        examples = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        examples = _read_table(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DatasetError(f"{path}: unknown file type {suffix!r}; use .jsonl, .csv or .tsv")
    if not examples:
        raise DataFormatError(f"{path}: the file has no examples (expected rows with 'source' and 'reference')")
    return examples


def _example(path: Path, line: int, row: object, default_id: str) -> Example:
    if not isinstance(row, dict):
        raise DataFormatError(f"{path}:{line}: expected an object with 'source' and 'reference', got {type(row).__name__}")
    missing = [key for key in ("source", "reference") if key not in row or row[key] is None]
    if missing:
        raise DataFormatError(f"{path}:{line}: missing field {' and '.join(repr(key) for key in missing)}")
    for key in ("source", "reference"):
        if not isinstance(row[key], str):
            raise DataFormatError(f"{path}:{line}: field {key!r} must be a string, got {type(row[key]).__name__}")
    if not row["source"].strip():
        raise DataFormatError(f"{path}:{line}: field 'source' is empty")
    kind = row.get("kind") or ""
    if not isinstance(kind, str):
        raise DataFormatError(f"{path}:{line}: field 'kind' must be a string, got {type(kind).__name__}")
    return Example(id=str(row.get("id") or default_id), source=row["source"], reference=row["reference"], kind=kind)


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") from None
            examples.append(_example(path, line_number, row, default_id=str(len(examples))))
    return examples


def _read_table(path: Path, delimiter: str) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [key for key in ("source", "reference") if key not in header]
        if missing:
            raise DataFormatError(
                f"{path}:1: header has no column {' and '.join(repr(key) for key in missing)} (found {header})"
            )
        examples = []
        for row in reader:
            # A short row leaves missing cells as None; DictReader counts physical lines, quoted newlines included.
            examples.append(_example(path, reader.line_num, row, default_id=str(len(examples))))
    return examples


def _read_hub(name: str, spec: HubDataset, limit: int | None) -> list[Example]:
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DatasetError(
            f"dataset {name!r} is downloaded with the optional 'datasets' package: pip install 'bild[datasets]'"
        ) from None
    split = f"{spec.split}[:{limit}]" if limit else spec.split
    try:
        rows = hf_datasets.load_dataset(spec.path, spec.config, split=split)
    except Exception as error:  # offline, moved or renamed; datasets raises many unrelated types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DatasetError(
            f"cannot load {name!r} ({spec.path}) from the Hugging Face Hub: {first_line}. Offline, use "
            f"--dataset docsum or a local .jsonl/.csv/.tsv file with 'source' and 'reference'"
        ) from error
    return [
        Example(id=f"{name}-{index}", source=_field(row, spec.source_field), reference=_field(row, spec.reference_field))
        for index, row in enumerate(rows)
    ]


def _field(row: dict, dotted: str) -> str:
    for key in dotted.split("."):
        row = row[key]
    return str(row)
