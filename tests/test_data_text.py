import itertools
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saekit.data.text import TextColumnError, _file_docstrings, iter_texts, stdlib_files


def test_stdlib_docstrings_fixed_order():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 300
    skipped = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__"}
    assert not any(set(r.split("/")[:-1]) & skipped for r in rel)
    first = list(itertools.islice(iter_texts("builtin:stdlib-docstrings"), 300))
    again = list(itertools.islice(iter_texts("builtin:stdlib-docstrings"), 300))
    assert first == again and all(first)
    # A seeded shuffle of the file-ordered docstrings: pinned, so a change of order is noticed.
    assert first[0].startswith("Set the selection from FIRST to LAST")
    everything = list(iter_texts("builtin:stdlib-docstrings"))
    in_file_order = [d for f in files for d in _file_docstrings(f)]
    assert sorted(everything) == sorted(in_file_order) and everything != in_file_order


def test_stdlib_source_yields_whole_python_files():
    """The larger, code-heavy built-in corpus: one document per standard-library file, in file order."""
    first = list(itertools.islice(iter_texts("builtin:stdlib-source"), 3))
    assert first == [f.read_text(encoding="utf-8", errors="replace").strip() for f in stdlib_files()[:3]]
    assert any("def " in doc or "import " in doc for doc in first)


def test_unknown_builtin():
    with pytest.raises(ValueError, match="builtin:stdlib-docstrings"):
        next(iter_texts("builtin:nope"))


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\nsecond paragraph\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"json {i}", "id": i}) for i in range(3)))
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"body": ["pq 0", "", "pq 2"], "n": [0, 1, 2]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "skip.csv").write_text("body\nnot read\n")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["first paragraph\nstill first", "second paragraph"]
    docs = list(iter_texts(str(tmp_path), text_column="body"))
    # sorted paths: a.txt, b.jsonl, sub/c.parquet; empty texts skipped
    assert docs == ["first paragraph\nstill first", "second paragraph", "json 0", "json 1", "json 2",
                    "pq 0", "pq 2"]


def test_missing_column_names_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(TextColumnError, match="'text' not found.*columns present: content, meta"):
        list(iter_texts(str(tmp_path / "d.jsonl")))
