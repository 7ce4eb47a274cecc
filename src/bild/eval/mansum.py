"""`mansum`: an offline one-sentence summarization test set built from the machine's own man pages.

Each example is one section-1 man page: the source is the first paragraphs of its DESCRIPTION (prose only, up to the
first option list), the reference is the one-line description its author wrote in NAME ("ls - list directory
contents" -> "list directory contents"). The man pages are reserved for evaluation: nothing in bild trains, calibrates
or tunes on them, and their references were not written like the docstring sentences of `docsum`. One page per
family of pages (git-commit and git-push are both "git"), so big suites do not fill the set.

Pages are rendered with groff and picked in a fixed pseudo-random order (by a hash of the file name), so a machine
with the same packages gets the same set; another machine gets a set of the same kind. The set is built on first use
into the cache directory; build it elsewhere with ``python -m bild.eval.mansum [path]``. Each page keeps its own
license (see /usr/share/doc/<package>/copyright); bild ships none of their text.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from bild.eval.docsum import (MAX_SOURCE_CHARS, MIN_SOURCE_CHARS, MIN_SOURCE_SENTENCES, one_line, sentence_ends,
                              write_examples)

MAN_DIR = Path("/usr/share/man/man1")
SIZE = 200  # examples in the set
MIN_REFERENCE_WORDS, MAX_REFERENCE_WORDS = 3, 30
_BODY_INDENT = " " * 7  # groff's man macros indent section bodies by 7 columns
_HEADING = re.compile(r"^[A-Z][A-Z ]+$")


class ManPagesMissing(RuntimeError):
    """The machine has no man pages or no groff to render them."""


def default_path() -> Path:
    from bild.models import cache_dir

    return cache_dir() / "mansum.jsonl"


def render(page: Path) -> str | None:
    """The page as plain text (no line wrapping), or None when groff cannot render it."""
    try:
        opener = gzip.open if page.suffix == ".gz" else open
        with opener(page, "rb") as handle:
            source = handle.read()
        done = subprocess.run(["groff", "-man", "-Tutf8", "-P", "-cbou", "-rLL=5000n"], input=source,
                              capture_output=True, timeout=20, env={**os.environ, "LC_ALL": "C.UTF-8"})
    except (OSError, EOFError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def sections(text: str) -> dict[str, list[str]]:
    """Section heading -> the section's lines (first occurrence of each heading)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if _HEADING.match(line.rstrip()):
            current = found.setdefault(line.strip(), []) if line.strip() not in found else None
        elif current is not None:
            current.append(line.rstrip())
    return found


def _prose_paragraphs(lines: list[str]) -> list[str]:
    """The section's leading paragraphs at body indent, up to the first indented block or option (-x) line."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if not line.strip():
            if current:
                paragraphs.append(one_line(" ".join(current)))
                current = []
            continue
        if not line.startswith(_BODY_INDENT) or line.startswith(_BODY_INDENT + " ") or line.strip().startswith("-"):
            break
        current.append(line.strip())
    if current and not paragraphs:
        paragraphs.append(one_line(" ".join(current)))
    return paragraphs


def example_from_text(name: str, text: str) -> dict[str, str] | None:
    """{"id", "source", "reference"} for a rendered page that makes a good example, else None."""
    found = sections(text)
    title = one_line(" ".join(found.get("NAME", [])))
    if " - " not in title or "DESCRIPTION" not in found:
        return None
    reference = title.split(" - ", 1)[1].strip()
    if not MIN_REFERENCE_WORDS <= len(reference.split()) <= MAX_REFERENCE_WORDS:
        return None
    source = ""
    for paragraph in _prose_paragraphs(found["DESCRIPTION"]):
        if len(source) + len(paragraph) + 1 > MAX_SOURCE_CHARS:
            break
        source = f"{source} {paragraph}".strip()
    if len(source) < MIN_SOURCE_CHARS or len(sentence_ends(source)) < MIN_SOURCE_SENTENCES:
        return None
    return {"id": name, "source": source, "reference": reference}


def _page_name(page: Path) -> str:
    """ls.1.gz -> ls(1)"""
    stem = page.name.removesuffix(".gz")
    base, _, section = stem.rpartition(".")
    return f"{base}({section})"


def _family(page: Path) -> str:
    """git-commit.1.gz, gcloud_batch.1.gz -> git, gcloud: one example per family keeps big suites from filling the set."""
    return re.split(r"[-_.]", page.name, maxsplit=1)[0]


def iter_examples(man_dir: Path | None = None) -> Iterator[dict[str, str]]:
    """Examples from the pages of ``man_dir`` in a fixed pseudo-random order, one per family of pages."""
    man_dir = man_dir or MAN_DIR
    if shutil.which("groff") is None:
        raise ManPagesMissing("mansum renders man pages with groff, which is not installed (apt-get install groff)")
    pages = sorted((page for page in man_dir.glob("*.1*") if page.is_file()),
                   key=lambda page: hashlib.sha256(page.name.encode()).hexdigest()) if man_dir.is_dir() else []
    if not pages:
        raise ManPagesMissing(f"mansum is built from the man pages in {man_dir}, and there are none")
    families: set[str] = set()
    for page in pages:
        if _family(page) in families:
            continue
        text = render(page)
        example = example_from_text(_page_name(page), text) if text else None
        if example is not None:
            families.add(_family(page))
            yield example


def build(path: Path, man_dir: Path | None = None, size: int = SIZE) -> int:
    """Write up to ``size`` examples to ``path`` (atomically) and return how many; a progress bar on stderr."""
    from tqdm import tqdm

    examples = []
    with tqdm(total=size, desc=f"mansum from {man_dir or MAN_DIR}", unit="ex", file=sys.stderr) as bar:
        for example in iter_examples(man_dir):
            examples.append(example)
            bar.update()
            if len(examples) == size:
                break
    return write_examples(path, examples)


def ensure_built(path: Path | None = None) -> Path:
    """The set's file, built on first use."""
    path = path or default_path()
    if not path.is_file():
        build(path)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    print(f"wrote {build(target)} examples to {target} from {MAN_DIR}")
