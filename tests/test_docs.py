"""The README and docs/ as tested documents: their code runs, their commands parse, their links resolve.

- Every ```python block runs, each on its own (a fresh namespace, a temporary working directory), as a reader would
  paste it. In the default run the real models are swapped for tiny seeded ones: ``bild.load_model`` (and so
  ``load_pair`` and the CLI's loader) returns a tiny Llama pair built from conftest's helpers for the default
  names, and builds ``early-exit:K`` on the tiny large model. Under ``-m slow`` (which CI runs) the same blocks run
  on the real default pair.
- A block right after ``<!-- test: server -->`` talks to ``bild serve``: the test serves the same pair on a free
  loopback port and points the block's ``http://127.0.0.1:8000`` at it. A block after ``<!-- test: hub -->`` loads
  models from the Hugging Face Hub: offline it is only compiled.
- Every line of a ```bash/```sh block that runs ``bild`` parses with bild's own argument parser (nothing runs), and
  every ``make X`` names a Makefile target.
- Every relative link, and every repository path in backticks, points to an existing file (and heading, for
  ``#anchors``). Files the benchmark suite writes may be missing until it has run: paths under
  ``benchmarks/results/``, plus the suite's own README, RESULTS.md and table generator (:data:`BENCHMARK_SUITE`).
- The identities between the statistics that docs/algorithm.md states hold on tiny pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import bild
import bild.models
from bild import BiLD, BiLDConfig, LoadedModel, SamplingConfig
from bild.cli import build_parser

from conftest import make_pair, noisy_copy, prompt_ids, tiny_llama, tiny_tokenizer, watch_large_passes

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = DOCS + [ROOT / "CHANGELOG.md"]
LANGUAGES = {"python", "bash", "sh", "json", "text"}
SERVED_URL = "http://127.0.0.1:8000"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
# Written by the benchmark suite (benchmarks/README.md says how): a link to one may dangle until the suite has run.
BENCHMARK_SUITE = {"benchmarks/README.md", "benchmarks/RESULTS.md", "benchmarks/results_table.py"}
_LITTLE_WEIGHTS = Path(bild.__file__).parent / "weights" / "aligned.safetensors"


# ---- reading the documents -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # from a "<!-- test: MARKER -->" line right before the fence

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (fences at the start of a line)."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marker = re.match(r"^<!-- test: (\S+) -->$", lines[index - 1]) if index else None
        found.append(Block(path, index + 1, opening.group(1), "\n".join(lines[index + 1 : end]) + "\n",
                           marker.group(1) if marker else None))
        index = end + 1
    return found


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside code blocks."""
    inside, result = False, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            result.append((number, line))
    return result


ALL_BLOCKS = [block for path in DOCS for block in blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]
SHELL_BLOCKS = [block for block in ALL_BLOCKS if block.language in ("bash", "sh")]


def test_every_block_names_a_known_language():
    unknown = [f"{block.id}: {block.language or '(none)'}" for block in ALL_BLOCKS if block.language not in LANGUAGES]
    assert not unknown, f"fenced blocks need one of {sorted(LANGUAGES)}: {unknown}"
    assert PYTHON_BLOCKS and SHELL_BLOCKS


# ---- python blocks ---------------------------------------------------------------------------------------------


def tiny_default_pair() -> tuple[LoadedModel, LoadedModel]:
    """A tiny chat-capable stand-in for the default pair: a 6-layer Llama and a noisy copy of it."""
    tokenizer = tiny_tokenizer(with_eos=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    large = tiny_llama(seed=1, layers=6)
    small = noisy_copy(large, seed=2, noise=0.1)
    return (LoadedModel(bild.DEFAULT_LARGE, large, tokenizer, False, True),
            LoadedModel(bild.DEFAULT_SMALL, small, tokenizer, False, True))


@pytest.fixture
def tiny_models(monkeypatch):
    """Swap the real models for tiny ones wherever bild loads a model by name."""
    tiny_large, tiny_small = tiny_default_pair()
    real_load_model = bild.models.load_model
    small_names = {bild.DEFAULT_SMALL, "smollm2-little", "smollm2-little-unaligned", "smollm2-early-exit"}

    def load_model(name_or_path: str, large: LoadedModel | None = None, **placement):
        if name_or_path == bild.DEFAULT_LARGE:
            return tiny_large
        if name_or_path in small_names:
            return tiny_small
        if name_or_path.startswith("early-exit:"):
            from bild.drafters.early_exit import untrained_exit

            return untrained_exit(large or tiny_large, name_or_path.partition(":")[2])
        return real_load_model(name_or_path, large, **placement)  # a directory a block wrote

    monkeypatch.setattr(bild.models, "load_model", load_model)
    monkeypatch.setattr(bild, "load_model", load_model)
    return tiny_large, tiny_small


class Server:
    """A bild serve app in a thread on a free loopback port."""

    def __init__(self, engine: BiLD) -> None:
        import uvicorn

        from bild.serve import create_app

        app = create_app(engine, bild.DEFAULT_LARGE, BiLDConfig(max_new_tokens=32), queue_size=2)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


def run_block(block: Block, directory: Path, monkeypatch) -> None:
    monkeypatch.chdir(directory)
    code = block.code
    if block.marker == "server":
        assert SERVED_URL in code, f"{block.id}: a server block must use {SERVED_URL}"
        with Server(BiLD(bild.load_pair())) as server:
            exec(compile(code.replace(SERVED_URL, server.url), block.id, "exec"), {"__name__": "__doc__"})
        return
    if block.marker == "hub":
        # names Hugging Face Hub models, which this offline test cannot download: it must at least compile
        compile(code, block.id, "exec")
        pytest.skip(f"{block.id} downloads models from the Hugging Face Hub")
    assert block.marker is None, f"{block.id}: unknown marker {block.marker!r}"
    exec(compile(code, block.id, "exec"), {"__name__": "__doc__"})


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.id)
def test_python_block_runs_on_tiny_models(block, tiny_models, tmp_path, monkeypatch):
    run_block(block, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.skipif(not _LITTLE_WEIGHTS.is_file(), reason=f"the little model's weights are missing ({_LITTLE_WEIGHTS})")
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.id)
def test_python_block_runs_on_the_real_pair(block, tmp_path, monkeypatch):
    run_block(block, tmp_path, monkeypatch)


# ---- shell blocks ----------------------------------------------------------------------------------------------


def logical_lines(code: str) -> list[str]:
    """Lines with backslash continuations joined."""
    lines, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    return lines


_BILD_LINE = re.compile(r"^\s*(?:[A-Za-z_]\w*=\S*\s+)*(?:\.venv/bin/)?bild(?:\s|$)")
_MAKE_LINE = re.compile(r"^\s*make\s+([\w-]+)")


def bild_commands() -> list:
    """A pytest.param(where, argv) for every shell line that runs bild, environment assignments stripped."""
    commands = []
    for block in SHELL_BLOCKS:
        for line in logical_lines(block.code):
            if _BILD_LINE.match(line):
                words = shlex.split(line, comments=True)
                while "=" in words[0] and not words[0].endswith("bild"):
                    words.pop(0)
                where = f"{block.id}: {line.split('#')[0].strip()}"
                commands.append(pytest.param(where, words[1:], id=where))
    return commands


@pytest.mark.parametrize("where, argv", bild_commands())
def test_bild_command_parses(where, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}\n  does not parse (exit {exit_.code}): {capsys.readouterr().err.strip()}")


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    used = {(block.id, match.group(1)) for block in SHELL_BLOCKS for line in block.code.splitlines()
            if (match := _MAKE_LINE.match(line))}
    missing = [f"{where}: make {target}" for where, target in sorted(used) if target not in targets]
    assert used and not missing, missing


# ---- links -----------------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path):
        heading = re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def may_be_missing(relative: str) -> bool:
    return relative.startswith("benchmarks/results/") or relative in BENCHMARK_SUITE


def broken(path: Path, target: str) -> str | None:
    """Why a link from `path` to `target` is broken, or None."""
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    try:
        relative = resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return f"{target}: outside the repository"
    if not resolved.exists():
        return None if may_be_missing(relative) else f"{target}: no such file"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: no heading #{anchor} in {relative}"
    return None


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PATH_IN_CODE = re.compile(r"`((?:src|tests|docs|data|benchmarks)/[\w./-]+)`")


@pytest.mark.parametrize("path", LINKED, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    problems = []
    for number, line in prose_lines(path):
        for target in _LINK.findall(line):
            if not re.match(r"^[a-z]+:", target) and (reason := broken(path, target)):
                problems.append(f"line {number}: {reason}")
    assert not problems, problems


@pytest.mark.parametrize("path", LINKED, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_repository_paths_in_backticks_exist(path):
    missing = [f"line {number}: {name}" for number, line in prose_lines(path) for name in _PATH_IN_CODE.findall(line)
               if not (ROOT / name).exists() and not may_be_missing(name)]
    assert not missing, missing


def test_no_run_diary_in_the_docs():
    """README and docs describe the product, not how or when it was made."""
    diary = re.compile(r"\bsessions?\b|\b20\d\d-\d\d-\d\d\b|\bissues?\b|shipped (?:before|until|since)", re.I)
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in DOCS
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if diary.search(line)]
    assert not hits, hits


# ---- the glossary's identities (docs/algorithm.md) ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_statistics_add_up_as_the_glossary_says(family, monkeypatch):
    small_decoders = []
    watch_large_passes(monkeypatch, lambda run, large, small, rolled_back: small_decoders.append(small))
    engine = BiLD(make_pair(family, with_eos=True, noise=0.3))
    settings = itertools.product([0.0, 0.5, 1.0], [0.0, 2.0, float("inf")], [0.0, 1.0])
    seen = {"rollbacks": 0, "fallbacks": 0, "small_tokens_kept": 0, "tokens_discarded": 0, "lookup_tokens_drafted": 0}
    for index, (fallback, rollback, temperature) in enumerate(settings):
        n, repeat = (1, 0) if index % 2 else (4, 2)  # N and the repetition guard alternate, to keep the grid small
        sampling = SamplingConfig(temperature=temperature, seed=0)
        lookup = 1 if index % 3 == 0 else None  # lookup drafts on single tokens fire often, even without repeats
        config = BiLDConfig(fallback_threshold=fallback, rollback_threshold=rollback, max_small_steps=n,
                            max_new_tokens=16, repeat_ngram=repeat, lookup=lookup, sampling=sampling)
        small_decoders.clear()
        result = engine.generate_ids(prompt_ids(3, 6), config)
        s = result.stats
        assert small_decoders[-1].calls == s.small_tokens_drafted + s.fallbacks, config  # the small model's steps
        assert s.new_tokens == s.small_tokens_kept + s.large_tokens == len(result.token_ids), config
        assert s.small_tokens_drafted == s.small_tokens_kept + s.tokens_discarded, config
        assert s.large_passes - 1 <= s.large_tokens - s.lookup_tokens_kept <= s.large_passes, config
        assert s.lookup_tokens_kept <= s.lookup_tokens_drafted, config
        thrown = s.tokens_discarded + s.lookup_tokens_drafted - s.lookup_tokens_kept
        assert s.fallbacks <= s.large_passes and s.rollbacks <= min(s.large_passes, thrown), config
        assert s.small_time_s + s.large_time_s <= s.wall_time_s, config
        for key in seen:
            seen[key] += getattr(s, key)
    assert all(seen.values()), f"the grid should exercise every kind of event: {seen}"
    vanilla = engine.vanilla_ids(prompt_ids(3, 6), BiLDConfig(max_new_tokens=16)).stats
    assert vanilla.large_passes == vanilla.new_tokens == vanilla.large_tokens
