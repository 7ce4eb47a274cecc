"""`docsum`: an offline one-sentence summarization dev set built from the standard library's docstrings (PSF License).

Each example is one docstring whose first paragraph is a single sentence (the reference summary, as the docstring's
author wrote it) followed by several sentences of prose (the source). Only modules that
:func:`bild.train.sources.is_eval_module` reserves for evaluation are used, so no example is seen by training or
calibration. The shipped file is ``src/bild/data/docsum.jsonl``; rebuild it with ``python -m bild.eval.docsum``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterator

from bild.train import sources as textsource

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "docsum.jsonl"

# A reference is one plain English sentence: capitalised, no colon (signatures, "Args:"), ends with a full stop.
_SENTENCE = re.compile(r"^[A-Z][^:`>]*[a-z0-9)']\.$")
_SENTENCE_END = re.compile(r"[.!?](\s|$)")
MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 4, 30
MIN_SOURCE_CHARS, MAX_SOURCE_CHARS = 150, 1500
MIN_SOURCE_SENTENCES = 2


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def sentence_ends(text: str) -> list[str]:
    """The sentence ends (., ! or ? before a space or the end) in ``text``."""
    return _SENTENCE_END.findall(text)


def example_from_docstring(doc: textsource.Docstring) -> dict[str, str] | None:
    """{"id", "source", "reference"} for a docstring that makes a good example, else None."""
    parts = re.split(r"\n\s*\n", doc.text, maxsplit=1)
    if len(parts) < 2:
        return None  # a one-paragraph docstring has nothing to summarize
    reference = one_line(parts[0])
    if not _SENTENCE.match(reference) or not MIN_SUMMARY_WORDS <= len(reference.split()) <= MAX_SUMMARY_WORDS:
        return None
    prose = [one_line(paragraph) for paragraph in textsource.paragraphs(parts[1], min_chars=40)]
    # A trailing "... as follows:" introduces code that paragraphs() dropped; the dangling sentence goes too.
    source = re.sub(r"(?<=[.!?])\s[^.!?]*:$", "", " ".join(prose)).strip()
    if not MIN_SOURCE_CHARS <= len(source) <= MAX_SOURCE_CHARS:
        return None
    if len(sentence_ends(source)) < MIN_SOURCE_SENTENCES:
        return None
    return {"id": doc.dotted_name, "source": source, "reference": reference}


def iter_examples(root: Path | None = None) -> Iterator[dict[str, str]]:
    """Examples from the evaluation split of the stdlib, in a fixed order, without duplicate sources."""
    seen: set[str] = set()
    for doc in textsource.iter_docstrings("eval", root=root):
        example = example_from_docstring(doc)
        if example is not None and example["source"] not in seen:
            seen.add(example["source"])
            yield example


def write_examples(path: Path, examples: list[dict[str, str]]) -> int:
    """Write examples as JSONL to ``path`` (atomically, making its folder) and return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    partial.replace(path)
    return len(examples)


def build(path: Path = DEFAULT_PATH, root: Path | None = None) -> int:
    """Write the dev set to ``path`` (atomically) and return its number of examples."""
    return write_examples(path, list(iter_examples(root)))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    print(f"wrote {build(target)} examples to {target} from {textsource.stdlib_dir()}")
