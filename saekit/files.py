"""The one way saekit writes a file: to a temporary name beside it, fsynced, then renamed over it, and
the directory fsynced so the rename sticks. A process killed at any moment leaves the old file or the
new one, never half of one. Store shards and manifests, checkpoints, models, JSON, plots and HTML all
go through ``atomic_write`` or ``atomic_path``."""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s content to (for writers that want a file name:
    safetensors, matplotlib); on a clean exit it is fsynced and renamed over ``path``, on an error
    removed. The temporary name keeps the suffix, so writers that go by it pick the right format."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def plain(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, tensors and tuples lists, keys strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors, numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """The one JSON writer: atomic, NaN/inf as null (strict JSON), a trailing newline."""
    atomic_write(path, json.dumps(plain(data), indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or undecodable file is a UserError naming it."""
    from saekit.errors import UserError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); restore or delete the file") from None


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically as ``path`` (format from its suffix) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)
