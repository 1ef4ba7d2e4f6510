import itertools

import pytest
import torch

from saekit.data import loader as loader_module
from saekit.data.loader import ActivationLoader
from saekit.data.store import StoreReader, StoreWriter

CTX, D, HOOK = 8, 4, "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A float16 store whose activation rows carry their own id (seq * CTX + pos) in column 0."""
    path = tmp_path_factory.mktemp("store")
    g = torch.Generator().manual_seed(0)
    n_seq = 40
    keep = torch.rand(n_seq, CTX, generator=g) > 0.25
    ids = torch.arange(n_seq * CTX, dtype=torch.float32).view(n_seq, CTX)
    acts = torch.randn(n_seq, CTX, D, generator=g)
    acts[..., 0] = ids
    meta = {"model": "synthetic", "context_size": CTX}
    w = StoreWriter(path, meta, {}, [HOOK], D, "float16", shard_sequences=4)
    for s in range(0, n_seq, 6):
        w.add(torch.zeros(min(6, n_seq - s), CTX, dtype=torch.long), keep[s:s + 6], {HOOK: acts[s:s + 6]})
    w.finish()
    return StoreReader(path)


def ids_of(batches):
    return torch.cat([b[:, 0] for b in batches]).long()


def all_ids(store, rows=None):
    return store.activations(HOOK, rows, dtype=torch.float32)[:, 0].long()


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_batches_are_float32_and_deterministic(store):
    a = take(ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=3), 40)  # spans several epochs
    b = take(ActivationLoader(store.directory, HOOK, 16, buffer_tokens=50, seed=3), 40)
    c = take(ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=4), 40)
    assert all(x.dtype == torch.float32 and x.shape == (16, D) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ids_of(a), ids_of(c))


def test_each_row_once_per_epoch(store):
    loader = ActivationLoader(store, HOOK, 16, buffer_tokens=50, drop_last=False, epochs=2)
    per_epoch = loader.batches_per_epoch
    batches = list(loader)
    assert len(batches) == 2 * per_epoch and loader.epoch == 2
    assert sum(len(b) for b in batches[:per_epoch]) == store.n_rows
    first, second = ids_of(batches[:per_epoch]), ids_of(batches[per_epoch:])
    expected = all_ids(store).sort().values
    assert torch.equal(first.sort().values, expected) and torch.equal(second.sort().values, expected)
    assert not torch.equal(first, second)  # reshuffled each epoch
    # the buffer mixes shards: the first batch holds rows of more than one shard
    assert len(set((ids_of(batches[:1]) // (4 * CTX)).tolist())) > 1


def test_ranks_disjoint_and_covering(store):
    parts = [ids_of(ActivationLoader(store, HOOK, 8, buffer_tokens=30, rank=r, world_size=3,
                                     drop_last=False, epochs=1)) for r in range(3)]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= len(store.shards)  # balanced to a row per shard
    union = torch.cat(parts)
    assert len(set(union.tolist())) == len(union) == store.n_rows


def test_resume_sees_the_same_batches(store):
    first = ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=1)
    it = iter(first)
    for _ in range(11):  # stop mid-epoch, mid-fill
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 11 // first.batches_per_epoch
    expected = [next(it) for _ in range(20)]  # runs into the next epochs
    resumed = ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=1)
    resumed.load_state_dict(state)
    got = take(resumed, 20)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    with pytest.raises(ValueError, match="batch_size"):
        ActivationLoader(store, HOOK, 8, buffer_tokens=50, seed=1).load_state_dict(state)


def test_row_range_held_out(store):
    end = store.n_rows - 37
    loader = ActivationLoader(store, HOOK, 10, buffer_tokens=40, row_range=(5, end), drop_last=False,
                              epochs=1)
    got = ids_of(list(loader)).sort().values
    assert torch.equal(got, all_ids(store, (5, end)).sort().values)
    held_out = set(all_ids(store, (end, store.n_rows)).tolist())
    assert not held_out & set(got.tolist())


class _HostFeed(loader_module._DeviceFeed):
    """The one-ahead feed with its two CUDA calls (side-stream copy, event wait) replaced by a host
    widening: what is left, and tested here, is the hand-over order, positions and end of data."""

    def _start_copy(self, x_host):
        assert x_host.dtype == torch.float16  # the store dtype crosses the bus, widened after
        return x_host.float(), None

    def _wait(self, x, done):
        return x


@pytest.mark.parametrize("epochs", [None, 2])
def test_one_ahead_device_feed_keeps_batches_positions_and_end(store, monkeypatch, epochs):
    monkeypatch.setattr(loader_module, "_DeviceFeed", _HostFeed)
    plain = ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=2, drop_last=False, epochs=epochs)
    fed = ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=2, drop_last=False, epochs=epochs)
    fed._feed, fed.device = True, torch.device("cpu")  # the CUDA path, less pinning and streams
    n = 2 * plain.batches_per_epoch if epochs else 25
    want, got = [], []
    for loader, out in ((plain, want), (fed, got)):
        for x in itertools.islice(loader, n + 5):  # with epochs set, both stop by themselves at n
            out.append((x, loader.state_dict()))
    assert len(got) == len(want) == (n if epochs else n + 5)
    for (x, s), (y, t) in zip(got, want):
        assert x.dtype == torch.float32 and torch.equal(x, y) and s == t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_matches_cpu_loader(store):
    cpu = take(ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=5), 30)
    gpu = take(ActivationLoader(store, HOOK, 16, buffer_tokens=50, seed=5, device="cuda"), 30)
    assert all(y.is_cuda and y.dtype == torch.float32 and torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu))
