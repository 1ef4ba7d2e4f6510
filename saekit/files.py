"""The one way saekit writes a file: to a temporary name beside it, fsynced, then renamed over it, and
the directory fsynced so the rename sticks. A process killed at any moment leaves the old file or the
new one, never half of one. Store shards and manifests, checkpoints, models, JSON, plots and HTML all
go through ``atomic_write``, ``write_json``, ``write_tensors`` or ``atomic_path``."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from saekit.errors import UserError

LOCK_FILE = ".saekit.lock"


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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device writing {path}; free some space (or point the "
                            "output elsewhere) and rerun: finished work on disk is kept") from None
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """The one safetensors writer: every tensor detached, contiguous, on the CPU, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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


def json_text(data: Any, indent: int = 2) -> str:
    """The text ``write_json`` writes: NaN/inf as null (strict JSON), a trailing newline."""
    return json.dumps(plain(data), indent=indent) + "\n"


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> None:
    """The one JSON writer: atomic, NaN/inf as null (strict JSON), a trailing newline."""
    atomic_write(path, json_text(data, indent))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or undecodable file is a UserError naming it."""
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


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 23) -> str:
    """Hex sha256 of a file, streamed in 8 MiB chunks (memory stays flat for any size)."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk_bytes)


def sha256_stream(f, chunk_bytes: int = 1 << 23) -> str:
    """Hex sha256 of what is left to read in the binary file object ``f`` (a local file, an fsspec
    remote one), read in ``chunk_bytes`` chunks."""
    digest = hashlib.sha256()
    while block := f.read(chunk_bytes):
        digest.update(block)
    return digest.hexdigest()


@contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "saekit") -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on ``directory`` (created if missing) while writing into
    it; a second writer gets a UserError naming the holder's PID. The kernel drops a flock when its
    process exits or is killed, so a crashed run never leaves a stale lock behind. The lock file stays
    empty, so two stores written alike stay byte-identical."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{directory} is being written by another {what} process (PID "
                            f"{_flock_holder(fd)}); wait for it to finish or use another output directory") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _flock_holder(fd: int) -> str:
    """The PID holding a flock on ``fd``'s file, from the kernel's table (Linux; else "unknown")."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF"
        parts = line.split()
        if "FLOCK" in parts and key in parts:
            return parts[parts.index(key) - 1]
    return "unknown"
