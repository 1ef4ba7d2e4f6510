"""The training data as a stream of batches whose position can be saved and restored.

Any iterable of [B, d] tensors works (for a transcoder: of (input [B, d], target [B, d_target]) pairs,
rows aligned). A source that also has ``state_dict()`` / ``load_state_dict()``
(the store's ActivationLoader, or your own) resumes exactly; any other iterable restarts from wherever
it happens to be, which the trainer warns about.
"""
from __future__ import annotations

import warnings
from collections import deque

import torch
from torch import Tensor

from saekit.config import TrainConfig
from saekit.errors import ConfigError


class BatchStream:
    def __init__(self, source):
        self.source = source
        self.resumable = callable(getattr(source, "state_dict", None)) and callable(
            getattr(source, "load_state_dict", None))
        self._it = None
        # Batches already pulled (e.g. for the initialization sample) but not yet trained on, each
        # with the source's state right after it, so a checkpoint records the position of training.
        self._pending: deque[tuple[Tensor, dict | None]] = deque()
        self._state: dict | None = None  # state after the last batch handed out, if it was pending

    def _iter(self):
        if self._it is None:
            self._it = iter(self.source)
        return self._it

    def _pull(self) -> Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]:
        batch = next(self._iter())
        if isinstance(batch, dict) and all(isinstance(t, Tensor) and t.ndim == 2 for t in batch.values()):
            return batch  # several hooks of the same rows (HookBatches)
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
                isinstance(t, Tensor) and t.ndim == 2 for t in batch) and len(batch[0]) == len(batch[1]):
            return tuple(batch)
        if not isinstance(batch, Tensor) or batch.ndim != 2:
            got = (f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, Tensor)
                   else type(batch).__name__)
            raise TypeError(f"training data must yield [batch, d] tensors (or, for a transcoder, pairs of "
                            f"[batch, d] input and target tensors), got {got} (to train on one big [N, d] "
                            "tensor, pass x.split(batch_size))")
        return batch

    def peek(self, n_batches: int) -> list:
        """The next ``n_batches`` (fewer if the source ends), still to be trained on afterwards."""
        while len(self._pending) < n_batches:
            try:
                batch = self._pull()
            except StopIteration:
                break
            self._pending.append((batch, self.source.state_dict() if self.resumable else None))
        return [b for b, _ in list(self._pending)[:n_batches]]

    def __iter__(self):
        return self

    def __next__(self):
        if self._pending:
            batch, self._state = self._pending.popleft()
            return batch
        self._state = None
        return self._pull()

    def state_dict(self) -> dict | None:
        if not self.resumable:
            return None
        return self._state if self._state is not None else self.source.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is None or not self.resumable:
            warnings.warn("the training data is a plain iterable without state_dict()/load_state_dict(): "
                          "the resumed run cannot restore its data position and continues with whatever "
                          "the iterable yields next", stacklevel=2)
            return
        self.source.load_state_dict(state)


def open_store(cfg: TrainConfig, rank: int, world_size: int, device=None, hooks: list[str] | None = None):
    """The store's shuffling loader for this rank: batch_tokens is global, split evenly over ranks.
    With ``hooks`` (several runs of one pass), a HookBatches reading all of them for the same rows."""
    data = cfg.data
    if data.batch_tokens % world_size:
        raise ConfigError(f"config key 'data.batch_tokens' ({data.batch_tokens}) is not divisible by the world "
                          f"size {world_size}")
    if data.source == "model":  # no store: captured from the model as training runs
        from saekit.training.model_source import open_model_source

        return open_model_source(cfg, rank, world_size, device, hooks=hooks)
    from saekit.data.loader import ActivationLoader
    from saekit.data.store import StoreReader, split_rows

    store = StoreReader(data.store)
    if data.heldout_tokens >= store.n_rows:
        raise ConfigError(f"config key 'data.heldout_tokens' ({data.heldout_tokens}) leaves no training rows "
                          f"(the store has {store.n_rows})")
    row_range, _ = split_rows(store.n_rows, data.heldout_tokens)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    loader = ActivationLoader(store, hooks[0] if hooks else data.hook, data.batch_tokens // world_size,
                              buffer_tokens=data.buffer_tokens, seed=data.seed, rank=rank,
                              world_size=world_size, prefetch=data.prefetch_batches, row_range=row_range,
                              device=device if on_gpu else None,  # pinned, non-blocking copies
                              target_hook=None if hooks else data.target_hook)
    return HookBatches(loader, hooks) if hooks else loader


def union_hooks(datas) -> list[str]:
    """Every hook (and target hook) the runs of one pass read, in first-use order."""
    hooks = [h for data in datas for h in (data.hook, data.target_hook) if h is not None]
    return list(dict.fromkeys(hooks))


class HookBatches:
    """Batches ``{hook: [B, d]}`` of several hooks of the same store rows: the loader reads every hook
    of ``hooks`` for each fill and shuffles them with one permutation (as it does for a transcoder's
    pair), so each run of a pass sees exactly the batches it would see alone."""

    def __init__(self, loader, hooks: list[str]):
        missing = [h for h in hooks if h not in loader.store.hooks]
        if missing:
            raise ConfigError(f"{loader.store.directory}: hook {missing[0]!r} is not in this store; it has "
                              f"{', '.join(loader.store.hooks)} (set data.hook / data.target_hook)")
        loader.hooks = list(hooks)
        self.loader, self.hooks = loader, list(hooks)

    def __iter__(self):
        for batch in self.loader:
            yield dict(zip(self.hooks, batch if isinstance(batch, tuple) else (batch,)))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        # The batch order does not depend on the hooks read, so a position saved by a run alone (with its
        # own target_hook) is a position here too.
        self.loader.load_state_dict({**state, "target_hook": self.loader.target_hook})
