"""Broad training text from Debian packages any machine like this one can install (``data/little-packages.txt``):
three dictionaries (WordNet, GCIDE, FOLDOC), two manuals (the Python documentation, the Debian Reference), the
fortune cookies, and the gettext message catalogs that installed programs ship (English -> German, French, Spanish).

Held out by source: every text has a stable name (a catalog's domain, a dictionary's headword, a docs page or
section, a fortune file) and a name whose ``zlib.crc32`` is 0 modulo 5 is reserved for evaluation, the rule of
:func:`bild.train.sources.is_eval_module`. Every reader takes ``split`` ("train", "eval" or "all") and yields in a
fixed order. :mod:`bild.eval.mixed` draws its translations only from the catalogs :func:`is_eval_catalog` reserves.
Never read here: /usr/share/man (the `mansum` set) and /var/lib/dpkg/status (the `mixed` set's other kinds).
Each text keeps its license (:data:`SOURCES`, data/README.md); bild ships none of it.
"""

from __future__ import annotations

import collections
import functools
import gettext
import gzip
import re
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from bild.train.sources import Split, is_eval_module

LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish"}


class CorpusSourceMissing(RuntimeError):
    """A text the broad corpus reads is not on this machine (its Debian package is not installed)."""


@dataclass(frozen=True)
class Source:
    """Where one text comes from: the Debian package that installs it, the path it is read from, and its license as
    /usr/share/doc/<package>/copyright states it."""

    package: str
    path: Path
    license: str


SOURCES = {
    "wordnet": Source("wordnet-base", Path("/usr/share/wordnet"),
                      "WordNet 3.0 license (Princeton University): use, copy, modify and distribute for any purpose "
                      "without fee, keeping the copyright notice and disclaimer"),
    "gcide": Source("dict-gcide", Path("/usr/share/dictd"), "GPL-2.0-or-later (GNU version of the Collaborative "
                    "International Dictionary of English: Webster's 1913 and WordNet 1.5 text)"),
    "foldoc": Source("dict-foldoc", Path("/usr/share/dictd"), "GFDL 1.1 or later, no invariant sections (Free On-line "
                     "Dictionary of Computing, Denis Howe); its Debian additions: verbatim copying and derived works "
                     "under identical terms"),
    "python-docs": Source("python3-doc", Path("/usr/share/doc/python3-doc/html"),
                          "PSF License Version 2; the code examples in it Zero-Clause BSD"),
    "debian-reference": Source("debian-reference-en", Path("/usr/share/debian-reference"),
                               "GPL-2.0-or-later (Osamu Aoki)"),
    "fortunes": Source("fortunes", Path("/usr/share/games/fortunes"),
                       "BSD license of the University of California (advertising clause deleted); the cookies are "
                       "quotations from many authors, no other terms stated"),
    "catalogs": Source("", Path("/usr/share/locale"), "each catalog under the license of the package that ships it"),
}


def require(name: str, *paths: Path) -> None:
    """Raise :class:`CorpusSourceMissing` naming the install command when any of ``paths`` does not exist."""
    missing = [path for path in paths if not path.exists()]
    if missing:
        package = SOURCES[name].package
        raise CorpusSourceMissing(f"{missing[0]} is missing: the {name} text comes from the Debian package {package} "
                                  f"(`apt-get install -y {package}`; `make little` installs every package it needs)")


# ---- held out by source ----------------------------------------------------------------------------------------

def is_eval_name(name: str) -> bool:
    """True when the text with this stable name is reserved for evaluation: crc32(name) % 5 == 0."""
    return zlib.crc32(name.encode()) % 5 == 0


def is_eval_catalog(domain: str) -> bool:
    """A gettext domain ("coreutils") reserved for evaluation in every language: `mixed` translates only these."""
    return is_eval_name(domain)


def is_eval_term(term: str) -> bool:
    """A headword reserved in every dictionary at once (GCIDE repeats WordNet's glosses), whatever its case."""
    return is_eval_name(term.lower())


def is_eval_page(page: str) -> bool:
    """A Python docs page ("library/json.html") reserved for evaluation. A library page follows the stdlib rule of
    its module, since `docsum` evaluates on the docstrings of the reserved modules and their pages repeat them."""
    if page.startswith("library/"):
        return is_eval_module(Path(page).stem)
    return is_eval_name(page)


def in_split(is_eval: bool, split: Split) -> bool:
    return split == "all" or is_eval == (split == "eval")


# ---- dictionaries ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Definition:
    """One headword of a dictionary and what it means."""

    source: str  # "wordnet", "gcide" or "foldoc"
    term: str
    text: str  # the definition: WordNet's gloss, GCIDE's first sense, FOLDOC's paragraphs (blank-line separated)
    synonyms: tuple[str, ...] = ()  # the other words of a WordNet synset
    group: str = ""  # what the term is a kind of: a WordNet noun's hypernym, FOLDOC's subject ("language"); or ""


_WORDNET_PARTS = ("noun", "verb", "adj", "adv")


def iter_wordnet(split: Split = "train", root: Path = SOURCES["wordnet"].path) -> Iterator[Definition]:
    """Every WordNet synset as a definition of its first word, in file order (nouns, verbs, adjectives, adverbs).

    Only nouns get a group: a verb's hypernym is a manner of doing ("outnumber" is a way to "total"), not a kind. A
    group whose word names several synsets carries its gloss, so that the senses stay apart ("check (a written order
    directing a bank to pay money)" is not "check (an examination to verify)").
    """
    paths = [root / f"data.{part}" for part in _WORDNET_PARTS]
    require("wordnet", *paths)
    for path in paths:
        synsets = dict(filter(None, map(_wordnet_synset, path.read_text(encoding="utf-8").splitlines())))
        senses = collections.Counter(words[0] for words, _, _ in synsets.values())
        for words, hypernym, gloss in synsets.values():
            if in_split(is_eval_term(words[0]), split):
                group = ""
                if hypernym in synsets and path.name == "data.noun":
                    group_words, _, group_gloss = synsets[hypernym]
                    group = group_words[0] if senses[group_words[0]] == 1 else f"{group_words[0]} ({group_gloss})"
                yield Definition("wordnet", words[0], gloss, tuple(words[1:]), group)


def _wordnet_synset(line: str) -> tuple[str, tuple[list[str], str, str]] | None:
    """(offset, (words, first hypernym's offset or "", gloss without examples)) of a data-file line; None for the
    license lines at the top (they start with spaces). Format: wndb(5WN)."""
    if line.startswith(" "):
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    word_count = int(parts[3], 16)
    words = [re.sub(r"\(\w+\)$", "", word).replace("_", " ") for word in parts[4:4 + 2 * word_count:2]]
    first_pointer = 5 + 2 * word_count
    pointers = parts[first_pointer:first_pointer + 4 * int(parts[first_pointer - 1])]  # symbol offset pos source/target
    hypernyms = [pointers[i + 1] for i in range(0, len(pointers), 4) if pointers[i] == "@"]  # not "@i": instances
    definition = gloss.split('; "')[0].strip().rstrip(";")
    return parts[0], (words, hypernyms[0] if hypernyms else "", definition)


_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    """A dictd index number: base 64 with these digits, most significant first (not RFC 4648 base64 of bytes)."""
    return functools.reduce(lambda number, digit: number * 64 + _DICTD_DIGITS.index(digit), text, 0)


def iter_dictd_entries(name: str, root: Path) -> Iterator[str]:
    """The raw entries of the dictd database ``name`` (gcide, foldoc), each once, in index order; dictd's own
    00-database-* entries skipped. The .dict.dz file is dictzip, which is gzip with a seek table: gzip reads it."""
    index, data = root / f"{name}.index", root / f"{name}.dict.dz"
    require(name, index, data)
    with gzip.open(data) as handle:
        text = handle.read()
    seen: set[int] = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        start = dictd_number(offset)
        if not headword.startswith("00-database") and start not in seen:
            seen.add(start)
            yield text[start:start + dictd_number(length)].decode("utf-8", "replace")


_GCIDE_HEADER = re.compile(r"^(?P<term>[^\\\n]+?)\s*\\")  # "Allocate \Al"lo*cate\, v. t. [etymology]"
_GCIDE_SENSE = re.compile(r"^(?:\d+\.\s*)?(?:\([A-Z][\w .&]*\)\s*)?")  # "1. (Physics) "
_GCIDE_DROPPED = re.compile(r"\[(?:Obs|derog|R)\.?\]")  # obsolete, derogatory and rare senses teach nothing current
_GCIDE_MARKUP = re.compile(r"[\[\]\\`*\"?]|[A-Za-z]'[aeiou]")  # accents, pronunciation, unprintable Greek ("?")


def iter_gcide(split: Split = "train", root: Path = SOURCES["gcide"].path) -> Iterator[Definition]:
    """The first sense of each GCIDE entry that reads as plain modern English (about 70% of the entries)."""
    for entry in iter_dictd_entries("gcide", root):
        found = gcide_definition(entry)
        if found is not None and in_split(is_eval_term(found.term), split):
            yield found


def gcide_definition(entry: str) -> Definition | None:
    """The entry's headword and first sense, without sense numbers, subject labels, citations ("--Bacon.") and source
    tags ("[1913 Webster]"); None when there is none or it keeps markup or archaic labels."""
    header, *_ = re.split(r"\n\s*\n", entry.strip("\n"))
    match = _GCIDE_HEADER.match(header)
    if match is None:
        return None
    lines = header.splitlines()
    depth, body_start = 0, len(lines)
    for number, line in enumerate(lines):  # the header ends where its etymology bracket closes
        depth += line.count("[") - line.count("]")
        if depth <= 0:
            body_start = number + 1
            break
    body = " ".join(line.strip() for line in lines[body_start:] if not line.strip().startswith("["))
    text = re.sub(r"\s--\s?[A-Z].*$", "", _GCIDE_SENSE.sub("", body)).replace("{", "").replace("}", "")
    if _GCIDE_DROPPED.search(text):
        return None
    text = re.sub(r"\s*\[[A-Z][\w. ]*\]", "", text).strip()  # labels such as [Colloq.]
    term = match.group("term").strip()
    if _GCIDE_MARKUP.search(text + " " + term) or not 3 <= len(text.split()) <= 60 or not text.endswith("."):
        return None
    return Definition("gcide", term, text)


def iter_foldoc(split: Split = "train", root: Path = SOURCES["foldoc"].path) -> Iterator[Definition]:
    """FOLDOC's entries with a definition of at least four words (cross-references alone are skipped)."""
    for entry in iter_dictd_entries("foldoc", root):
        found = foldoc_definition(entry)
        if found is not None and in_split(is_eval_term(found.term), split):
            yield found


def foldoc_definition(entry: str) -> Definition | None:
    """Headword (first line), subject tag ("<language>") and paragraphs of an entry, without link braces, dates,
    bibliography and lone links; None when the first paragraph is not a sentence of four words or more."""
    head, *paragraphs = re.split(r"\n\s*\n", entry.strip("\n"))
    kept = [" ".join(p.split()) for p in paragraphs]
    kept = [p for p in kept if len(p.split()) >= 4 and not p.startswith(("[", "See also"))]
    if not kept:
        return None
    match = re.match(r"(?:1\.\s*)?(?:<([^>]+)>\s*)?", kept[0])
    kept[0] = kept[0][match.end():]
    text = "\n\n".join(kept).replace("{", "").replace("}", "")
    if len(kept[0].split()) < 4 or not kept[0].endswith("."):
        return None
    return Definition("foldoc", head.splitlines()[0].strip(), text, group=(match.group(1) or "").split(",")[0].strip())


# ---- manuals (HTML) --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    """The prose and code under one heading of an HTML page."""

    title: str
    paragraphs: tuple[str, ...]  # prose, one line each
    code: tuple[tuple[str, str], ...]  # (the paragraph before the code block, the code block)


@dataclass(frozen=True)
class Passage:
    """A piece of running text: a manual's section or a fortune cookie."""

    source: str  # "python-docs", "debian-reference" or "fortunes"
    name: str  # where it is: "library/json.html#Basic Usage", "ch03.en.html#Stage 2: the boot loader", "science"
    title: str
    text: str  # paragraphs separated by blank lines


@dataclass(frozen=True)
class CodeExample:
    """A code block of the Python documentation and the paragraph that introduces it."""

    name: str  # page#section
    context: str
    code: str


_BLOCK_TAGS = frozenset({"p", "pre", "h1", "h2", "h3", "h4"})
_HIDDEN_TAGS = frozenset({"table", "head", "script", "style", "nav"})  # tables: Debian's package synopses (`mixed`)
_HIDDEN_CLASSES = frozenset({"sphinxsidebar", "related", "footer", "headerlink", "navheader", "navfooter", "toc",
                             "table",  # the Debian Reference's table captions ("Table 9.1. List of programs ...")
                             # release history ("Changed in version 3.2: ..."), not explanation
                             "versionadded", "versionchanged", "deprecated", "deprecated-removed"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})


class _Blocks(HTMLParser):
    """The page's paragraphs, code blocks and headings in order, as (tag, text); tables, navigation, sidebars and
    permalink marks are skipped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._open: list[tuple[str, bool]] = []  # (tag, hidden) of every open element
        self._block: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            return
        classes = set((dict(attrs).get("class") or "").split())
        hidden = self._hidden() or tag in _HIDDEN_TAGS or not classes.isdisjoint(_HIDDEN_CLASSES)
        self._open.append((tag, hidden))
        if tag in _BLOCK_TAGS and self._block is None and not hidden:
            self._block, self._text = tag, []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """``<a id="x"/>`` holds no text and closes itself."""

    def handle_endtag(self, tag: str) -> None:
        if tag not in (open_tag for open_tag, _ in self._open):
            return  # a stray end tag
        while self._open.pop()[0] != tag:
            pass
        if tag == self._block:
            text = "".join(self._text)
            self.blocks.append((tag, text.strip("\n") if tag == "pre" else " ".join(text.split())))
            self._block = None

    def handle_data(self, data: str) -> None:
        if self._block is not None and not self._hidden():
            self._text.append(data)

    def _hidden(self) -> bool:
        return bool(self._open) and self._open[-1][1]


def html_sections(path: Path, min_words: int = 8) -> list[Section]:
    """The sections of an HTML page in order, each with its prose paragraphs (at least ``min_words`` words) and its
    code blocks; section numbers ("3.1.2. ") are dropped from titles, which then stay stable across editions."""
    parser = _Blocks()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    sections: list[Section] = []
    title, paragraphs, code = "", [], []
    for tag, text in parser.blocks + [("h1", "")]:
        if tag.startswith("h"):
            if paragraphs or code:
                sections.append(Section(title, tuple(paragraphs), tuple(code)))
            title, paragraphs, code = re.sub(r"^[\dA-Z]+(\.\d+)*\.\s+", "", text), [], []
        elif tag == "pre":
            code.append((paragraphs[-1] if paragraphs else "", text))
        elif len(text.split()) >= min_words:
            paragraphs.append(text)
    return sections


_PYTHON_SKIPPED_PAGES = re.compile(r"(genindex.*|py-modindex|search|contents|copyright|license|about|bugs|download)"
                                   r"\.html")


def python_doc_pages(split: Split = "train", root: Path = SOURCES["python-docs"].path) -> list[str]:
    """The Python docs pages in the split ("library/json.html"), sorted; indexes and license pages left out."""
    require("python-docs", root)
    pages = (path.relative_to(root).as_posix() for path in sorted(root.rglob("*.html")))
    return [page for page in pages if not _PYTHON_SKIPPED_PAGES.fullmatch(page) and in_split(is_eval_page(page), split)]


def python_doc_passages(page: str, root: Path = SOURCES["python-docs"].path) -> Iterator[Passage]:
    for section in html_sections(root / page):
        if section.paragraphs:
            yield Passage("python-docs", f"{page}#{section.title}", section.title, "\n\n".join(section.paragraphs))


def python_doc_examples(page: str, root: Path = SOURCES["python-docs"].path) -> Iterator[CodeExample]:
    for section in html_sections(root / page):
        for context, code in section.code:
            yield CodeExample(f"{page}#{section.title}", context, code)


def iter_python_docs(split: Split = "train", root: Path = SOURCES["python-docs"].path) -> Iterator[Passage]:
    """The prose of every section of the Python documentation in the split (split by page), in page order."""
    for page in python_doc_pages(split, root):
        yield from python_doc_passages(page, root)


def iter_python_examples(split: Split = "train", root: Path = SOURCES["python-docs"].path) -> Iterator[CodeExample]:
    """Every code block of the Python documentation in the split, with the paragraph before it, in page order."""
    for page in python_doc_pages(split, root):
        yield from python_doc_examples(page, root)


def iter_debian_reference(split: Split = "train", root: Path = SOURCES["debian-reference"].path) -> Iterator[Passage]:
    """The prose of each section of the Debian Reference (English), split by section; its tables of packages and
    their synopses are skipped (the `mixed` set's references are such synopses)."""
    require("debian-reference", root)
    for path in sorted(root.glob("*.en.html")):
        if path.name == "index.en.html":
            continue  # the table of contents
        for section in html_sections(path):
            name = f"{path.name}#{section.title}"
            if section.paragraphs and in_split(is_eval_name(name), split):
                yield Passage("debian-reference", name, section.title, "\n\n".join(section.paragraphs))


# ---- fortunes --------------------------------------------------------------------------------------------------

def iter_fortunes(split: Split = "train", root: Path = SOURCES["fortunes"].path, min_chars: int = 40,
                  max_chars: int = 1000) -> Iterator[Passage]:
    """The cookies of each fortune file in the split (split by file), in file order; ASCII art and cookies that are
    mostly not letters are skipped."""
    require("fortunes", root)
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.suffix or not in_split(is_eval_name(path.name), split):
            continue  # .dat indexes and .u8 copies have a suffix; off/ (offensive cookies) is a directory
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = cookie.strip("\n%")
            letters = sum(ch.isalpha() or ch.isspace() for ch in text)
            if min_chars <= len(text) <= max_chars and letters >= 0.85 * len(text):
                yield Passage("fortunes", path.name, path.name, text)


# ---- message catalogs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Translation:
    """One message of a program and its translation, from a compiled gettext catalog."""

    domain: str  # the catalog ("coreutils")
    language: str  # "de", "fr" or "es"
    english: str
    translated: str


def read_catalog(path: Path) -> dict[str, str]:
    """English -> translation of a compiled catalog (.mo): singular messages, message contexts removed; {} when the
    file is unreadable or not UTF-8."""
    try:
        with path.open("rb") as handle:
            messages = gettext.GNUTranslations(handle)._catalog  # msgid -> msgstr (no public accessor)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return {}
    pairs = ((english.split("\x04")[-1].strip(), translated.strip()) for english, translated in messages.items()
             if isinstance(english, str) and isinstance(translated, str))
    return {english: translated for english, translated in pairs if english and translated}


def catalog_paths(language: str, root: Path = SOURCES["catalogs"].path) -> list[Path]:
    """The language's compiled catalogs, sorted by domain."""
    paths = sorted((root / language / "LC_MESSAGES").glob("*.mo"))
    if not paths:
        raise CorpusSourceMissing(f"no gettext catalogs in {root / language / 'LC_MESSAGES'}: they come with the "
                                  f"programs' translations (e.g. `apt-get install -y coreutils`) unless dpkg excludes "
                                  f"/usr/share/locale")
    return paths


def iter_translations(language: str, split: Split = "train", root: Path = SOURCES["catalogs"].path
                      ) -> Iterator[Translation]:
    """(English, translation) pairs of the language's catalogs in the split (split by domain), in domain order.

    Training also skips every English message that an eval-reserved catalog of any of :data:`LANGUAGES` has: the
    same message is often in several catalogs (programs built on gnulib share many), and `mixed` asks for it.
    """
    reserved = _reserved_messages(root) if split == "train" else frozenset()
    for path in catalog_paths(language, root):
        if in_split(is_eval_catalog(path.stem), split):
            for english, translated in read_catalog(path).items():
                if english not in reserved:
                    yield Translation(path.stem, language, english, translated)


def _reserved_messages(root: Path) -> frozenset[str]:
    """The English messages of every eval-reserved catalog of the languages this machine has."""
    paths = (path for language in LANGUAGES for path in sorted((root / language / "LC_MESSAGES").glob("*.mo"))
             if is_eval_catalog(path.stem))
    return frozenset(english for path in paths for english in read_catalog(path))
