"""The broad corpus (bild.train.corpus) and its prompts (bild.train.tasks), on small fixture files: each reader, the
held-out split, the `mixed` set's catalogs against training's, and the prompt kinds."""

from __future__ import annotations

import array
import gzip
import struct
from pathlib import Path

import pytest

from bild.train import corpus, tasks
from bild.train.corpus import CorpusSourceMissing, Definition

# ---- fixtures: tiny copies of each package's files, in its own format --------------------------------------------

WORDNET_NOUNS = """\
  1 This software and database is being provided to you, the LICENSEE, by  
00000010 05 n 01 canine 0 000 | any of various fissiped mammals with nonretractile claws  
00000020 05 n 01 wolf 0 001 @ 00000010 n 0000 | any of various predatory carnivorous canines; "the wolf howled"  
00000030 05 n 01 fox 0 001 @ 00000010 n 0000 | alert carnivorous mammal with pointed muzzle and ears  
00000040 05 n 01 coyote 0 001 @ 00000010 n 0000 | small wolf native to western North America  
00000050 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 00000010 n 0000 | a member of the genus Canis  
00000060 05 n 03 lion 0 king_of_beasts 0 Panthera_leo 0 000 | large gregarious predatory feline of Africa  
"""
WORDNET_VERBS = """\
00000070 38 v 01 move 0 000 | change location; move, travel, or proceed  
00000080 38 v 01 run 0 001 @ 00000070 v 0000 01 + 02 00 | move fast by using one's feet  
"""

GCIDE = {  # headwords -> entry (index order)
    ("00-database-short",): "00-database-short\n   The Collaborative International Dictionary of English v.0.48\n",
    ("Abacus", "Abaci"): 'Abacus \\Ab"a*cus\\, n.; pl. L. {Abaci}. [L. abacus, Gr. ? a board.]\n'
                         "   1. A table or tray strewn with sand, anciently used for drawing.\n      [1913 Webster]\n",
    ("Quartz",): 'Quartz \\Quartz\\, n. [G. quarz.]\n   A kind of hard stone. [Obs.]\n   [1913 Webster]\n',
    ("Anim'e",): "Anim'e \\A`ni`m['e]\\, a.\n   Of a different tincture from the animal itself.\n   [1913 Webster]\n",
    ("Anchor",): 'Anchor \\An"chor\\, n.\n   (Naut.) An iron instrument which holds a ship in place. --Bacon.\n'
                 "   [1913 Webster]\n",
    ("Robin",): 'Robin \\Rob"in\\, n.\n   A small European singing bird with a red breast.\n   [1913 Webster]\n',
}
FOLDOC = {
    ("Perl",): "Perl\n\n   <language> Practical Extraction and Report Language. A {scripting} language by Larry "
               "Wall. It grew out of sed and awk. It is used for text processing.\n\n   (1998-01-01)\n",
    ("Lisp",): "Lisp\n\n   <language> A list processing language invented by John McCarthy in 1958.\n\n"
               "   [{Jargon File}]\n",
    ("Python",): "Python\n\n   <language, programming> A dynamically typed scripting language by Guido van Rossum.\n",
    ("Prolog",): "Prolog\n\n   <language> A logic programming language based on Horn clauses.\n",
    ("sd",): "sd\n\n   {Structured Design}\n",
}

SPHINX_PAGE = """<html><head><title>{title}</title></head><body>
<div class="related" role="navigation"><h3>Navigation</h3><p>index modules next previous and all the rest</p></div>
<div class="body" role="main"><section id="top">
<h1>{title}<a class="headerlink" href="#top">¶</a></h1>
<p>The {module} module reads and writes tabular data in a simple text format. It is used everywhere.</p>
<p>Most programs that exchange data use this format for their import and export routines.</p>
<p>The module has readers and writers for the format, with options for its dialects.</p>
<div class="versionchanged"><p><span class="versionmodified changed">Changed in version 3.2: </span>Allow strings for
the delimiter in addition to single characters.</p></div>
<table><tr><td>a table cell that has more than eight words in it for sure</td></tr></table>
<p>For example, the reader splits each line of the file into fields like this:</p>
<div class="highlight"><pre><span class="gp">&gt;&gt;&gt; </span>import {module}
<span class="gp">&gt;&gt;&gt; </span>len([1, 2, 3])
3</pre></div>
<section id="writing"><h2>Writing files<a class="headerlink" href="#writing">¶</a></h2>
<p>The writer object converts the data into delimited strings on the given file object.</p>
<p>Here is a whole program that writes two rows to a file called out.txt on disk:</p>
<pre>with open("out.txt", "w") as f:
    f.write("a,b")</pre>
</section></section></div>
<div class="sphinxsidebar"><h3>This Page</h3><p>Report a bug and show the source of this page here</p></div>
</body></html>"""

DEBIAN_REFERENCE_PAGE = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>Chapter 1</title></head><body>
<div class="navheader"><p>Chapter 1. GNU/Linux tutorials, previous and next chapter links</p></div>
<div class="section"><h2 class="title"><a id="_shells"/>1.1. Shells</h2>
<p>The shell reads the commands you type and runs them for you, one line at a time.</p>
<div class="table"><p class="title"><strong>Table 1.1. List of shell packages with their synopses</strong></p>
<table><tr><td>bash</td><td>GNU Bourne Again SHell, the synopsis that mixed uses as a reference</td></tr></table></div>
<pre>$ echo hello</pre></div>
<div class="section"><h2 class="title"><a id="_backups"/>1.2. Backups</h2>
<p>Back up your data regularly to another disk, and test that you can restore it.</p></div>
</body></html>"""

FORTUNES = {
    "science": ["Physics is like sex: sure, it may give some practical results, but that's not why we do it.",
                "The scientist is not a person who gives the right answers, he is one who asks the right questions.",
                "|\\/\\/\\/\\/\\/|\n|--()--()--|\n|____--____|  (ascii art, mostly symbols)"],
    "pets": ["A dog is the only thing on earth that loves you more than he loves himself."],
    "computers": ["The computer is a moron and will do exactly what you tell it, nothing more and nothing less."],
}

CATALOGS = {  # language -> domain -> English -> translation
    "de": {"coreutils": {"Print this help and exit now please.": "Diese Hilfe anzeigen und beenden.",
                         "Output the version information and exit.": "Versionsinformation anzeigen und beenden."},
           "tar": {"Print this help and exit now please.": "Diese Hilfe anzeigen und beenden.",
                   "Create a new archive from the given files.": "Ein neues Archiv aus den Dateien erstellen.",
                   "Extract the files from an archive.": "Dateien aus einem Archiv entpacken.",
                   "menu\x04Open the archive in a new window.": "Das Archiv in einem neuen Fenster öffnen.",
                   "_Quit": "_Beenden",
                   "msa            Recognize the MSA instructions.": "msa            MSA-Befehle erkennen."}},
    "fr": {"tar": {"Create a new archive from the given files.": "Créer une nouvelle archive à partir des fichiers."}},
}


def write_mo(path: Path, messages: dict[str, str]) -> None:
    """A compiled gettext catalog, laid out as msgfmt writes it (CPython's Tools/i18n/msgfmt.py), UTF-8 header."""
    messages = {"": "Content-Type: text/plain; charset=UTF-8\n", **messages}
    keys = sorted(key.encode() for key in messages)
    values = [messages[key.decode()].encode() for key in keys]
    ids, strs, offsets = b"", b"", []
    for key, value in zip(keys, values):
        offsets.append((len(ids), len(key), len(strs), len(value)))
        ids, strs = ids + key + b"\0", strs + value + b"\0"
    key_start = 7 * 4 + 16 * len(keys)
    table = [n for o1, l1, _, _ in offsets for n in (l1, o1 + key_start)]
    table += [n for _, _, o2, l2 in offsets for n in (l2, o2 + key_start + len(ids))]
    header = struct.pack("Iiiiiii", 0x950412DE, 0, len(keys), 7 * 4, 7 * 4 + len(keys) * 8, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.array("i", table).tobytes() + ids + strs)


def write_dictd(root: Path, name: str, entries: dict[tuple[str, ...], str]) -> None:
    """A dictd database: name.dict.dz (gzip is what dictzip adds a seek table to) and its index."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(value: int) -> str:
        return (number(value // 64) if value >= 64 else "") + digits[value % 64]

    data, index = b"", []
    for headwords, entry in entries.items():
        raw = entry.encode()
        index += [f"{headword}\t{number(len(data))}\t{number(len(raw))}" for headword in headwords]
        data += raw
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    (root / f"{name}.index").write_text("\n".join(index) + "\n", encoding="utf-8")


@pytest.fixture
def roots(tmp_path: Path) -> tasks.Roots:
    wordnet = tmp_path / "wordnet"
    wordnet.mkdir()
    (wordnet / "data.noun").write_text(WORDNET_NOUNS)
    (wordnet / "data.verb").write_text(WORDNET_VERBS)
    (wordnet / "data.adj").write_text("")
    (wordnet / "data.adv").write_text("")
    write_dictd(tmp_path / "dictd", "gcide", GCIDE)
    write_dictd(tmp_path / "dictd", "foldoc", FOLDOC)
    docs = tmp_path / "python-docs"
    for page, module in (("library/csv.html", "csv"), ("library/json.html", "json"), ("tutorial/intro.html", "intro")):
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(SPHINX_PAGE.format(title=f"{module} — a module", module=module))
    (docs / "genindex.html").write_text(SPHINX_PAGE.format(title="Index", module="index"))
    reference = tmp_path / "debian-reference"
    reference.mkdir()
    (reference / "ch01.en.html").write_text(DEBIAN_REFERENCE_PAGE)
    (reference / "index.en.html").write_text(DEBIAN_REFERENCE_PAGE.replace("Shells", "Contents"))
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    for name, cookies in FORTUNES.items():
        (fortunes / name).write_text("\n%\n".join(cookies) + "\n%\n")
        (fortunes / f"{name}.dat").write_bytes(b"\0\0\0\2binary index")
    for language, domains in CATALOGS.items():
        for domain, messages in domains.items():
            write_mo(tmp_path / "locale" / language / "LC_MESSAGES" / f"{domain}.mo", messages)
    return tasks.Roots(wordnet=wordnet, gcide=tmp_path / "dictd", foldoc=tmp_path / "dictd", python_docs=docs,
                       debian_reference=reference, fortunes=fortunes, catalogs=tmp_path / "locale")


# ---- held out by source --------------------------------------------------------------------------------------------

def test_split_rules_are_stable():
    """Fixed answers: a change of the rule would silently move evaluation text into training."""
    assert [corpus.is_eval_catalog(d) for d in ("coreutils", "bash", "tar", "grep")] == [True, True, False, False]
    assert [corpus.is_eval_term(t) for t in ("dog", "Dog", "wolf", "Robin", "Prolog")] == [True, True, False, True, True]
    assert corpus.is_eval_page("library/json.html") and not corpus.is_eval_page("library/csv.html")  # module rule
    assert corpus.is_eval_page("library/os.path.html") == corpus.is_eval_page("library/os.html")
    assert corpus.is_eval_name("library/csv.html")  # the page name alone would have reserved it
    assert not any(str(source.path).startswith(("/usr/share/man", "/var/lib/dpkg")) for source in corpus.SOURCES.values())


@pytest.mark.parametrize("read, key", [
    (lambda r, split: corpus.iter_wordnet(split, r.wordnet), lambda d: d.term),
    (lambda r, split: corpus.iter_gcide(split, r.gcide), lambda d: d.term),
    (lambda r, split: corpus.iter_foldoc(split, r.foldoc), lambda d: d.term),
    (lambda r, split: corpus.iter_python_docs(split, r.python_docs), lambda p: p.name),
    (lambda r, split: corpus.iter_python_examples(split, r.python_docs), lambda e: e.name),
    (lambda r, split: corpus.iter_debian_reference(split, r.debian_reference), lambda p: p.name),
    (lambda r, split: corpus.iter_fortunes(split, r.fortunes), lambda p: p.text),
    (lambda r, split: corpus.iter_translations("de", split, r.catalogs), lambda t: (t.domain, t.english)),
])
def test_every_reader_splits_its_text_into_disjoint_train_and_eval(roots, read, key):
    train, held_out, everything = ([key(item) for item in read(roots, split)] for split in ("train", "eval", "all"))
    assert train and held_out
    assert not set(train) & set(held_out) and set(train) | set(held_out) <= set(everything)
    assert [key(item) for item in read(roots, "train")] == train  # a fixed order


# ---- readers -------------------------------------------------------------------------------------------------------

def test_wordnet_definitions_synonyms_and_noun_groups(roots):
    definitions = {d.term: d for d in corpus.iter_wordnet("all", roots.wordnet)}
    assert list(definitions) == ["canine", "wolf", "fox", "coyote", "dog", "lion", "move", "run"]  # license skipped
    assert definitions["wolf"] == Definition("wordnet", "wolf", "any of various predatory carnivorous canines",
                                             (), "canine")  # examples ("the wolf howled") cut
    assert definitions["dog"].synonyms == ("domestic dog", "Canis familiaris")
    assert definitions["run"].group == ""  # a verb's hypernym is a manner, not a kind
    assert "dog" not in {d.term for d in corpus.iter_wordnet("train", roots.wordnet)}


def test_gcide_first_senses_without_markup_or_archaic_labels(roots):
    definitions = {d.term: d.text for d in corpus.iter_gcide("all", roots.gcide)}
    assert definitions == {  # Abaci shares Abacus's entry; Quartz is [Obs.]; Anim'e is accent markup
        "Abacus": "A table or tray strewn with sand, anciently used for drawing.",
        "Anchor": "An iron instrument which holds a ship in place.",
        "Robin": "A small European singing bird with a red breast."}


def test_foldoc_entries_keep_paragraphs_and_subject(roots):
    definitions = {d.term: d for d in corpus.iter_foldoc("all", roots.foldoc)}
    assert list(definitions) == ["Perl", "Lisp", "Python", "Prolog"]  # "sd" is only a cross-reference
    assert definitions["Perl"].text.startswith("Practical Extraction and Report Language. A scripting language")
    assert "1998" not in definitions["Perl"].text and "Jargon" not in definitions["Lisp"].text
    assert definitions["Python"].group == "language"


def test_html_sections_skip_navigation_tables_and_permalinks(roots):
    sections = corpus.html_sections(roots.python_docs / "library" / "csv.html")
    assert [s.title for s in sections] == ["csv — a module", "Writing files"]
    text = " ".join(p for s in sections for p in s.paragraphs)
    assert "¶" not in text and "table cell" not in text and "Navigation" not in text and "Report a bug" not in text
    assert "Changed in version" not in text  # release history
    context, code = sections[0].code[0]
    assert context.startswith("For example") and code.splitlines()[-1] == "3"
    (shells, backups) = corpus.html_sections(roots.debian_reference / "ch01.en.html")
    assert shells.title == "Shells" and backups.title == "Backups"  # numbers dropped: stable across editions
    assert "synopsis" not in " ".join(shells.paragraphs)  # tables of package synopses are the mixed set's references


def test_python_docs_pages_skip_indexes_and_follow_the_module_rule(roots):
    assert corpus.python_doc_pages("all", roots.python_docs) == [
        "library/csv.html", "library/json.html", "tutorial/intro.html"]
    assert corpus.python_doc_pages("eval", roots.python_docs) == ["library/json.html"]


def test_debian_reference_sections_split_by_name_without_its_contents_page(roots):
    assert [p.name for p in corpus.iter_debian_reference("train", roots.debian_reference)] == ["ch01.en.html#Shells"]
    assert [p.name for p in corpus.iter_debian_reference("eval", roots.debian_reference)] == ["ch01.en.html#Backups"]


def test_fortunes_by_file_without_ascii_art(roots):
    cookies = list(corpus.iter_fortunes("all", roots.fortunes))
    assert [c.name for c in cookies] == ["computers", "pets", "science", "science"]
    assert all("|" not in c.text for c in cookies)
    assert {c.name for c in corpus.iter_fortunes("eval", roots.fortunes)} == {"computers"}


def test_catalogs_train_never_sees_a_message_of_an_eval_catalog(roots):
    path = roots.catalogs / "de" / "LC_MESSAGES" / "tar.mo"
    assert corpus.read_catalog(path)["Open the archive in a new window."] == "Das Archiv in einem neuen Fenster öffnen."
    train = list(corpus.iter_translations("de", "train", roots.catalogs))
    held_out = list(corpus.iter_translations("de", "eval", roots.catalogs))
    assert {t.domain for t in train} == {"tar"} and {t.domain for t in held_out} == {"coreutils"}
    assert "Print this help and exit now please." not in {t.english for t in train}  # tar has it too
    assert not {t.english for t in train} & {t.english for t in held_out}


@pytest.mark.parametrize("read, package", [
    (lambda missing: corpus.iter_wordnet(root=missing), "wordnet-base"),
    (lambda missing: corpus.iter_gcide(root=missing), "dict-gcide"),
    (lambda missing: corpus.iter_foldoc(root=missing), "dict-foldoc"),
    (lambda missing: corpus.iter_python_docs(root=missing), "python3-doc"),
    (lambda missing: corpus.iter_debian_reference(root=missing), "debian-reference-en"),
    (lambda missing: corpus.iter_fortunes(root=missing), "fortunes"),
    (lambda missing: corpus.iter_translations("de", root=missing), "coreutils"),
])
def test_a_missing_package_is_one_line_naming_the_install_command(tmp_path, read, package):
    with pytest.raises(CorpusSourceMissing) as error:
        list(read(tmp_path / "not-installed"))
    message = str(error.value)
    assert f"apt-get install -y {package}" in message and "\n" not in message


# ---- the mixed evaluation set against training ------------------------------------------------------------------

def test_mixed_translates_only_eval_catalogs_that_training_never_reads():
    """On this machine's catalogs: every `mixed` translation is a message of an eval-reserved catalog, and no English
    message of those is a training translation, in any language."""
    from bild.eval import mixed

    try:
        trained = {t.english for code in corpus.LANGUAGES for t in corpus.iter_translations(code, "train")}
        reserved = {t.english for code in corpus.LANGUAGES for t in corpus.iter_translations(code, "eval")}
    except CorpusSourceMissing as error:
        pytest.skip(str(error))
    asked = {row["source"].split("\n", 1)[1] for row in mixed._translations(mixed.PER_KIND)}
    assert len(asked) == mixed.PER_KIND
    assert asked <= reserved and not asked & trained


# ---- prompts -------------------------------------------------------------------------------------------------------

def test_broad_prompts_cover_every_kind_deterministically_and_prefix_stable(roots):
    prompts = tasks.build_broad_prompts(60, seed=3, roots=roots)
    assert {p.kind for p in prompts[:len(tasks.KINDS)]} == set(tasks.KINDS)  # a round has one of every kind
    assert prompts == tasks.build_broad_prompts(60, seed=3, roots=roots)
    assert prompts[:17] == tasks.build_broad_prompts(17, seed=3, roots=roots)
    assert prompts != tasks.build_broad_prompts(60, seed=4, roots=roots)
    assert all(p.prompt and p.reference and p.source for p in prompts)
    by_kind = {kind: [p for p in prompts if p.kind == kind] for kind in tasks.KINDS}
    assert {p.source.split(":")[0] for p in by_kind["define"]} == {"wordnet", "gcide"}
    assert any("Translate into English" in p.prompt for p in by_kind["translate"])
    assert not any("Quit" in p.prompt or "MSA" in p.prompt for p in by_kind["translate"])  # mnemonics, option columns
    assert any(p.reference == "3" for p in by_kind["code"])  # the session's last output
    assert all(p.source.startswith("generated:") and p.reference.isdigit() for p in by_kind["arithmetic"])
    assert len(tasks.build_broad_prompts(10**9, roots=roots)) < 500  # ends with the text: arithmetic alone does not go on


def test_training_prompts_never_show_eval_text(roots):
    text = "\n".join(p.prompt + "\n" + p.reference for p in tasks.build_broad_prompts(200, roots=roots))
    for reserved in ("Canis familiaris", "Robin", "Prolog", "json", "Backups", "computer is a moron", "Output the version"):
        assert reserved not in text
    held_out = tasks.build_broad_prompts(40, split="eval", roots=roots)
    assert any("Robin" in p.prompt for p in held_out) and not any("wolf" in p.prompt for p in held_out)


def test_raw_passages_alternate_sources_of_the_train_split(roots):
    passages = list(tasks.iter_raw_passages(roots=roots))
    assert passages[0].startswith("canine: any of various") and passages[1].startswith("Abacus: A table")
    assert passages[2].startswith("Perl\n\nPractical Extraction")
    joined = "\n".join(passages)
    assert "wolf" in joined and "Writing files" in joined and "Shells" in joined and "dog is the only" in joined
    assert "domestic dog" not in joined and "Robin" not in joined and "Backups" not in joined


def test_session_output_takes_the_last_statement_only_when_its_output_is_fixed():
    assert tasks.session_output(">>> x = 2\n>>> x + 1\n3") == (">>> x = 2\n>>> x + 1", "3")
    assert tasks.session_output(">>> for i in range(2):\n...     print(i)\n0\n1") == (
        ">>> for i in range(2):\n...     print(i)", "0\n1")
    assert tasks.session_output(">>> object()\n<object object at 0x7f>") is None
    assert tasks.session_output(">>> 1/0\nTraceback (most recent call last):\nZeroDivisionError") is None
    assert tasks.session_output("x = 1\nprint(x)") is None
    assert tasks.session_output("$ ./python\n>>> import sys\n>>> sys.platform\n'linux'") is None  # a shell session
