"""Shuffled float32 training batches from an activation store, read ahead on a background thread.

How an epoch is laid out (all of it fixed by ``seed``, ``epoch`` and the store, never by timing):

* The rows this loader owns are a list of *pieces*: for every shard, its rows inside ``row_range``,
  split into ``world_size`` contiguous parts of (nearly) equal size, of which rank ``r`` owns part
  ``r``. Ranks are disjoint, together cover the range, and stay balanced to a row per shard; each rank
  reads only its own slices of every shard.
* Each epoch permutes the pieces (seed, epoch) and concatenates them into one virtual row stream, cut
  into *fills* of ``buffer_tokens`` rows (rounded up to whole batches). A fill spans several shards; its
  rows are shuffled (seed, epoch, fill) and served as batches. A piece cut by a fill boundary continues
  in the next fill, so no rows are lost; only the tail of an epoch that does not fill a batch is dropped
  (``drop_last=True``) or served as one short batch (``drop_last=False``).
* So every batch is a function of (epoch, batch number): ``state_dict()`` holds just those, and a
  resumed loader reads only the fill it restarts in.
* With ``target_hook`` (transcoders) every fill is read for both hooks over the same rows and shuffled
  by the same permutation, so a batch is a pair (input, target) whose row i comes from one store row.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .store import StoreError, StoreReader

_END = object()


def _each(fn, batch):
    """``fn`` applied to a batch: one tensor, or each tensor of an (input, target) pair."""
    return tuple(fn(t) for t in batch) if isinstance(batch, tuple) else fn(batch)


def check_layout(state: dict, layout: dict, what: str) -> None:
    """A saved position means the same batches only under the same layout (seed, sizes, ranks, ...):
    a ValueError naming every setting that differs."""
    diffs = [f"{k}: {state.get(k)!r} (saved) != {v!r} (now)" for k, v in layout.items() if state.get(k) != v]
    if diffs:
        raise ValueError(f"{what} state was saved with a different batch order: " + "; ".join(diffs))


class ActivationLoader:
    """Iterate float32 ``[batch_size, d]`` batches of ``hook`` forever, or for ``epochs`` epochs; with
    ``target_hook``, pairs ``(x [batch_size, d], y [batch_size, d_target])`` of the same store rows.

    ``loader.epoch`` counts completed epochs (it is the epoch the next batch comes from).
    ``row_range=(start, stop)`` restricts the loader to those global rows, e.g. to hold out the last
    rows for evaluation; shards outside the range are never opened. With ``device`` set to a CUDA
    device, batches are pinned on the reading thread in the store's dtype and copied on a side stream
    one batch ahead (``_DeviceFeed``), then widened to float32 on the GPU.
    """

    def __init__(self, store: str | os.PathLike | StoreReader, hook: str, batch_size: int,
                 buffer_tokens: int = 262_144, seed: int = 0, rank: int = 0, world_size: int = 1,
                 prefetch: int = 4, row_range: tuple[int, int] | None = None, drop_last: bool = True,
                 device: str | torch.device | None = None, epochs: int | None = None,
                 target_hook: str | None = None):
        self.store = store if isinstance(store, StoreReader) else StoreReader(store)
        for name, key in ((hook, "data.hook"), (target_hook, "data.target_hook")):
            if name is not None and name not in self.store.hooks:
                raise StoreError(f"{self.store.directory}: hook {name!r} is not in this store; it has "
                                 f"{', '.join(self.store.hooks)} (set {key})")
        self.target_hook = target_hook
        self.hooks = [hook] if target_hook is None else [hook, target_hook]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.hook, self.batch_size, self.seed = hook, int(batch_size), int(seed)
        self.rank, self.world_size, self.prefetch = rank, world_size, max(1, int(prefetch))
        self.drop_last, self.epochs = drop_last, epochs
        start, stop = row_range if row_range is not None else (0, self.store.n_rows)
        if not 0 <= start <= stop <= self.store.n_rows:
            raise ValueError(f"row_range {row_range} outside the store's {self.store.n_rows} rows")
        self.row_range = (int(start), int(stop))
        self.pieces = self._own_pieces(start, stop)
        self.sizes = self.pieces[:, 2] - self.pieces[:, 1]
        self.n_rows = int(self.sizes.sum())
        self.fill_rows = max(1, math.ceil(buffer_tokens / self.batch_size)) * self.batch_size
        if self.batches_per_epoch == 0:
            raise StoreError(f"{self.store.directory}: {self.n_rows} rows (rank {rank} of {world_size}) make no "
                             f"batch of {self.batch_size}; use a smaller batch or drop_last=False")
        self.device = torch.device(device) if device is not None else None
        self._pin = self.device is not None and self.device.type == "cuda"  # pinned host batches
        self._feed = self._pin  # ... in the store dtype, through the one-ahead _DeviceFeed
        self.epoch = 0
        self._batch = 0  # batches of `epoch` already handed out

    def _own_pieces(self, start: int, stop: int) -> np.ndarray:
        """[n, 3] int64 rows of (shard, local start, local stop) owned by this rank."""
        out = []
        for i, first in enumerate(self.store.row_starts[:-1]):
            lo = max(start, int(first)) - first
            hi = min(stop, int(self.store.row_starts[i + 1])) - first
            if hi <= lo:
                continue
            n = hi - lo
            a = lo + n * self.rank // self.world_size
            b = lo + n * (self.rank + 1) // self.world_size
            if b > a:
                out.append((i, a, b))
        return np.array(out, dtype=np.int64).reshape(-1, 3)

    @property
    def batches_per_epoch(self) -> int:
        full, tail = divmod(self.n_rows, self.batch_size)
        return full + int(bool(tail) and not self.drop_last)

    # ------------------------------------------------------------------------------ resume
    def _layout(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "fill_rows": self.fill_rows,
                "rank": self.rank, "world_size": self.world_size, "row_range": list(self.row_range),
                "drop_last": self.drop_last, "n_rows": self.n_rows, "target_hook": self.target_hook}

    def state_dict(self) -> dict:
        """Position of the next batch plus the settings that fix the batch order."""
        return {"epoch": self.epoch, "batch": self._batch, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state, self._layout(), "loader")
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])

    # ---------------------------------------------------------------------------- producing
    def _read_fill(self, order: np.ndarray, offsets: np.ndarray, fill: int) -> list[torch.Tensor]:
        """Rows [fill * fill_rows, ...) of the epoch's row stream, in the store dtype: one tensor per
        hook of ``self.hooks``, the same rows in the same order.

        First tells the store which shards this fill and the next one read, in reading order (each hook
        reads them all), so a remote store fetches them in the background while compute goes on."""
        lo, mid, hi = (min(self.n_rows, k * self.fill_rows) for k in (fill, fill + 1, fill + 2))
        # Pieces [first, end) hold the rows of this fill, [first, last) those of this fill and the next.
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        end, last = (int(np.searchsorted(offsets, x, side="left")) for x in (mid, hi))
        this, both = self.pieces[order[first:end], 0].tolist(), self.pieces[order[first:last], 0].tolist()
        self.store.prefetch(this * (len(self.hooks) - 1) + both)  # each hook reads this fill's shards
        return [self._read_hook_fill(order, offsets, fill, hook) for hook in self.hooks]

    def _read_hook_fill(self, order: np.ndarray, offsets: np.ndarray, fill: int, hook: str) -> torch.Tensor:
        lo, hi = fill * self.fill_rows, min(self.n_rows, (fill + 1) * self.fill_rows)
        parts = []
        for j in range(int(np.searchsorted(offsets, lo, side="right")) - 1, len(order)):
            if offsets[j] >= hi:
                break
            shard, a, _ = self.pieces[order[j]]
            skip = max(lo - offsets[j], 0)
            take = min(hi, offsets[j + 1]) - offsets[j]
            parts.append(self.store.shard_tensor(int(shard), f"acts.{hook}",
                                                 int(a + skip), int(a + take)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _epoch_batches(self, epoch: int, first_batch: int):
        """Yield (batch number, batch) of ``epoch`` from ``first_batch`` on: float32, or for a GPU the
        store's dtype (fewer bytes over PCIe; widened on the device)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
        offsets = np.concatenate([[0], np.cumsum(self.sizes[order])])
        bs = self.batch_size
        per_fill = self.fill_rows // bs
        n_fills = math.ceil(self.n_rows / self.fill_rows)

        # One worker reads the next fill while the current one is being served.
        with ThreadPoolExecutor(max_workers=1) as pool:
            def read_ahead(fill):
                return pool.submit(self._read_fill, order, offsets, fill) if fill < n_fills else None

            fill = first_batch // per_fill
            ahead = read_ahead(fill)
            while ahead is not None:
                bufs = ahead.result()
                ahead = read_ahead(fill + 1)
                n = len(bufs[0])
                perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, fill]).permutation(n))
                n_batches = n // bs if self.drop_last else math.ceil(n / bs)
                for k in range(max(first_batch - fill * per_fill, 0), n_batches):
                    rows = perm[k * bs:(k + 1) * bs]
                    batch = tuple(self._gather(buf, rows) for buf in bufs)
                    yield fill * per_fill + k, batch[0] if len(batch) == 1 else batch
                fill += 1

    def _gather(self, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # For a GPU, gather straight into pinned memory: one host copy instead of two.
        out = torch.empty((len(rows), buf.shape[1]), dtype=buf.dtype, pin_memory=True) if self._pin else None
        x = torch.index_select(buf, 0, rows, out=out)
        return x if self._feed else x.float()

    def _hand_out(self, epoch: int, k: int, x):
        # The position moves only when a batch is handed out, so state_dict() ignores read-ahead.
        self.epoch, self._batch = epoch, k + 1
        if self._batch >= self.batches_per_epoch:
            self.epoch, self._batch = epoch + 1, 0
        if self.device is not None:  # a no-op for a batch the feed already put there
            x = _each(lambda t: t.to(self.device, non_blocking=True), x)
        return x

    def _produce(self, q: queue.Queue, stop: threading.Event, epoch: int, batch: int) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            while self.epochs is None or epoch < self.epochs:
                for k, x in self._epoch_batches(epoch, batch):
                    if not put((epoch, k, x)):
                        return
                epoch, batch = epoch + 1, 0
            put(_END)
        except BaseException as e:  # surfaced in the consuming thread
            put(e)

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop, self.epoch, self._batch),
                                  daemon=True, name="saekit-loader")
        thread.start()
        feed = _DeviceFeed(self.device) if self._feed else None
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    last = feed.flush() if feed is not None else None
                    if last is not None:
                        yield self._hand_out(*last)
                    return
                if feed is not None:  # hand out the batch before, whose copy ran during its step
                    item = feed.push(item)
                    if item is None:  # the first batch: its copy has just started
                        continue
                yield self._hand_out(*item)
        finally:
            stop.set()
            thread.join()


class _DeviceFeed:
    """Host-to-device copies on a side CUDA stream, one batch ahead.

    A non_blocking copy issued on the compute stream still waits behind the step before it, so the GPU
    would alternate copy, step, copy, step (at d 768, batch 4096 the fp32 copy is ~12 MB, a large part
    of a ~2 ms step). Here batch i+1 crosses PCIe while batch i computes; the compute stream waits on
    the copy's event only when it takes the batch. ``push`` starts a copy and returns the previous
    batch (None for the first); ``flush``, at the end of the data, returns the last one (or None)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending = None

    def push(self, item):
        epoch, k, x_host = item
        previous, self.pending = self.pending, (epoch, k, *self._start_copy(x_host))
        return self._hand_over(previous)

    def flush(self):
        previous, self.pending = self.pending, None
        return self._hand_over(previous)

    def _hand_over(self, pending):
        if pending is None:
            return None
        epoch, k, x, done = pending
        return epoch, k, self._wait(x, done)

    def _start_copy(self, x_host):
        with torch.cuda.stream(self.stream):
            x = _each(lambda t: t.to(self.device, non_blocking=True).float(), x_host)
            done = torch.cuda.Event()
            done.record(self.stream)
        return x, done

    def _wait(self, x, done):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        # x was allocated on the side stream; it is used (and freed) here
        _each(lambda t: t.record_stream(compute), x)
        return x
