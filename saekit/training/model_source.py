"""Training batches captured from the language model as training runs, with no store on disk
(``data.source: model`` plus ``data.harvest``), for runs whose activations would not fit on disk.

The layout mirrors the store loader's (data/loader.py); all of it is fixed by the config and seed,
never by timing:

* The text is packed into windows exactly as a harvest packs it and cut into forward batches of
  ``harvest.batch_sequences`` windows on a fixed grid. Under torchrun rank r captures forward batches
  r, r + W, r + 2W, ... of that grid: its own share, disjoint from the other ranks'.
* The rank's rows (every kept position of every window, in order: the rows a store of the same text
  holds, in its order) are cut into *chunks* of ``buffer_tokens`` rows, rounded up to whole batches.
  A forward batch cut by a chunk boundary continues in the next chunk, so no row is lost. Each chunk is
  shuffled by a permutation seeded (seed, epoch, chunk) and served as batches; the few rows of a chunk
  that do not fill a batch are dropped.
* When the text runs out a new epoch starts at its first window, with new permutations, just as the
  store loader cycles through its store: how long a run trains is ``total_tokens``'s to say, the same
  for both sources, and a run that outlasts its text repeats it rather than stopping short. The last
  chunk of an epoch holds what is left (chunks never span two epochs).
* ``state_dict()`` is (epoch, chunk, batch within the chunk) plus where the chunk starts: (forward batch,
  rows of it already used by the chunk before). ``load_state_dict`` re-tokenizes up to there and
  captures from that forward batch on: the same windows in the same forward passes, so the refilled
  chunk is bit-identical to the one the interrupted run held.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from saekit.config import CaptureConfig, TrainConfig, resolve_dtype
from saekit.data.loader import check_layout
from saekit.data.text import texts_of
from saekit.data.tokens import iter_window_batches, kept_positions
from saekit.errors import UserError
from saekit.lm import open_capture


class ModelSource:
    """Shuffled float32 ``[batch_size, d]`` batches of ``hooks[0]`` captured from the model, forever;
    with a second hook (transcoders), pairs ``(x, y)`` of the same rows; with ``as_dict`` (several runs
    of one pass), ``{hook: [batch_size, d]}`` of every hook. Resumable (see the module docstring)."""

    def __init__(self, harvest: CaptureConfig, hooks: list[str], batch_size: int, buffer_tokens: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, progress: bool = False,
                 as_dict: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.cfg, self.hooks, self.progress, self.as_dict = harvest, list(hooks), progress, as_dict
        self.lm, self.capture = open_capture(harvest, self.hooks, where="data.harvest.")
        self.dtype = resolve_dtype(harvest.dtype)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = rank, world_size
        self.chunk_rows = max(1, math.ceil(buffer_tokens / self.batch_size)) * self.batch_size
        # Position of the next batch: epoch, chunk, batch within it, and where that chunk starts.
        self.epoch = self.chunk = self.batch = 0
        self.start = (rank, 0)  # (forward batch of the grid, rows of it used by the chunk before)

    # ------------------------------------------------------------------------------ resume
    def _layout(self) -> dict:
        # Not the hooks: capturing more of them changes no row, so the order is the same.
        cfg = self.cfg
        return {"seed": self.seed, "batch_size": self.batch_size, "chunk_rows": self.chunk_rows,
                "rank": self.rank, "world_size": self.world_size,
                "batch_sequences": cfg.batch_sequences, "context_size": cfg.context_size,
                "keep_special_tokens": cfg.keep_special_tokens, "dtype": cfg.dtype}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "chunk": self.chunk, "batch": self.batch,
                "forward_batch": self.start[0], "row": self.start[1], **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state, self._layout(), "model-source")
        self.epoch, self.chunk, self.batch = int(state["epoch"]), int(state["chunk"]), int(state["batch"])
        self.start = (int(state["forward_batch"]), int(state["row"]))

    # ---------------------------------------------------------------------------- producing
    def _captured(self, first: int):
        """(forward batch, [rows of each hook]) for this rank's forward batches from ``first`` on."""
        cfg, tokenizer = self.cfg, self.lm.tokenizer
        batches = iter_window_batches(tokenizer, texts_of(cfg), cfg.context_size, cfg.batch_sequences,
                                      skip=first * cfg.batch_sequences)
        for i, tokens in enumerate(batches):
            if i % self.world_size:  # another rank's share
                continue
            keep = kept_positions(tokenizer, tokens, cfg.keep_special_tokens).to(self.lm.device)
            acts = self.capture(tokens, torch.ones_like(tokens))
            # Select and cast on the model's device, as the store writer does: the same rows, same values.
            yield first + i, [acts[hook][keep].to(self.dtype) for hook in self.hooks]

    def _chunks(self, chunk: int, start: tuple[int, int]):
        """(chunk, [rows of each hook], where the next chunk starts, or None after the epoch's last)
        from ``chunk`` on, which starts at ``start``."""
        g, used = start
        batches, rows = self._captured(g), None
        while True:
            parts, n = [], 0
            with self._bar() as bar:
                while n < self.chunk_rows:
                    if rows is None:
                        if (item := next(batches, None)) is None:
                            break
                        g, rows = item
                    take = min(len(rows[0]) - used, self.chunk_rows - n)
                    parts.append([r[used:used + take] for r in rows])
                    n, used = n + take, used + take
                    bar.update(take)
                    if used == len(rows[0]):
                        g, rows, used = g + self.world_size, None, 0
            if n == 0:
                return
            full = n == self.chunk_rows
            yield chunk, [torch.cat(p) for p in zip(*parts)], (g, used) if full else None
            if not full:
                return
            chunk += 1

    def _bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.chunk_rows, unit="tok", unit_scale=True, leave=False, desc="capture",
                    disable=not self.progress)

    def _moved_to(self, epoch: int, chunk: int, batch: int, start) -> None:
        # The position moves as a batch is handed out: state_dict() is that of training, not capture.
        self.epoch, self.chunk, self.batch, self.start = epoch, chunk, batch, start

    def __iter__(self):
        epoch, chunk, batch, start = self.epoch, self.chunk, self.batch, self.start
        while True:
            fresh, rows_seen = start == (self.rank, 0) and chunk == 0, 0
            for chunk, rows, end in self._chunks(chunk, start):
                rows_seen += len(rows[0])
                perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, chunk]).permutation(len(rows[0])))
                n_batches = len(rows[0]) // self.batch_size
                for k in range(batch, n_batches):
                    if k + 1 < n_batches:
                        self._moved_to(epoch, chunk, k + 1, start)
                    elif end is not None:
                        self._moved_to(epoch, chunk + 1, 0, end)
                    else:
                        self._moved_to(epoch + 1, 0, 0, (self.rank, 0))
                    pick = perm[k * self.batch_size:(k + 1) * self.batch_size].to(rows[0].device)
                    yield self._batch([r.index_select(0, pick).float() for r in rows])
                batch, start = 0, end
            if fresh and rows_seen < self.batch_size:  # a whole epoch without one batch: never would
                raise UserError(self._too_little_text(rows_seen))
            epoch, chunk, batch, start = epoch + 1, 0, 0, (self.rank, 0)

    def _batch(self, tensors: list[torch.Tensor]):
        if self.as_dict:
            return dict(zip(self.hooks, tensors))
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def _too_little_text(self, rows: int) -> str:
        cfg = self.cfg
        share = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        return (f"data.harvest.dataset {cfg.dataset!r} gives {rows} activation rows{share}, not one batch of "
                f"{self.batch_size}; use more text, a smaller data.batch_tokens or data.harvest.context_size, "
                "or data.harvest.keep_special_tokens: true")


def open_model_source(cfg: TrainConfig, rank: int, world_size: int, device=None,
                      hooks: list[str] | None = None) -> ModelSource:
    """This rank's ModelSource for ``cfg`` (data.source: model): batch_tokens is global, split evenly
    over ranks (open_store has checked that it divides); ``harvest.device: auto`` captures on the
    trainer's device (each rank's own GPU). With ``hooks`` (several runs of one pass), batches are
    ``{hook: tensor}`` of all of them."""
    data = cfg.data
    harvest = data.harvest
    if harvest.device == "auto" and device is not None:
        harvest = dataclasses.replace(harvest, device=str(device))
    own = [data.hook] if data.target_hook is None else [data.hook, data.target_hook]
    return ModelSource(harvest, hooks or own, data.batch_tokens // world_size, data.buffer_tokens,
                       seed=data.seed, rank=rank, world_size=world_size,
                       progress=cfg.progress and rank == 0,  # one capture bar, as one training bar
                       as_dict=bool(hooks))
