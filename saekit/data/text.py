"""Text sources: a HuggingFace dataset by name, local files, or a built-in offline corpus.

Every source is a plain iterator of strings in a fixed order, so that packing it into windows (and
therefore a resumed harvest) is deterministic.
"""
from __future__ import annotations

import ast
import functools
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from saekit.errors import ConfigError, UserError

# Local file suffix -> `datasets` builder that reads it.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Stdlib folders that are not library documentation (tests, the IDE, demos) or not the stdlib at all.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                     "turtledemo", "__pycache__"}


class TextColumnError(UserError, KeyError):
    """The requested text column is not in the dataset."""


def iter_texts(dataset: str, dataset_config: str | None = None, split: str = "train",
               text_column: str = "text", encoding: str = "utf-8", errors: str = "strict") -> Iterator[str]:
    """Yield documents from ``dataset``.

    ``dataset`` is one of:
      * ``builtin:<name>``: an offline corpus (see ``BUILTIN_CORPORA``);
      * a local file or directory of ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files (directories are
        searched recursively, files taken in sorted path order). A ``.txt`` file yields one document per
        blank-line-separated paragraph (so a large file never becomes one giant string);
        the other formats yield ``text_column`` of each record;
      * otherwise a HuggingFace dataset name, streamed (nothing is downloaded up front).
    Empty documents are skipped. Local files are decoded with ``encoding``; a byte that does not decode
    is an error naming the file and its offset unless ``errors`` is "replace" or "ignore".
    """
    if dataset.startswith("builtin:"):
        name = dataset[len("builtin:"):]
        if name not in BUILTIN_CORPORA:
            raise ConfigError(f"config key 'dataset': unknown built-in corpus '{dataset}'; available: "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN_CORPORA))
        yield from BUILTIN_CORPORA[name]()
        return
    if os.path.exists(dataset):
        yield from _iter_local(Path(dataset), text_column, encoding, errors)
        return
    if dataset.startswith(("/", "./", "../", "~")) or Path(dataset).suffix in _BUILDERS:
        raise UserError(f"dataset {dataset!r}: no such file or directory (a Hub dataset is named like "
                        "ORG/NAME, without a file suffix)")
    from datasets import load_dataset

    ds = load_dataset(dataset, dataset_config, split=split, streaming=True)
    yield from _column(ds, text_column, dataset)


def texts_of(cfg) -> Iterator[str]:
    """The documents a harvest-shaped config names: anything with HarvestConfig's ``dataset``,
    ``dataset_config``, ``split``, ``text_column``, ``text_encoding`` and ``text_errors`` (duck-typed,
    since data/ does not import the config)."""
    return iter_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column, cfg.text_encoding,
                      cfg.text_errors)


def _column(records, text_column: str, where: str) -> Iterator[str]:
    """The non-empty strings of ``text_column``; a missing column is an error naming those present."""
    for record in records:
        if text_column not in record:
            raise TextColumnError(f"text column '{text_column}' not found in {where}; "
                                  f"columns present: {', '.join(sorted(record))}")
        text = record[text_column]
        if text:
            yield text


def _iter_local(path: Path, text_column: str, encoding: str = "utf-8",
                errors: str = "strict") -> Iterator[str]:
    from datasets import load_dataset

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _BUILDERS)
        if not files:
            raise UserError(f"no .txt/.jsonl/.json/.parquet files under {path}")
    else:
        if path.suffix not in _BUILDERS:
            raise ConfigError(f"{path}: unsupported file type; use .txt, .jsonl, .json or .parquet")
        files = [path]
    # Runs of consecutive files with the same builder go through one load_dataset call; the sorted
    # file order is kept as is.
    runs: list[tuple[str, list[str]]] = []
    for f in files:
        builder = _BUILDERS[f.suffix]
        if runs and runs[-1][0] == builder:
            runs[-1][1].append(str(f))
        else:
            runs.append((builder, [str(f)]))
    for builder, data_files in runs:
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        if builder != "parquet":
            kwargs.update(encoding=encoding, encoding_errors=errors)
        # streaming: read lazily, and write no Arrow cache next to the user's data.
        ds = load_dataset(builder, data_files=data_files, split="train", streaming=True, **kwargs)
        column = "text" if builder == "text" else text_column
        try:
            for text in _column(ds, column, str(path)):
                if builder == "text":
                    text = text.strip()  # paragraph splitting leaves stray newlines at the edges
                    if not text:
                        continue
                yield text
        except UnicodeDecodeError:
            raise _undecodable(data_files, encoding) from None


def _undecodable(files: list[str], encoding: str) -> UserError:
    """The error for the first byte of ``files`` that does not decode: the file and its offset."""
    import codecs

    for name in files:
        decoder, offset = codecs.getincrementaldecoder(encoding)(), 0
        with open(name, "rb") as f:
            while block := f.read(1 << 20):
                pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as err:
                    at = offset - pending + err.start
                    return UserError(f"{name}: byte {at} is not valid {encoding} text; convert "
                                     "the file, or set text_encoding (e.g. latin-1) or text_errors: replace")
                offset += len(block)
    return UserError(f"{', '.join(files)}: not valid {encoding} text; set text_encoding or text_errors: replace")


# ----------------------------------------------------------------------------- built-in corpora
def stdlib_files() -> list[Path]:
    """The Python standard library's own .py files, sorted by path relative to the stdlib root.

    Platform-generated files (``_sysconfigdata*``, the ``config-*`` build folder) are skipped so that the
    list is the same on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of the module and every class/function in it, in source order (depth first).

    Iterative, and skipping expressions (no def can live inside one), so a deeply nested expression
    can never hit the recursion limit.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        children = [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr)]
        stack.extend(reversed(children))


def stdlib_docstrings() -> Iterator[str]:
    """Module, class and function docstrings of the standard library, parsed (never imported).

    Collected file by file in sorted order, then shuffled with a fixed seed (``random.Random(0)``, stable
    across machines): any contiguous slice of the corpus, such as the held-out tail of a store, then
    samples the whole library instead of the alphabetically last modules (xml, zipfile, zoneinfo).
    """
    yield from _shuffled_docstrings()


@functools.lru_cache(maxsize=1)  # parsing the library takes seconds; the result is ~2 MB of text
def _shuffled_docstrings() -> tuple[str, ...]:
    docs = [doc for path in stdlib_files() for doc in _file_docstrings(path)]
    random.Random(0).shuffle(docs)
    return tuple(docs)


def _file_docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # a file the running parser rejects: skip, deterministically
        return []
    return list(_docstrings(tree))


def stdlib_source() -> Iterator[str]:
    """Whole standard-library source files, one document each: a larger (code-heavy) offline corpus."""
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text


BUILTIN_CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "stdlib-docstrings": stdlib_docstrings,
    "stdlib-source": stdlib_source,
}
# Bumped whenever a built-in corpus yields other text for the same name (2: docstrings shuffled).
BUILTIN_VERSIONS = {"stdlib-docstrings": 2, "stdlib-source": 1}


def corpus_id(dataset: str) -> str | None:
    """What fixes a built-in corpus's text beyond its name: our version of it and the Python whose
    standard library it reads (None for other sources, whose name and revision say it). A store records
    this, so a resume never appends text from a different corpus to what is on disk."""
    if not dataset.startswith("builtin:"):
        return None
    name = dataset[len("builtin:"):]
    return f"{dataset} v{BUILTIN_VERSIONS.get(name, 1)}, Python {sys.version_info[0]}.{sys.version_info[1]}"
