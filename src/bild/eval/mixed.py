"""`mixed`: an offline evaluation set of six kinds of prompt, built from text the machine carries and no little model
is trained on (training never reads the package descriptions; the man pages stay reserved for `mansum`).

- translate: English user-interface messages into German, French or Spanish, with the translators' own strings as
  references, from the gettext catalogs in /usr/share/locale that :func:`bild.train.corpus.is_eval_catalog` reserves
  for evaluation (training translates the other catalogs' messages, and never an English message these have);
- summarize: a Debian package's long description in one sentence, its synopsis as reference (/var/lib/dpkg/status);
- question: "what is the X package for?", answered from the model's own knowledge, the synopsis as reference;
- passage: the same question asked about a given passage (another package's description), answered from it;
- arithmetic: word problems about packages and files, generated with seeded numbers, the exact answer as reference;
- write: open writing on a package's topic, no reference (judge it against the large model's own answers).

Each package serves one kind only (a hash of its name picks which), so no text is shared between kinds. Examples are
tagged with their ``kind``; `bild eval` reports every method per kind. The set is built on first use into the cache
directory (``python -m bild.eval.mixed [path]`` builds it elsewhere) in a fixed pseudo-random order, so a machine with
the same packages gets the same set. Every text keeps its package's license (/usr/share/doc/<package>/copyright);
bild ships none of it.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
from pathlib import Path
from typing import Iterator

from bild.eval.docsum import write_examples
from bild.train.corpus import LANGUAGES, CorpusSourceMissing, iter_translations

PER_KIND = 24
KINDS = ("translate", "summarize", "question", "passage", "arithmetic", "write")
DPKG_STATUS = Path("/var/lib/dpkg/status")
MIN_DESCRIPTION_CHARS, MAX_DESCRIPTION_CHARS = 200, 900


class MixedSourcesMissing(RuntimeError):
    """The machine lacks the package database or the message catalogs the set is built from."""


def default_path() -> Path:
    from bild.models import cache_dir

    return cache_dir() / "mixed-v2.jsonl"  # v2: translations from the eval-reserved catalogs only


def ensure_built(path: Path | None = None) -> Path:
    path = path or default_path()
    if not path.is_file():
        build(path)
    return path


def build(path: Path) -> int:
    """Write the set as JSONL (id, kind, source = the whole prompt, reference); returns the number of examples."""
    packages = list(read_packages())
    if len(packages) < 4 * PER_KIND:
        raise MixedSourcesMissing(f"{DPKG_STATUS} has {len(packages)} usable package descriptions; need {4 * PER_KIND}")
    by_kind = {kind: [p for p in packages if _kind_of(p["name"], ("summarize", "question", "passage", "write")) == kind]
               for kind in ("summarize", "question", "passage", "write")}
    rows = (
        list(_translations(PER_KIND))
        + [_summarize(p) for p in by_kind["summarize"][:PER_KIND]]
        + [_question(p) for p in by_kind["question"][:PER_KIND]]
        + [_passage(p) for p in by_kind["passage"][:PER_KIND]]
        + list(_arithmetic(PER_KIND, [p["name"] for p in packages]))
        + [_write(p) for p in by_kind["write"][:PER_KIND]]
    )
    counts = {kind: sum(row["kind"] == kind for row in rows) for kind in KINDS}
    short = [kind for kind, count in counts.items() if count < PER_KIND]
    if short:
        raise MixedSourcesMissing(f"too few examples of kind {', '.join(short)} on this machine ({counts})")
    return write_examples(path, rows)


# ---- sources ---------------------------------------------------------------------------------------------------

def read_packages(status: Path = DPKG_STATUS) -> Iterator[dict]:
    """Installed packages with a prose long description, in a fixed order (by a hash of the name)."""
    if not status.is_file():
        raise MixedSourcesMissing(f"{status} is missing: the mixed set is built from Debian's package descriptions")
    found = []
    for stanza in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = _fields(stanza)
        description = fields.get("Description", "")
        synopsis, _, body = description.partition("\n")
        long = _prose(body)
        if fields.get("Package") and synopsis and MIN_DESCRIPTION_CHARS <= len(long) <= MAX_DESCRIPTION_CHARS:
            found.append({"name": fields["Package"], "synopsis": synopsis.strip(), "description": long})
    unique = {package["name"]: package for package in found}
    yield from sorted(unique.values(), key=lambda package: _digest(package["name"]))


def _fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line.startswith((" ", "\t")) and key:
            fields[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _prose(body: str) -> str:
    """A long description as plain text: the first paragraph(s) without list items (Debian's ' .' separates)."""
    paragraphs, current = [], []
    for line in body.splitlines():
        text = line.strip()
        if text == ".":
            paragraphs.append(" ".join(current))
            current = []
        elif text.startswith(("*", "-", "+", "o ")) or line.startswith("  "):
            continue
        else:
            current.append(text)
    paragraphs.append(" ".join(current))
    kept = [p for p in paragraphs if p.count(" ") >= 8 and p.endswith(".")]
    return " ".join(kept[:2])


def _translations(count: int) -> Iterator[dict]:
    """Sentences from the installed gettext catalogs, rotating through the languages."""
    pools = {code: sorted(_catalog_sentences(code), key=lambda pair: _digest(pair[0])) for code in LANGUAGES}
    seen: set[str] = set()
    index = 0
    while index < count and any(pools.values()):
        for code, language in LANGUAGES.items():
            while pools[code] and index < count:
                english, translated = pools[code].pop(0)
                if english in seen:
                    continue
                seen.add(english)
                yield {"id": f"translate-{code}-{index}", "kind": "translate",
                       "source": f"Translate into {language}:\n{english}", "reference": translated}
                index += 1
                break


def _catalog_sentences(code: str) -> Iterator[tuple[str, str]]:
    """(English, translation) sentences of the language's eval-reserved catalogs; none when it has no catalogs (the
    other languages then fill the kind, or build() reports it short)."""
    try:
        translations = list(iter_translations(code, split="eval"))
    except CorpusSourceMissing:
        return
    for translation in translations:
        if _is_sentence(translation.english):
            yield translation.english, translation.translated


def _is_sentence(text: str) -> bool:
    """A plain English sentence: 6-30 words, ends like a sentence, no format codes, options or markup."""
    words = text.split()
    return (6 <= len(words) <= 30 and text.strip()[-1:] in ".!?" and "\n" not in text.strip()
            and not re.search(r"%|\{|\}|<|>|--|\\|_|\t|@", text) and text[:1].isupper())


# ---- prompts ---------------------------------------------------------------------------------------------------

def _summarize(package: dict) -> dict:
    return {"id": f"summarize-{package['name']}", "kind": "summarize",
            "source": f"Summarize in one sentence:\n{package['description']}", "reference": package["synopsis"]}


def _question(package: dict) -> dict:
    return {"id": f"question-{package['name']}", "kind": "question",
            "source": f"What is the Debian package '{package['name']}' for? Answer in one sentence.",
            "reference": package["synopsis"]}


def _passage(package: dict) -> dict:
    return {"id": f"passage-{package['name']}", "kind": "passage",
            "source": f"Read the passage and answer the question.\n\nPassage: {package['description']}\n\n"
                      f"Question: according to the passage, what does {package['name']} provide?",
            "reference": package["synopsis"]}


def _write(package: dict) -> dict:
    topic = package["synopsis"].rstrip(".")
    return {"id": f"write-{package['name']}", "kind": "write",
            "source": f"Write a short paragraph for a newcomer about this topic: {topic}.", "reference": ""}


_PROBLEMS = (
    ("A mirror serves {a} downloads of {x} every hour. How many downloads does it serve in {b} hours?",
     lambda a, b: a * b),
    ("A disk holds {a} copies of {x}. {b} copies are deleted. How many copies are left?", lambda a, b: a - b),
    ("{x} has {a} open bug reports and {b} new ones arrive. How many open bug reports are there now?",
     lambda a, b: a + b),
    ("{a} files of {x} are shared equally among {b} servers. How many files does each server get?",
     lambda a, b: a // b),
)


def _arithmetic(count: int, names: list[str]) -> Iterator[dict]:
    """Word problems from four fixed templates, with package names as the nouns and seeded numbers."""
    rng = random.Random(0)
    for index in range(count):
        template, answer = _PROBLEMS[index % len(_PROBLEMS)]
        b = rng.randint(2, 12)
        a = b * rng.randint(3, 40) if "equally" in template else rng.randint(b + 1, 500)
        question = template.format(a=a, b=b, x=names[(index * 7) % len(names)])
        yield {"id": f"arithmetic-{index}", "kind": "arithmetic",
               "source": f"{question} Answer with the number.", "reference": str(answer(a, b))}


def _kind_of(name: str, kinds: tuple[str, ...]) -> str:
    return kinds[int(_digest(name), 16) % len(kinds)]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_path()
    print(f"{build(target)} examples in {target}")
