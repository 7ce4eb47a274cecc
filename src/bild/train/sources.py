"""Real text that is on every machine like this one: the docstrings of Python's standard library (PSF License), and
of an installed package that every set-up path pins (PyTorch 2.13.0, BSD-3-Clause; :func:`iter_package_docstrings`).

One rule keeps training and evaluation disjoint for everyone: a stdlib module whose top-level package name hashes to
``zlib.crc32(name.encode()) % 5 == 0`` is reserved for evaluation (:func:`is_eval_module`). Training, calibration and
tuning use only the other modules. Docstrings are read with ``ast`` from the ``.py`` files; no module is imported.
The machine's man pages (/usr/share/man) are reserved for independent evaluation and are never read here.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

logger = logging.getLogger(__name__)

LICENSE = "Python Software Foundation License (PSF-2.0), the Python standard library's own docstrings"
PACKAGE_LICENSES = {"torch": "BSD-3-Clause, PyTorch's own docstrings (torch 2.13.0, pinned by every set-up path)"}
# Directories whose text is tests, vendored third-party code or installed packages, not the stdlib's documentation.
_SKIPPED_PARTS = frozenset({"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"})

# ... and inside an installed package: its testing helpers and vendored code under other licenses.
_PACKAGE_SKIPPED = frozenset({"testing", "_vendor", "third_party"})

Split = Literal["train", "eval", "all"]


@dataclass(frozen=True)
class Docstring:
    """One docstring: the dotted module it lives in, the object's qualified name ('' for the module) and its text."""

    module: str  # e.g. "json.decoder"
    qualname: str  # e.g. "JSONDecoder.decode"; "" for the module docstring
    kind: Literal["module", "class", "function"]
    text: str  # cleaned with inspect.cleandoc semantics (ast.get_docstring)

    @property
    def package(self) -> str:
        return top_level_package(self.module)

    @property
    def dotted_name(self) -> str:
        return f"{self.module}.{self.qualname}" if self.qualname else self.module


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory (works on any machine)."""
    return Path(sysconfig.get_paths()["stdlib"])


def top_level_package(module: str) -> str:
    """'json.decoder' -> 'json'; 'os' -> 'os'."""
    return module.split(".", 1)[0]


def is_eval_module(name: str) -> bool:
    """True when the module (dotted name or top-level package) is reserved for evaluation: crc32(top) % 5 == 0."""
    return zlib.crc32(top_level_package(name).encode()) % 5 == 0


def in_split(module: str, split: Split) -> bool:
    if split == "all":
        return True
    return is_eval_module(module) == (split == "eval")


def module_name(path: Path, root: Path) -> str | None:
    """Dotted module name of a stdlib file, or None for files we skip (tests, site-packages, private scripts)."""
    relative = path.relative_to(root)
    if any(part in _SKIPPED_PARTS for part in relative.parts):
        return None
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(not part.isidentifier() for part in parts):
        return None
    return ".".join(parts)


def iter_module_files(split: Split = "train", root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(module name, path) of every stdlib .py file in the split, sorted so every run sees the same order."""
    root = root or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if name is not None and in_split(name, split):
            yield name, path


def docstrings_in_file(module: str, path: Path) -> list[Docstring]:
    """Every module, class and function docstring of one file, in source order; [] if the file does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as error:
        logger.debug("skipping %s: %s", path, error)
        return []
    found: list[Docstring] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        found.append(Docstring(module, "", "module", module_doc))
    found.extend(_walk_definitions(module, tree, prefix=""))
    return found


def _walk_definitions(module: str, node: ast.AST, prefix: str) -> Iterator[Docstring]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{prefix}{child.name}"
            text = ast.get_docstring(child)
            if text:
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                yield Docstring(module, qualname, kind, text)
            yield from _walk_definitions(module, child, prefix=f"{qualname}.")


def package_dir(package: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def iter_package_docstrings(package: str, min_chars: int = 40) -> Iterator[Docstring]:
    """Docstrings of an installed package (e.g. "torch"), in a fixed order; its tests, testing helpers and vendored
    third-party code skipped.

    None of it is stdlib text, so :func:`is_eval_module` does not apply: the evaluation sets never use it.
    """
    return _long_docstrings(_package_files(package_dir(package)), min_chars)


def _package_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(module name, path) of every .py file of the package at ``root`` that is not skipped, sorted."""
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root.parent)
        if name is not None and _PACKAGE_SKIPPED.isdisjoint(name.split(".")):
            yield name, path


def iter_docstrings(split: Split = "train", min_chars: int = 40, root: Path | None = None) -> Iterator[Docstring]:
    """Docstrings of the stdlib modules in the split with at least ``min_chars`` characters, in a fixed order."""
    return _long_docstrings(iter_module_files(split, root), min_chars)


def _long_docstrings(files: Iterable[tuple[str, Path]], min_chars: int) -> Iterator[Docstring]:
    """The docstrings of (module name, path) files with at least ``min_chars`` characters, in file order."""
    for module, path in files:
        for doc in docstrings_in_file(module, path):
            if len(doc.text) >= min_chars:
                yield doc


def paragraphs(text: str, min_chars: int = 80) -> list[str]:
    """Prose paragraphs of a docstring (blank-line separated, joined to one line), skipping doctest and code blocks."""
    result = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith((">>>", "...", "$ ")) for line in lines):
            continue
        if sum(ch.isalpha() for ch in block) < 0.6 * len(block.strip()):
            continue  # tables, signatures and code, not prose
        paragraph = " ".join(lines)
        if len(paragraph) >= min_chars:
            result.append(paragraph)
    return result
