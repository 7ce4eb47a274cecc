"""Instruction prompts of ten kinds built from the broad corpus (:mod:`bild.train.corpus`), so that a little model
learns to draft for any prompt and not only for questions about Python docstrings; and the corpus as raw passages
for token-level distillation on plain text.

Kinds (:data:`KINDS`), each prompt with a reference taken from the text (the unaligned model's target):

- explain: a FOLDOC term, or a manual's paragraph for a beginner;
- define: a WordNet or GCIDE headword;
- summarize: a manual's section or a long FOLDOC entry in one sentence (its first sentence as reference);
- translate: a program's message into German, French or Spanish, or back into English (the translators' strings);
- passage: a question about one term of a given glossary, answered from it;
- list: a WordNet synset's synonyms, kinds of a thing (WordNet's hyponyms), or a section's key points;
- compare: two WordNet terms of the same kind, or two FOLDOC terms of one subject;
- rewrite: a fortune cookie or a manual's paragraph, more simply or more formally (the text itself as reference);
- code: the output of a Python docs example session, or what an example's code does (its introducing paragraph);
- arithmetic: word problems with seeded numbers, the exact answer as reference.

Every prompt is tagged with its kind and its source ("wordnet:dog", "catalog:coreutils/de", ...). Only the text of
the requested split is read, so prompts for training never show text reserved for evaluation.
"""

from __future__ import annotations

import ast
import functools
import itertools
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from bild.train import corpus
from bild.train.corpus import LANGUAGES, SOURCES, CodeExample, Definition, Passage, Translation
from bild.train.prompts import PromptExample, clip, first_sentence
from bild.train.sources import Split

logger = logging.getLogger(__name__)

KINDS = ("explain", "define", "summarize", "translate", "passage", "list", "compare", "rewrite", "code", "arithmetic")
_ENDLESS = frozenset({"arithmetic"})  # kinds that need no text and never run out
MAX_CHARS = 700  # of a passage shown in a prompt (as bild.train.prompts)
GLOSSARY_TERMS = 4  # definitions in a `passage` prompt's glossary
PER_PAGE = 2  # sections (or code examples) of a docs page taken before moving to the next page
RAW_GROUP = 16  # dictionary entries (or fortune cookies) per raw passage: one alone is a dozen words


@dataclass(frozen=True)
class Roots:
    """Where each text is read from: the Debian packages' paths, or a test's fixture directories."""

    wordnet: Path = SOURCES["wordnet"].path
    gcide: Path = SOURCES["gcide"].path
    foldoc: Path = SOURCES["foldoc"].path
    python_docs: Path = SOURCES["python-docs"].path
    debian_reference: Path = SOURCES["debian-reference"].path
    fortunes: Path = SOURCES["fortunes"].path
    catalogs: Path = SOURCES["catalogs"].path


class _Texts:
    """The texts of one split, each read on first use and kept for every kind that uses it."""

    def __init__(self, split: Split, roots: Roots) -> None:
        self.split, self.roots = split, roots
        self._sections: dict[str, list[Passage]] = {}
        self._examples: dict[str, list[CodeExample]] = {}

    @functools.cached_property
    def wordnet(self) -> list[Definition]:
        return list(corpus.iter_wordnet(self.split, self.roots.wordnet))

    @functools.cached_property
    def gcide(self) -> list[Definition]:
        return list(corpus.iter_gcide(self.split, self.roots.gcide))

    @functools.cached_property
    def foldoc(self) -> list[Definition]:
        return list(corpus.iter_foldoc(self.split, self.roots.foldoc))

    @functools.cached_property
    def debian_reference(self) -> list[Passage]:
        return list(corpus.iter_debian_reference(self.split, self.roots.debian_reference))

    @functools.cached_property
    def fortunes(self) -> list[Passage]:
        return list(corpus.iter_fortunes(self.split, self.roots.fortunes))

    @functools.cached_property
    def python_pages(self) -> list[str]:
        return corpus.python_doc_pages(self.split, self.roots.python_docs)

    def python_passages(self, page: str) -> list[Passage]:
        """One page's sections, parsed when a kind first needs them (all 388 training pages take ~10 s)."""
        if page not in self._sections:
            self._sections[page] = list(corpus.python_doc_passages(page, self.roots.python_docs))
        return self._sections[page]

    def python_examples(self, page: str) -> list[CodeExample]:
        if page not in self._examples:
            self._examples[page] = list(corpus.python_doc_examples(page, self.roots.python_docs))
        return self._examples[page]

    def translations(self, language: str) -> list[Translation]:
        """The language's pairs; none (with a warning) on a machine without its catalogs, the others still used."""
        try:
            return list(corpus.iter_translations(language, self.split, self.roots.catalogs))
        except corpus.CorpusSourceMissing as error:
            logger.warning("no %s translation prompts: %s", LANGUAGES[language], error)
            return []


def build_broad_prompts(count: int, seed: int = 0, split: Split = "train", roots: Roots = Roots()
                        ) -> list[PromptExample]:
    """``count`` prompts of the ten :data:`KINDS` from the split's text, balanced by kind and shuffled.

    Built in rounds of one prompt of every kind (fewer once a kind has run out of text; arithmetic, which needs no
    text, stops with the last kind that does), each round in a seeded shuffled order. Deterministic for a seed, and
    prefix-stable: the first n prompts are the same for every ``count`` >= n, so a calibration file can grow by
    resuming. Each kind draws from its own seeded stream and reads
    only the texts it needs, when it needs them.
    """
    texts = _Texts(split, roots)
    streams = {kind: iter(_KIND_BUILDERS[kind](random.Random(f"{seed}:{split}:{kind}"), texts)) for kind in KINDS}
    order = random.Random(f"{seed}:{split}:order")
    examples: list[PromptExample] = []
    while len(examples) < count and set(streams) - _ENDLESS:
        round_ = []
        for kind in list(streams):
            example = next(streams[kind], None)
            if example is None:
                del streams[kind]
            else:
                round_.append(example)
        order.shuffle(round_)
        examples.extend(round_)
    return examples[:count]


def iter_raw_passages(split: Split = "train", roots: Roots = Roots()) -> Iterator[str]:
    """Plain text of every English source of the split, for distillation on raw text, in a fixed order that
    alternates between the sources (so any prefix has text of each): WordNet, GCIDE and FOLDOC entries and fortune
    cookies grouped by :data:`RAW_GROUP`, manual sections whole. The catalogs' translations are not plain English
    text and stay out."""
    yield from _alternate(
        _glossaries(corpus.iter_wordnet(split, roots.wordnet)),
        _glossaries(corpus.iter_gcide(split, roots.gcide)),
        (f"{d.term}\n\n{d.text}" for d in corpus.iter_foldoc(split, roots.foldoc)),
        (f"{p.title}\n\n{p.text}" for p in corpus.iter_python_docs(split, roots.python_docs)),
        (f"{p.title}\n\n{p.text}" for p in corpus.iter_debian_reference(split, roots.debian_reference)),
        ("\n\n".join(p.text for p in cookies)
         for cookies in _batched(corpus.iter_fortunes(split, roots.fortunes), RAW_GROUP)),
    )


def _glossaries(definitions: Iterable[Definition]) -> Iterator[str]:
    for group in _batched(definitions, RAW_GROUP):
        yield "\n".join(f"{d.term}: {d.text}" for d in group)


# ---- the kinds -------------------------------------------------------------------------------------------------

def _define(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    templates = ("Define the word '{}'.", "What does '{}' mean?", "Give a short definition of '{}'.")
    for definition in _shuffled(rng, texts.wordnet + texts.gcide):
        prompt = rng.choice(templates).format(definition.term)
        yield _tagged(prompt, _sentence(definition.text), definition, "define")


def _explain(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    def paragraphs() -> Iterator[PromptExample]:
        for passage in _manual_passages(rng, texts):
            paragraph = _paragraph(rng, passage)
            yield PromptExample(f"Explain this to a beginner:\n\n{paragraph}", paragraph, _name(passage), "explain")

    terms = (_tagged(f"Explain what '{d.term}' means in computing.", clip(d.text, MAX_CHARS), d, "explain")
             for d in _shuffled(rng, texts.foldoc))
    return _alternate(terms, paragraphs())


def _summarize(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    sections = (PromptExample(f"Summarize in one sentence:\n\n{clip(p.text, MAX_CHARS)}", first_sentence(p.text),
                              _name(p), "summarize")
                for p in _manual_passages(rng, texts) if _sentences(p.text) >= 2)
    entries = (_tagged(f"Summarize this dictionary entry about '{d.term}' in one sentence:\n\n"
                       f"{clip(d.text, MAX_CHARS)}", first_sentence(d.text), d, "summarize")
               for d in _shuffled(rng, texts.foldoc) if _sentences(d.text) >= 3)
    return _alternate(sections, entries)


def _translate(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    """Into each language and back, in turn; each English message once per language."""
    def language_stream(code: str) -> Iterator[PromptExample]:
        unique = {t.english: t for t in texts.translations(code) if _is_plain_message(t.english)}
        for t in _shuffled(rng, list(unique.values())):
            source = f"catalog:{t.domain}/{code}"
            if rng.random() < 0.5:
                prompt = f"Translate into {LANGUAGES[code]}:\n{t.english}"
                yield PromptExample(prompt, t.translated, source, "translate")
            else:
                yield PromptExample(f"Translate into English:\n{t.translated}", t.english, source, "translate")
    return _alternate(*(language_stream(code) for code in LANGUAGES))


def _passage(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    """A glossary of a few terms of one dictionary and a question about one of them."""
    for definitions in _alternate(*(_batched(_shuffled(rng, pool), GLOSSARY_TERMS)
                                    for pool in (texts.wordnet, texts.gcide, texts.foldoc))):
        asked = rng.choice(definitions)
        glossary = "\n".join(f"- {d.term}: {_short(d)}" for d in definitions)
        prompt = (f"Read the glossary and answer the question.\n\nGlossary:\n{glossary}\n\n"
                  f"Question: according to the glossary, what does '{asked.term}' mean?")
        yield _tagged(prompt, _short(asked), asked, "passage")


def _list(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    synonyms = (_tagged(f"List words or phrases that mean the same as '{d.term}' ({d.text}).", ", ".join(d.synonyms),
                        d, "list")
                for d in _shuffled(rng, texts.wordnet) if len(d.synonyms) >= 2)
    kinds = (PromptExample(f"List {len(members)} kinds of {group}.", ", ".join(d.term for d in members),
                           f"wordnet:{group}", "list")
             for group, members in _groups(rng, texts.wordnet, min_members=3, most=5))
    points = (PromptExample(f"List the key points of this text:\n\n{clip(p.text, MAX_CHARS)}",
                            "\n".join(f"- {first_sentence(paragraph)}" for paragraph in p.text.split("\n\n")[:5]),
                            _name(p), "list")
              for p in _manual_passages(rng, texts) if p.text.count("\n\n") >= 2)
    return _alternate(synonyms, kinds, points)


def _compare(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    """Two members of one group (WordNet hypernym, FOLDOC subject), each group once."""
    def pairs(definitions: list[Definition], alike: str) -> Iterator[PromptExample]:
        for group, (first, second) in _groups(rng, definitions, min_members=2, most=2):
            prompt = f"Compare '{first.term}' and '{second.term}': how are they alike and how do they differ?"
            reference = (f"{alike.format(group)} {_capitalized(first.term)}: {_short(first)} "
                         f"{_capitalized(second.term)}: {_short(second)}")
            yield PromptExample(prompt, reference, f"{first.source}:{first.term}|{second.term}", "compare")

    return _alternate(pairs(texts.wordnet, "Both are kinds of {}."),
                      pairs(texts.foldoc, "Both are terms of computing ({})."))


def _rewrite(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    styles = ("Rewrite this more simply:", "Rewrite this in a more formal tone:")

    def paragraphs() -> Iterator[PromptExample]:
        for passage in _manual_passages(rng, texts):
            paragraph = _paragraph(rng, passage)
            yield PromptExample(f"{rng.choice(styles)}\n\n{paragraph}", paragraph, _name(passage), "rewrite")

    cookies = (PromptExample(f"{rng.choice(styles)}\n\n{p.text}", p.text, _name(p), "rewrite")
               for p in _shuffled(rng, texts.fortunes))
    return _alternate(cookies, paragraphs())


def _code(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    examples = _spread(_shuffled(rng, texts.python_pages), texts.python_examples)
    for example in (example for example in examples if example.code.count("\n") < 20):
        session = session_output(example.code)
        if session is not None:
            prompt = f"What does the last line of this Python session output?\n\n{session[0]}"
            yield PromptExample(prompt, session[1], f"python-docs:{example.name}", "code")
        elif example.context and _is_python(example.code):
            prompt = f"Explain what this Python code does:\n\n{example.code}"
            yield PromptExample(prompt, example.context, f"python-docs:{example.name}", "code")


def session_output(code: str, max_chars: int = 120) -> tuple[str, str] | None:
    """(the session up to its last ``>>>`` statement, that statement's output) of an interactive example whose last
    output is short and fixed (no error, no comment, no object address); None for any other code."""
    lines = code.splitlines()
    starts = [number for number, line in enumerate(lines) if line.startswith(">>> ")]
    if not starts or starts[0] != 0:  # a shell session around the interpreter, or no session
        return None
    end = starts[-1] + 1
    while end < len(lines) and lines[end].startswith("... "):
        end += 1
    output = "\n".join(lines[end:]).strip()
    if not output or len(output) > max_chars or output.startswith("#") or re.search(r">>>|Traceback|Error|0x", output):
        return None
    return "\n".join(lines[:end]), output


def _arithmetic(rng: random.Random, texts: _Texts) -> Iterator[PromptExample]:
    """Endless: the templates in turn, with fresh numbers each time."""
    for number in itertools.count():
        question, answer = _PROBLEMS[number % len(_PROBLEMS)](rng)
        yield PromptExample(f"{question} Answer with the number.", str(answer), f"generated:arithmetic-{number}",
                            "arithmetic")


def _multiply(rng: random.Random) -> tuple[str, int]:
    packs, per_pack = rng.randint(2, 30), rng.randint(2, 24)
    question = f"{rng.choice(_NAMES)} buys {packs} packs of pencils with {per_pack} in each pack. How many pencils?"
    return question, packs * per_pack


def _subtract(rng: random.Random) -> tuple[str, int]:
    lent = rng.randint(2, 400)
    books = lent + rng.randint(1, 2000)
    return f"A library has {books} books and lends out {lent}. How many books are left on its shelves?", books - lent


def _share(rng: random.Random) -> tuple[str, int]:
    people, each = rng.randint(2, 12), rng.randint(2, 40)
    return f"{people * each} apples are shared equally among {people} people. How many apples does each get?", each


def _distance(rng: random.Random) -> tuple[str, int]:
    speed, hours = rng.randrange(40, 130, 5), rng.randint(2, 9)
    return f"A train travels at {speed} km per hour for {hours} hours. How far does it go, in km?", speed * hours


def _two_steps(rng: random.Random) -> tuple[str, int]:
    start, more = rng.randint(5, 90), rng.randint(2, 50)
    given = rng.randint(1, start + more)
    name = rng.choice(_NAMES)
    question = f"{name} has {start} stamps, gets {more} more and gives away {given}. How many stamps does {name} have?"
    return question, start + more - given


def _boxes(rng: random.Random) -> tuple[str, int]:
    per_box, eggs = rng.randint(6, 30), rng.randint(20, 500)
    return f"A box holds {per_box} eggs. How many boxes are needed for {eggs} eggs?", math.ceil(eggs / per_box)


def _percent(rng: random.Random) -> tuple[str, int]:
    percent, total = rng.randrange(5, 100, 5), 20 * rng.randint(1, 50)  # 5 * 20 = 100: the answer is whole
    return f"What is {percent} percent of {total}?", percent * total // 100


def _cost(rng: random.Random) -> tuple[str, int]:
    tickets, price = rng.randint(2, 40), rng.randint(3, 95)
    return f"A ticket costs {price} euros. How much do {tickets} tickets cost, in euros?", tickets * price


_NAMES = ("Ana", "Ben", "Chen", "Dara", "Emil", "Fatima", "Giulia", "Hiro", "Ines", "Jonas", "Kofi", "Lena")
_PROBLEMS: tuple[Callable[[random.Random], tuple[str, int]], ...] = (
    _multiply, _subtract, _share, _distance, _two_steps, _boxes, _percent, _cost)

_KIND_BUILDERS: dict[str, Callable[[random.Random, _Texts], Iterable[PromptExample]]] = {
    "explain": _explain, "define": _define, "summarize": _summarize, "translate": _translate, "passage": _passage,
    "list": _list, "compare": _compare, "rewrite": _rewrite, "code": _code, "arithmetic": _arithmetic}


# ---- helpers ---------------------------------------------------------------------------------------------------

def _manual_passages(rng: random.Random, texts: _Texts) -> Iterator[Passage]:
    """Sections of the Python docs (pages in a seeded order, read as needed) alternating with the Debian
    Reference's (shuffled)."""
    python = _spread(_shuffled(rng, texts.python_pages), texts.python_passages)
    return _alternate(python, _shuffled(rng, texts.debian_reference))


def _spread(pages: list[str], items_of: Callable[[str], list]) -> Iterator:
    """The items of the pages :data:`PER_PAGE` at a time, page after page, round after round: even a short prefix
    covers many pages, and a page is parsed only when its turn first comes."""
    for start in itertools.count(0, PER_PAGE):
        found = False
        for page in pages:
            chunk = items_of(page)[start:start + PER_PAGE]
            found = found or bool(chunk)
            yield from chunk
        if not found:
            return


def _groups(rng: random.Random, definitions: list[Definition], min_members: int, most: int
            ) -> Iterator[tuple[str, list[Definition]]]:
    """(group, up to ``most`` of its members drawn at random) for each group with at least ``min_members`` members of
    different terms, the groups in a seeded order, each once."""
    members: dict[str, dict[str, Definition]] = {}
    for definition in definitions:
        if definition.group:
            members.setdefault(definition.group, {}).setdefault(definition.term, definition)
    for group in _shuffled(rng, sorted(members)):
        if len(members[group]) >= min_members:
            yield group, rng.sample(list(members[group].values()), min(most, len(members[group])))


def _alternate(*streams: Iterable) -> Iterator:
    """One item of each stream in turn, dropping streams as they run out."""
    iterators = [iter(stream) for stream in streams]
    while iterators:
        for iterator in list(iterators):
            item = next(iterator, _END)
            if item is _END:
                iterators.remove(iterator)
            else:
                yield item


_END = object()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _shuffled(rng: random.Random, items: list) -> list:
    return rng.sample(items, len(items))


def _tagged(prompt: str, reference: str, definition: Definition, kind: str) -> PromptExample:
    return PromptExample(prompt, reference, f"{definition.source}:{definition.term}", kind)


def _name(passage: Passage) -> str:
    return f"{passage.source}:{passage.name}"


def _paragraph(rng: random.Random, passage: Passage) -> str:
    return clip(rng.choice(passage.text.split("\n\n")), MAX_CHARS)


def _short(definition: Definition) -> str:
    """The definition's first sentence, as a sentence (FOLDOC's entries run to paragraphs)."""
    return _sentence(first_sentence(definition.text.split("\n\n", 1)[0]))


def _sentence(text: str) -> str:
    """A definition as a sentence: capitalised, ending with a full stop (WordNet's glosses have neither)."""
    text = _capitalized(text.strip())
    return text if text.endswith((".", "!", "?")) else text + "."


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentences(text: str) -> int:
    return len(re.findall(r"[.!?](\s|$)", text))


def _is_python(code: str) -> bool:
    """Python source (not an interactive session, a shell session or C): it parses."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return ">>>" not in code


def _is_plain_message(text: str) -> bool:
    """A message worth translating: 3-40 words of plain text, no format codes, markup, options, mnemonics or columns
    (an option's help aligned with spaces)."""
    return 3 <= len(text.split()) <= 40 and text[:1].isalpha() and not re.search(r"[%{}<>\\_&@|\t]|--|\s{3}", text)
