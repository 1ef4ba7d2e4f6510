"""Stage 1: run a language model over text and write the activations at its hook points to a store.

The harvest is a pure function of its config: the same config always yields the same packed windows in
the same order, and shard boundaries depend only on sequence counts, so a run killed at any moment and
started again skips the windows already on disk and ends with exactly the store an uninterrupted run
writes. Disk writes run on a background thread so the forward pass never waits on I/O.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from contextlib import ExitStack
from pathlib import Path

import torch

from saekit.config import HarvestConfig, resolve_device
from saekit.errors import UserError
from saekit.files import directory_lock
from saekit.data.store import StoreWriter, store_location
from saekit.data.text import corpus_id, texts_of
from saekit.data.tokens import iter_windows, kept_positions
from saekit.lm import open_capture

# Keys that do not change what is written, so they may differ when resuming a store.
_NOT_FINGERPRINTED = ("out", "progress")


def fingerprint(cfg: HarvestConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}


def _batches(windows, batch_size):
    while batch := list(itertools.islice(windows, batch_size)):
        yield torch.stack(batch)


class _BackgroundWriter:
    """Feeds StoreWriter.add from a thread; re-raises its errors in the caller."""

    def __init__(self, writer: StoreWriter, depth: int = 4):
        self.writer, self.queue, self.error = writer, queue.Queue(depth), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.add(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self.error = err

    def put(self, *item):
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Harvester:
    """Loads the model and opens (or resumes) the store; ``run()`` fills it."""

    def __init__(self, cfg: HarvestConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.lm, self.capture = open_capture(cfg)  # validates hook names first
        if next(self.texts(), None) is None:  # refuse before a store directory exists
            raise UserError(f"dataset {cfg.dataset!r} holds no text (no non-empty document); nothing to harvest")
        # From here on this process writes cfg.out: hold its lock until run() ends.
        self._lock = ExitStack()
        if isinstance(store_location(cfg.out), Path):  # object storage has no lock: one harvest per URL
            self._lock.enter_context(directory_lock(cfg.out, "harvest"))
        try:
            self.writer = self._open_store(self.lm)
        except BaseException:
            self._lock.close()
            raise

    def _open_store(self, lm) -> StoreWriter:
        cfg = self.cfg
        meta = {"model": cfg.model, "revision": cfg.revision, "architecture": lm.architecture,
                "tokenizer": getattr(lm.tokenizer, "name_or_path", cfg.model), "corpus": corpus_id(cfg.dataset)}
        return StoreWriter(cfg.out, meta=meta, config=fingerprint(cfg), hooks=cfg.hooks, d_model=lm.d_model,
                           dtype=cfg.dtype, shard_sequences=cfg.shard_sequences, tokenizer=lm.tokenizer,
                           context_size=cfg.context_size, keep_special_tokens=cfg.keep_special_tokens,
                           max_rows=cfg.max_tokens)

    def texts(self):
        return texts_of(self.cfg)

    def windows(self):
        """The packed token windows still to harvest, in order (resume skips those on disk)."""
        windows = iter_windows(self.lm.tokenizer, self.texts(), self.cfg.context_size)
        return itertools.islice(windows, self.writer.sequences_done, None)

    def run(self) -> Path | str:
        with self._lock:
            return self._run()

    def _run(self) -> Path | str:
        cfg, writer = self.cfg, self.writer
        if writer.complete:
            return store_location(cfg.out)
        bar = _progress(cfg, writer.rows_done)
        background = _BackgroundWriter(writer)
        rows = writer.rows_done
        try:
            for tokens in _batches(self.windows(), cfg.batch_sequences):
                if rows >= cfg.max_tokens:
                    break
                keep = kept_positions(self.lm.tokenizer, tokens, cfg.keep_special_tokens)
                acts = self.capture(tokens.to(self.device), torch.ones_like(tokens, device=self.device))
                # Left on the model's device: the writer moves only the kept rows, already cast.
                background.put(tokens, keep, acts)
                n_new = min(int(keep.sum()), cfg.max_tokens - rows)  # the writer trims the last batch
                rows += n_new
                bar.update(n_new)
            else:  # the text ran out before max_tokens: end the bar at what was written
                bar.total = rows
                bar.refresh()
        finally:
            background.close()
            bar.close()
            self.capture.close()
        if rows == 0:  # never mark an empty store complete: training would fail later, misleadingly
            raise UserError(f"{cfg.out}: the text gave no activation rows (every token is a special token, "
                            "or the documents are too short); check the dataset, or keep_special_tokens: true")
        writer.finish()
        return store_location(cfg.out)


def harvest(cfg: HarvestConfig) -> Path | str:
    """Write (or finish writing) the store ``cfg.out``; returns its path."""
    return Harvester(cfg).run()


def _progress(cfg: HarvestConfig, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_tokens, initial=done, unit="tok", unit_scale=True, disable=not cfg.progress,
                desc="harvest", smoothing=0.1)
