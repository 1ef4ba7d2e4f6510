"""The activation store: a directory holding ``manifest.json`` and ``shard_00000.safetensors``, ...

Each shard holds WHOLE sequences (``shard_sequences`` of them, the last shard fewer):

    tokens        int32 [n_seq, ctx]   the full windows, special tokens included (for showing context)
    seq_index     int64 [n_seq]        global sequence index of each window
    row_seq       int64 [n_rows]       global sequence index of each activation row
    row_pos       int32 [n_rows]       position of the row inside its window
    row_token     int32 [n_rows]       token id at that position
    acts.<hook>   dtype [n_rows, d]    one tensor per hook; rows are the kept positions, in (seq, pos) order

Global row r of the store is row ``r - first_row`` of the shard whose range holds it. The manifest is the
single source of truth: a shard counts once it is listed there. Shards and manifest are written to a
temporary file, fsynced and renamed, so a process killed at any moment leaves either the old or the new
state; on reopening, anything unlisted is deleted and the writer continues from the last listed shard.
Since shard boundaries depend only on sequence counts, a killed-and-resumed harvest ends with the same
bytes as an uninterrupted one (the manifest holds no timestamps for the same reason).

A store may also live on object storage, named by an fsspec URL (``s3://bucket/store``, ``gs://...``,
``hf://...``): the same files, each object written whole by one PUT (atomic there), the manifest last;
reads fetch a shard once, verify it and slice it from a small in-memory cache, and ``prefetch`` lets a
loader fetch the shards it reads next in the background. Local paths keep the local code path.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

import saekit
from saekit.errors import UserError
from saekit.files import atomic_write, json_text, sha256_file, sha256_stream
from saekit.schema import check_choice, config_diff

from .tokens import tokenizer_meta

FORMAT = "saekit.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Harvest config keys that do not change what is stored, so they may differ on resume.
IGNORED_CONFIG_KEYS = ("out", "progress")
# Meta keys the manifest always has (None when the harvester does not know them).
META_KEYS = ("model", "revision", "architecture", "context_size", "tokenizer", "keep_special_tokens")
# files.atomic_path's temporary names (and those of saekit before it, ending in ".tmp")
_OWN_TMP = re.compile(r"(shard_\d+|manifest)\.tmp\.(safetensors|json)|(shard_\d+\.safetensors|manifest\.json)\.tmp")
_SHARD = re.compile(r"shard_\d+\.safetensors")
# saekit.__version__, or the installed metadata when a stale editable install imports saekit as a
# namespace package (its __init__ then never runs).
SAEKIT_VERSION = getattr(saekit, "__version__", None) or importlib.metadata.version("saekit")


class StoreError(UserError):
    """A store directory that cannot be used as asked."""


class StoreMismatchError(StoreError):
    """The directory holds a store made with a different configuration."""


class CorruptShardError(StoreError):
    """A shard file is missing, truncated or does not match its checksum."""


def split_rows(n_rows: int, heldout_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(training rows, held-out rows) as global row ranges: the held-out rows are the store's last
    ``heldout_tokens`` (all of it when it has fewer). The one definition of the split: the trainer
    reads the first range, evaluation the second."""
    if heldout_tokens < 0:
        raise ValueError(f"heldout_tokens must be >= 0, got {heldout_tokens}")
    start = max(0, n_rows - heldout_tokens)
    return (0, start), (start, n_rows)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _read_manifest(files: _Local | _Remote) -> dict:
    path = files.label(MANIFEST)
    try:
        manifest = json.loads(files.read(MANIFEST).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path}: not a saekit activation store (format {found!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {manifest['format_version']} is newer than this "
                         f"saekit ({SAEKIT_VERSION}) reads ({FORMAT_VERSION})")
    _check_schema(path, manifest, _MANIFEST_SCHEMA, "")
    for i, shard in enumerate(manifest["shards"]):
        _check_schema(path, shard, _SHARD_SCHEMA, f"shards[{i}].")
    if manifest["dtype"] not in DTYPES:
        raise StoreError(f"{path}: dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    return manifest


# What a manifest must hold, and of which type (bool is not an int here).
_MANIFEST_SCHEMA = {"hooks": list, "d_model": int, "dtype": str, "context_size": int, "n_rows": int,
                    "n_sequences": int, "complete": bool, "shards": list}
_SHARD_SCHEMA = {"file": str, "bytes": int, "sha256": str, "first_row": int, "n_rows": int,
                 "first_sequence": int, "n_sequences": int}


def _check_schema(path: Path | str, entry, schema: dict, where: str) -> None:
    if not isinstance(entry, dict):
        raise StoreError(f"{path}: {where.rstrip('.') or 'the manifest'} is not a JSON object; the manifest is "
                         "damaged (restore it, or delete the store and harvest again)")
    for key, kind in schema.items():
        value = entry.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            got = "missing" if key not in entry else f"{type(value).__name__} {value!r}"
            raise StoreError(f"{path}: '{where}{key}' should be a {kind.__name__}, got {got}; the manifest is "
                             "damaged (restore it, or delete the store and harvest again)")


# ------------------------------------------------------------------------------- where a store lives
# The extra that installs the fsspec backend of a protocol (`pip install saekit[s3]`).
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# The environment variable that points each backend at another endpoint (an S3-compatible server, the
# GCS emulator).
_ENDPOINT_VARIABLES = {"s3": "AWS_ENDPOINT_URL", "s3a": "AWS_ENDPOINT_URL", "gs": "STORAGE_EMULATOR_HOST",
                       "gcs": "STORAGE_EMULATOR_HOST"}
# Where the exceptions of remote backends come from: these become one-line StoreErrors naming the URL.
_BACKEND_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "huggingface_hub",
                    "requests", "urllib3", "fsspec"}


def store_location(directory: str | os.PathLike) -> Path | str:
    """A store's location: a local ``Path``, or the fsspec URL of a remote store (``s3://bucket/store``,
    ``gs://...``, ``hf://...``; ``file://`` URLs are local paths). A URL that went through ``pathlib``
    (which folds ``s3://b`` into ``s3:/b``) is restored, so callers that wrap a store setting in Path, or
    print such a Path, still name the remote store."""
    text = os.fspath(directory)
    folded = re.fullmatch(r"([a-z][a-z0-9+.-]+):/([^/].*)", text)
    if folded and folded[1] in _remote_protocols():
        text = f"{folded[1]}://{folded[2]}"
    protocol, rest = fsspec.core.split_protocol(text)
    if protocol in (None, "file", "local"):
        return Path(rest if protocol else text)
    return text.rstrip("/")


def store_complete(directory: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """Whether ``directory`` (a path or an fsspec URL) holds a finished store: a valid manifest that
    says so. (A damaged or foreign manifest is an error, not an absent store.)"""
    files = _open_files(directory, storage_options)
    return files.exists(MANIFEST) and _read_manifest(files)["complete"]


def _remote_protocols() -> set[str]:
    return set(fsspec.available_protocols()) - {"file", "local"}


def _open_files(directory: str | os.PathLike, storage_options: dict | None) -> _Local | _Remote:
    where = store_location(directory)
    return _Local(where) if isinstance(where, Path) else _Remote(where, storage_options)


class _Local:
    """A store directory on the local disk: each file written atomically (temporary file, fsync, rename)."""
    remote = False

    def __init__(self, where: Path):
        self.where = where

    def label(self, name: str) -> Path:
        return self.where / name

    def prepare(self) -> None:
        self.where.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.where / name).exists()

    def read(self, name: str) -> bytes:
        return (self.where / name).read_bytes()

    def write(self, name: str, data: bytes | str) -> None:
        atomic_write(self.where / name, data)

    def size(self, name: str) -> int:
        return (self.where / name).stat().st_size

    def sha256(self, name: str) -> str:
        return sha256_file(self.where / name)

    def names(self) -> list[str]:
        return [p.name for p in self.where.iterdir()]

    def delete(self, name: str) -> None:
        (self.where / name).unlink()


class _Remote:
    """A store on an fsspec filesystem, in practice object storage (S3 and compatibles, GCS, the HF hub).

    Every object is written whole by one call: on S3 and GCS one PUT (shards over 100 MiB a multipart
    upload, which S3 also makes visible only once complete), so a reader or a resumed writer sees the old
    object or the new one, never part of one. That is what the local temporary-file-and-rename gives,
    so the manifest, written last and whole, is updated atomically here too. Options for the backend
    (endpoint, credentials) come from ``storage_options`` or fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` and
    the backend's own environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)."""
    remote = True

    def __init__(self, url: str, storage_options: dict | None = None):
        self.where = url
        protocol = fsspec.core.split_protocol(url)[0]
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as err:
            extra = _EXTRAS.get(protocol)
            fix = f"pip install saekit[{extra}]" if extra else f"install fsspec's backend for {protocol}://"
            raise UserError(f"{url}: {protocol}:// stores need a package that is not installed ({err}); "
                            f"{fix}") from None
        except ValueError as err:  # fsspec: "Protocol not known"
            raise UserError(f"{url}: {err}; a store is a local path or an fsspec URL (s3://, gs://, hf://, "
                            "...)") from None
        self.root = root.rstrip("/")
        # s3fs caches listings; another process (a killed harvest) may have written since they were made.
        self.fs.invalidate_cache(self.root)

    def label(self, name: str) -> str:
        return f"{self.where}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        """Nothing: object stores have no directories, and a missing bucket should be an error naming the
        URL (at the first write), not a bucket made by accident."""

    @contextmanager
    def _errors(self, missing_is_error: bool = False):
        """Backend failures (no such bucket, no credentials, no connection) as one-line StoreErrors naming
        the URL; a missing object stays a FileNotFoundError for the caller to name, unless it is an error
        here (a write into a missing bucket)."""
        try:
            yield
        except FileNotFoundError as err:
            if missing_is_error:
                raise self._unreachable(err) from None
            raise
        except UserError:
            raise
        except Exception as err:
            if isinstance(err, OSError) or type(err).__module__.split(".")[0] in _BACKEND_MODULES:
                raise self._unreachable(err) from None
            raise

    def _unreachable(self, err: BaseException) -> StoreError:
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        endpoint = _ENDPOINT_VARIABLES.get(fsspec.core.split_protocol(self.where)[0])
        return StoreError(f"{self.where}: cannot use this store ({detail}); check the bucket, the credentials "
                          f"and the endpoint ({f'{endpoint} or ' if endpoint else ''}storage_options)")

    def exists(self, name: str) -> bool:
        with self._errors():
            return self.fs.exists(self._path(name))

    def read(self, name: str) -> bytes:
        with self._errors():
            return self.fs.cat_file(self._path(name))

    def write(self, name: str, data: bytes | str) -> None:
        with self._errors(missing_is_error=True):
            self.fs.pipe_file(self._path(name), data.encode("utf-8") if isinstance(data, str) else data)

    def size(self, name: str) -> int:
        with self._errors():
            return self.fs.size(self._path(name))

    def sha256(self, name: str) -> str:
        with self._errors(), self.fs.open(self._path(name), "rb") as f:
            return sha256_stream(f)

    def names(self) -> list[str]:
        with self._errors():
            try:
                listed = self.fs.ls(self.root, detail=False, refresh=True)
            except FileNotFoundError:  # nothing written under the prefix yet
                return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]

    def delete(self, name: str) -> None:
        with self._errors():
            self.fs.rm_file(self._path(name))


# ------------------------------------------------------------------------------------------- writer
class StoreWriter:
    """Append sequences of activations to a store, one shard per ``shard_sequences`` sequences.

    ``meta`` describes the source (keys in META_KEYS; ``context_size`` is required); the keyword
    arguments ``tokenizer`` (a HF tokenizer, recorded via ``tokenizer_meta``), ``context_size`` and
    ``keep_special_tokens`` are shortcuts that fill those meta keys. ``config`` is the
    full harvest config, stored as is and compared on reopen (minus IGNORED_CONFIG_KEYS). Reopening a
    directory whose store has a different config, meta, hooks, d_model, dtype, shard size or max_rows
    raises StoreMismatchError listing each difference; an identical one resumes: ``sequences_done``
    windows are already stored (skip them), ``complete`` says nothing is left to do. ``max_rows`` caps
    the store at exactly that many rows (the last sequence keeps only the rows needed; ``full`` then
    turns True and further ``add`` calls are ignored).

    Full shards are serialized, hashed and written on a background thread (one shard in flight at a
    time), so a GPU harvest keeps running its forward passes meanwhile. ``finish()`` (or ``close()``,
    or leaving a ``with`` block) waits for that write; only ``finish()`` marks the store complete.

    ``directory`` may be an fsspec URL (``s3://bucket/store``; ``storage_options`` go to its filesystem):
    shards and manifest are then objects, each written whole, the manifest last. There is no lock on
    object storage: run one writer per store URL.
    """

    def __init__(self, directory: str | os.PathLike, meta: dict, config: dict, hooks: list[str],
                 d_model: int, dtype: str = "float32", shard_sequences: int = 256,
                 max_rows: int | None = None, *, tokenizer=None, context_size: int | None = None,
                 keep_special_tokens: bool | None = None, storage_options: dict | None = None):
        meta = dict(meta)
        if tokenizer is not None:
            meta["tokenizer"] = tokenizer_meta(tokenizer)
        if context_size is not None:
            meta["context_size"] = context_size
        if keep_special_tokens is not None:
            meta["keep_special_tokens"] = keep_special_tokens
        check_choice(dtype, DTYPES, "store dtype")
        if "context_size" not in meta:
            raise ValueError("meta must give context_size")
        if shard_sequences < 1:
            raise ValueError("shard_sequences must be at least 1")
        self._files = _open_files(directory, storage_options)
        self.directory = self._files.where
        self.hooks = list(hooks)
        self.d_model = int(d_model)
        self.dtype = DTYPES[dtype]
        self.shard_sequences = int(shard_sequences)
        self.max_rows = max_rows
        self.context_size = int(meta["context_size"])
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "saekit_version": SAEKIT_VERSION}
        manifest.update({key: meta.get(key) for key in META_KEYS})
        manifest.update({key: value for key, value in meta.items() if key not in META_KEYS})
        manifest.update({"hooks": self.hooks, "d_model": self.d_model, "dtype": dtype,
                         "shard_sequences": self.shard_sequences, "max_rows": max_rows,
                         "config": json.loads(json.dumps(config)),  # plain JSON types, as reread
                         "n_rows": 0, "n_sequences": 0, "complete": False, "shards": []})
        self.manifest = manifest

        self._files.prepare()
        if self._files.exists(MANIFEST):
            old = _read_manifest(self._files)
            self._check_same(old)
            for key in ("n_rows", "n_sequences", "complete", "shards"):
                manifest[key] = old[key]
            self._check_listed_shards()
        self._discard_unlisted()
        if not self._files.exists(MANIFEST):
            self._write_manifest()
        self._reset_pending()
        # Main-thread counters; the manifest's own counters move only when a shard is on disk.
        self._seqs_added = manifest["n_sequences"]
        self._rows_added = manifest["n_rows"]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-store")
        self._in_flight: Future | None = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------- state for the harvester
    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def sequences_done(self) -> int:
        """Sequences committed to disk: a resumed harvest skips this many packed windows."""
        return self.manifest["n_sequences"]

    @property
    def rows_done(self) -> int:
        """Rows committed to disk."""
        return self.manifest["n_rows"]

    @property
    def n_rows(self) -> int:
        """Rows added so far, whether on disk yet or not."""
        return self._rows_added

    @property
    def full(self) -> bool:
        return self.max_rows is not None and self.n_rows >= self.max_rows

    # ---------------------------------------------------------------------------------- writing
    def add(self, tokens: torch.Tensor, keep: torch.Tensor, acts: dict[str, torch.Tensor]) -> int:
        """Buffer a batch of whole sequences; returns how many were taken (fewer once ``full``).

        tokens: int [B, T] (T = context_size); keep: bool [B, T], True where a row is stored;
        acts: {hook: [B, T, d]} on any device (only the kept rows are moved to the CPU).
        """
        if self.complete:
            raise StoreError(f"{self.directory}: store is complete; nothing more can be added")
        n, t = tokens.shape
        if t != self.context_size or keep.shape != tokens.shape:
            raise ValueError(f"tokens and keep must be [B, {self.context_size}], got "
                             f"{tuple(tokens.shape)} and {tuple(keep.shape)}")
        if sorted(acts) != sorted(self.hooks):
            raise ValueError(f"acts must have exactly the hooks {self.hooks}, got {sorted(acts)}")
        for hook, a in acts.items():
            if tuple(a.shape) != (n, t, self.d_model):
                raise ValueError(f"acts[{hook!r}] must be [{n}, {t}, {self.d_model}], got {tuple(a.shape)}")
        if self.full:
            return 0
        keep = keep.to("cpu", torch.bool)
        if self.max_rows is not None:
            n, keep = self._cap(keep)
        start = 0
        while start < n:
            stop = min(n, start + self.shard_sequences - self._pending_seqs)
            self._buffer(tokens[start:stop], keep[start:stop],
                         {h: a[start:stop] for h, a in acts.items()})
            start = stop
            if self._pending_seqs == self.shard_sequences:
                self._flush(complete=False)
        return n

    def finish(self) -> None:
        """Write the last (partial) shard and mark the store complete."""
        if not self.complete:
            self._flush(complete=True)
        self.close()

    def close(self) -> None:
        """Wait until every submitted shard is on disk; buffered sequences of an unfinished shard are
        dropped (a resumed harvest produces them again)."""
        self._wait()
        self._pool.shutdown(wait=True)

    def _cap(self, keep: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Cut the batch where the store reaches max_rows, dropping surplus rows of the last sequence."""
        cum = self.n_rows + keep.sum(1).cumsum(0)
        if len(cum) == 0 or cum[-1] < self.max_rows:
            return len(keep), keep
        last = int(torch.searchsorted(cum, torch.tensor(self.max_rows)))
        keep = keep[: last + 1].clone()
        surplus = int(cum[last]) - self.max_rows
        if surplus:
            positions = keep[last].nonzero().squeeze(1)
            keep[last, positions[len(positions) - surplus:]] = False
        return last + 1, keep

    def _reset_pending(self) -> None:
        names = ["tokens", "seq_index", "row_seq", "row_pos", "row_token"] + [f"acts.{h}" for h in self.hooks]
        self._pending: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._pending_seqs = 0
        self._pending_rows = 0

    def _buffer(self, tokens, keep, acts) -> None:
        first = self._seqs_added
        tokens = tokens.to("cpu")
        seq_in_batch, pos = keep.nonzero(as_tuple=True)
        p = self._pending
        p["tokens"].append(tokens.to(torch.int32))
        p["seq_index"].append(torch.arange(first, first + len(tokens), dtype=torch.int64))
        p["row_seq"].append(seq_in_batch + first)
        p["row_pos"].append(pos.to(torch.int32))
        p["row_token"].append(tokens[seq_in_batch, pos].to(torch.int32))
        for hook, a in acts.items():
            # Select and cast on the activations' own device, so only kept rows, already in the store
            # dtype, cross to the CPU.
            p[f"acts.{hook}"].append(a[keep.to(a.device)].to(self.dtype).cpu())
        self._pending_seqs += len(tokens)
        self._pending_rows += len(pos)
        self._seqs_added += len(tokens)
        self._rows_added += len(pos)

    def _flush(self, complete: bool) -> None:
        """Hand the buffered sequences (possibly none) to the writer thread as the next shard."""
        tensors = None
        if self._pending_seqs:
            tensors = {name: torch.cat(parts).contiguous() for name, parts in self._pending.items()}
        job = (tensors, self._pending_seqs, self._pending_rows, complete)
        self._reset_pending()
        self._wait()  # the previous shard goes to disk first: keeps the order, bounds the memory
        self._in_flight = self._pool.submit(self._commit, *job)

    def _wait(self) -> None:
        if self._in_flight is not None:
            job, self._in_flight = self._in_flight, None
            job.result()  # re-raises an error from the writer thread here

    def _commit(self, tensors, n_seq: int, n_rows: int, complete: bool) -> None:
        """Writer thread: the shard file first, then the manifest that lists it."""
        m = self.manifest
        if n_seq:
            data = safetensors.torch.save(tensors, metadata={"format": "pt"})
            index = len(m["shards"])
            self._files.write(shard_name(index), data)
            m["shards"].append({
                "file": shard_name(index), "n_rows": n_rows, "n_sequences": n_seq,
                "first_sequence": m["n_sequences"], "first_row": m["n_rows"],
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            m["n_rows"] += n_rows
            m["n_sequences"] += n_seq
        m["complete"] = complete
        self._write_manifest()

    def _write_manifest(self) -> None:
        self._files.write(MANIFEST, json_text(self.manifest, indent=1))

    # ------------------------------------------------------------------------------------ resume
    @staticmethod
    def _identity(manifest: dict) -> dict:
        """What must match for a resume: everything but the counters, the
        shard list, the saekit version and the config keys that do not change the content."""
        skip = {"n_rows", "n_sequences", "complete", "shards", "saekit_version", "config"}
        config = {k: v for k, v in manifest.get("config", {}).items() if k not in IGNORED_CONFIG_KEYS}
        return {**{k: v for k, v in manifest.items() if k not in skip}, "config": config}

    def _check_same(self, old: dict) -> None:
        diffs = [f"  {key}: {was!r} (in store) != {now!r} (now)"
                 for key, was, now in config_diff(self._identity(old), self._identity(self.manifest))]
        if diffs:
            raise StoreMismatchError(
                f"{self.directory} holds a store made with a different configuration; use another "
                f"directory or delete this one to start over. Differences:\n" + "\n".join(diffs))

    def _check_listed_shards(self) -> None:
        """Every listed shard is there, whole and unaltered (sha256, streamed) before anything is added:
        a resume never extends, nor marks complete, a store holding a damaged shard."""
        files = self._files
        for shard in self.manifest["shards"]:
            name, path = shard["file"], files.label(shard["file"])
            if not files.exists(name) or files.size(name) != shard["bytes"]:
                raise CorruptShardError(f"{path}: listed in the manifest but missing or truncated; the "
                                        f"store cannot be resumed (delete the directory to start over)")
            if files.sha256(name) != shard["sha256"]:
                raise CorruptShardError(f"{path}: does not match its sha256 checksum in the manifest; the "
                                        "store cannot be resumed (delete the directory to start over)")

    def _discard_unlisted(self) -> None:
        """Delete our own temp files and shards the manifest does not list (a run killed mid-write)."""
        listed = {s["file"] for s in self.manifest["shards"]}
        for name in self._files.names():
            if _OWN_TMP.fullmatch(name) or (_SHARD.fullmatch(name) and name not in listed):
                self._files.delete(name)


# ------------------------------------------------------------------------------------------- reader
class StoreReader:
    """Read a store: manifest fields, whole shards, activations by global row, token contexts.

    Every shard's sha256 is checked the first time this reader touches it (``verify=True``); a missing,
    truncated or altered file raises CorruptShardError naming it. Later reads of a checked shard use
    ``safe_open`` slices, reading only the bytes asked for.

    A remote store (an fsspec URL, ``storage_options`` for its filesystem) is read a whole shard at a
    time: fetched once, its size and sha256 checked, its tensors kept in a cache of about
    ``cache_shards`` shards (least recently used out first) that reads slice from. ``prefetch`` fetches
    the shards named next on background threads.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = True, *,
                 storage_options: dict | None = None, cache_shards: int = 4):
        self._files = _open_files(directory, storage_options)
        self.directory = self._files.where
        if not self._files.exists(MANIFEST):
            raise StoreError(f"{self.directory}: no {MANIFEST}; not an activation store")
        self.manifest = _read_manifest(self._files)
        self.verify = verify
        self._verified: set[int] = set()
        # Remote reads: shard index -> Future of its tensors, least recently used first; the shards
        # announced by prefetch() and not read yet, in order; fetch threads (made on first use).
        self.cache_shards = max(1, int(cache_shards))
        self._cache: OrderedDict[int, Future] = OrderedDict()
        self._upcoming: list[int] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        m = self.manifest
        self.hooks: list[str] = m["hooks"]
        self.d_model: int = m["d_model"]
        self.dtype: torch.dtype = DTYPES[m["dtype"]]
        self.context_size: int = m["context_size"]
        self.n_rows: int = m["n_rows"]
        self.n_sequences: int = m["n_sequences"]
        self.shards: list[dict] = m["shards"]
        # Start offsets with the total appended, so shard i covers [starts[i], starts[i+1]).
        self.row_starts = np.array([s["first_row"] for s in self.shards] + [self.n_rows], dtype=np.int64)
        self.seq_starts = np.array([s["first_sequence"] for s in self.shards] + [self.n_sequences],
                                   dtype=np.int64)

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"StoreReader({str(self.directory)!r}: {self.n_rows} rows, {self.n_sequences} sequences, "
                f"hooks={self.hooks}, d_model={self.d_model}, dtype={self.manifest['dtype']}, "
                f"{len(self.shards)} shards{'' if self.complete else ', incomplete'})")

    # -------------------------------------------------------------------------------- shards
    def shard_path(self, i: int) -> Path | str:
        """Shard ``i``'s file: a Path, or for a remote store its URL."""
        return self._files.label(self.shards[i]["file"])

    def _load_verified(self, i: int, check_sha: bool = True) -> bytes:
        path, info = self.shard_path(i), self.shards[i]
        name = info["file"]
        try:
            data = self._files.read(name)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {name} is missing ({path})") from None
        if len(data) != info["bytes"]:
            raise CorruptShardError(f"shard {name} is truncated or resized: {len(data)} bytes, "
                                    f"manifest says {info['bytes']} ({path})")
        if check_sha:
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CorruptShardError(f"shard {name} does not match its sha256 checksum ({path})")
            self._verified.add(i)
        return data

    def read_shard(self, i: int, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """All tensors of shard ``i`` (activations only for ``hooks``, default all), checksum verified."""
        wanted = set(self.hooks if hooks is None else hooks)
        self._check_hooks(wanted)
        if self._files.remote:
            tensors = {k: v.clone() for k, v in self._tensors(i).items()}  # the cache's stay unaltered
        else:
            tensors = safetensors.torch.load(self._load_verified(i))
        return {k: v for k, v in tensors.items() if not k.startswith("acts.") or k[5:] in wanted}

    def shard_tensor(self, i: int, name: str, start: int | None = None, stop: int | None = None):
        """Rows ``start:stop`` of tensor ``name`` (e.g. ``acts.<hook>``, ``row_seq``) of shard ``i``."""
        if self._files.remote:  # a copy: callers may change it in place, the cache's stays as verified
            return self._tensors(i)[name][start:stop].clone()
        if self.verify and i not in self._verified:
            self._load_verified(i)
        path = self.shard_path(i)
        if not path.exists():
            raise CorruptShardError(f"shard {path.name} is missing ({path})")
        with safe_open(path, "pt") as f:
            return f.get_slice(name)[start:stop]

    # ---------------------------------------------------------------- remote: cache and prefetch
    def prefetch(self, shard_ids) -> None:
        """The shards about to be read, in reading order (repeats allowed). A remote store fetches and
        verifies them on background threads while the cache has room, and goes on as they are read, so
        downloads overlap the caller's compute. A local store ignores it (reads are slices of files the
        OS caches)."""
        if not self._files.remote:
            return
        with self._lock:
            self._upcoming = [int(i) for i in shard_ids]
            self._schedule()

    def _tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Shard ``i``'s verified tensors, from the cache, from a prefetch in flight, or fetched here."""
        with self._lock:
            job = self._cache.get(i)
            fetch_here = job is None
            if fetch_here:
                while len(self._cache) >= self.cache_shards and self._evict(keep_upcoming=False):
                    pass
                job = self._cache[i] = Future()
            else:
                self._cache.move_to_end(i)
        if fetch_here:
            try:
                job.set_result(self._fetch(i))
            except BaseException as err:
                job.set_exception(err)
        try:
            tensors = job.result()
        except BaseException:
            with self._lock:  # not cached: a later read tries again
                if self._cache.get(i) is job:
                    del self._cache[i]
            raise
        with self._lock:
            if i in self._upcoming:
                self._upcoming.remove(i)  # its first announced read is this one
            self._schedule()
        return tensors

    def _fetch(self, i: int) -> dict[str, torch.Tensor]:
        return safetensors.torch.load(self._load_verified(i, check_sha=self.verify))

    def _schedule(self) -> None:
        """(lock held) Start fetching the upcoming shards, in order, while the cache has room or holds a
        shard no longer announced."""
        for i in dict.fromkeys(self._upcoming):
            if i in self._cache:
                continue
            if len(self._cache) >= self.cache_shards and not self._evict(keep_upcoming=True):
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(4, self.cache_shards),
                                                thread_name_prefix="saekit-fetch")
            self._cache[i] = self._pool.submit(self._fetch, i)

    def _evict(self, keep_upcoming: bool) -> bool:
        """(lock held) Drop the least recently used fetched shard (not an upcoming one, with
        ``keep_upcoming``); False when there is none to drop."""
        wanted = set(self._upcoming) if keep_upcoming else set()
        for i, job in self._cache.items():
            if job.done() and i not in wanted:
                del self._cache[i]
                return True
        return False

    def _check_hooks(self, hooks) -> None:
        unknown = set(hooks) - set(self.hooks)
        if unknown:
            raise StoreError(f"{self.directory}: hook(s) {sorted(unknown)} not in this store; it has "
                             f"{', '.join(self.hooks)}")

    # ------------------------------------------------------------------------- rows and tokens
    def _gather(self, name: str, rows) -> torch.Tensor:
        """Rows of a per-row tensor by global index: None (all), a (start, stop) pair, range, slice, or
        an index array / tensor / list."""
        if rows is None:
            rows = (0, self.n_rows)
        elif isinstance(rows, slice):
            rows = range(*rows.indices(self.n_rows))
        if isinstance(rows, range) and rows.step == 1:
            rows = (rows.start, rows.stop)
        if isinstance(rows, tuple):
            start, stop = rows
            if not 0 <= start <= stop <= self.n_rows:
                raise IndexError(f"rows {start}:{stop} outside the store's {self.n_rows} rows")
            first = int(np.searchsorted(self.row_starts, start, side="right")) - 1
            parts = []
            for i in range(max(first, 0), len(self.shards)):
                lo, hi = self.row_starts[i], self.row_starts[i + 1]
                if lo >= stop:
                    break
                if hi > start:
                    a, b = int(max(start, lo) - lo), int(min(stop, hi) - lo)
                    parts.append(self.shard_tensor(i, name, a, b))
            if not parts:
                return self._empty(name)
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row index outside the store's {self.n_rows} rows")
        shard_of = np.searchsorted(self.row_starts, rows, side="right") - 1
        out = None
        for i in np.unique(shard_of):
            where = np.nonzero(shard_of == i)[0]
            local = rows[where] - self.row_starts[i]
            lo, hi = int(local.min()), int(local.max()) + 1  # one slice read per shard touched
            chunk = self.shard_tensor(int(i), name, lo, hi)[torch.from_numpy(local - lo)]
            if out is None:
                out = chunk.new_empty((len(rows),) + tuple(chunk.shape[1:]))
            out[torch.from_numpy(where)] = chunk
        return self._empty(name) if out is None else out

    def _empty(self, name: str) -> torch.Tensor:
        if name.startswith("acts."):
            return torch.empty(0, self.d_model, dtype=self.dtype)
        return torch.empty(0, dtype=torch.int64 if name == "row_seq" else torch.int32)

    def activations(self, hook: str, rows=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[n, d] activations of ``hook`` for global ``rows`` (see ``_gather``), in the store dtype
        unless ``dtype`` is given."""
        self._check_hooks([hook])
        acts = self._gather(f"acts.{hook}", rows)
        return acts if dtype is None else acts.to(dtype)

    def token_info(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence index, position, token id) of each global row, as int64 tensors."""
        return tuple(self._gather(name, rows).to(torch.int64) for name in ("row_seq", "row_pos", "row_token"))

    def sequence(self, seq: int) -> torch.Tensor:
        """The full window (int64 [context_size], specials included) of global sequence ``seq``."""
        if not 0 <= seq < self.n_sequences:
            raise IndexError(f"sequence {seq} outside the store's {self.n_sequences} sequences")
        i = int(np.searchsorted(self.seq_starts, seq, side="right")) - 1
        local = int(seq - self.seq_starts[i])
        return self.shard_tensor(i, "tokens", local, local + 1)[0].to(torch.int64)

    def context(self, seq: int, pos: int, left: int = 8, right: int = 8) -> tuple[list[int], int]:
        """Token ids around position ``pos`` of sequence ``seq`` (clipped to the window), and the index
        of ``pos`` inside that list."""
        window = self.sequence(int(seq))
        lo = max(0, int(pos) - left)
        return window[lo: int(pos) + right + 1].tolist(), int(pos) - lo
