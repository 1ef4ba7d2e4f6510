"""Training straight from the model (data.source: model): the captured chunks hold exactly the rows a
harvested store of the same text holds, and a crashed run resumes to bit-identical weights."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saekit.autoencoders import TopKConfig
from saekit.config import CaptureConfig, ConfigError, DataConfig, TrainConfig
from saekit.data.store import StoreReader
from saekit.schema import from_dict
from saekit.training import train
from saekit.training import trainer as trainer_module
from saekit.training.model_source import ModelSource
from support import HOOK, harvest_store, save_tiny, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT, BATCH_SEQUENCES = 32, 8  # as harvest_store harvests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_source")
    model = save_tiny("gpt2", root / "gpt2")
    return model, write_corpus(root / "corpus.txt", n_docs=60)


def capture_cfg(model, corpus, **kw) -> CaptureConfig:
    return CaptureConfig(model=str(model), dataset=str(corpus), context_size=CONTEXT,
                         batch_sequences=BATCH_SEQUENCES, device="cpu", **kw)


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    """The rows of ``x`` in lexicographic order: equal multisets give equal arrays."""
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


def test_chunks_hold_the_rows_of_a_harvested_store(tiny, tmp_path):
    model, corpus = tiny
    store = StoreReader(harvest_store(model, tmp_path / "store", corpus, max_tokens=100_000,
                                      context_size=CONTEXT))
    rows = store.activations(HOOK)
    batch, buffer = 32, 200  # chunks of 224 rows: they cut forward batches, which continue in the next
    source = ModelSource(capture_cfg(model, corpus), [HOOK], batch, buffer, seed=3)
    assert source.chunk_rows == 224 and store.n_rows > 2 * 224
    n_chunks = store.n_rows // 224  # the full chunks; the epoch's last one is shorter
    per_chunk, want = 224 // batch, n_chunks * (224 // batch) + (store.n_rows % 224) // batch
    it = iter(source)
    served = [next(it) for _ in range(want)]
    for c in range(n_chunks):
        got = torch.cat(served[c * per_chunk:(c + 1) * per_chunk])
        ref = rows[c * 224:(c + 1) * 224]
        assert not torch.equal(got, ref)  # shuffled ...
        np.testing.assert_array_equal(sorted_rows(got), sorted_rows(ref))  # ... the same rows, bit for bit
    assert source.state_dict()["epoch"] == 1  # the text ran out: the next batch starts epoch 1
    first_of_epoch_1 = next(it)
    assert source.state_dict()["epoch"] == 1 and source.state_dict()["batch"] == 1
    # Epoch 1 serves the same chunk 0 rows under another permutation.
    assert not torch.equal(first_of_epoch_1, served[0])
    assert (sorted_rows(first_of_epoch_1)[:, None] == sorted_rows(rows[:224])[None]).all(-1).any(1).all()


def test_each_rank_captures_its_own_forward_batches(tiny, tmp_path):
    """Under torchrun rank r captures forward batches r, r + W, ...: its first chunk holds exactly the
    store's rows of those windows (so the ranks' rows come from disjoint windows)."""
    model, corpus = tiny
    store = StoreReader(harvest_store(model, tmp_path / "store", corpus, max_tokens=100_000,
                                      context_size=CONTEXT))
    rows = store.activations(HOOK)
    seq, _, _ = store.token_info(torch.arange(store.n_rows))
    firsts = []
    for rank in (0, 1):
        source = ModelSource(capture_cfg(model, corpus), [HOOK], 32, 200, rank=rank, world_size=2)
        it = iter(source)
        got = torch.cat([next(it) for _ in range(7)])  # chunk 0: 224 rows
        mine = rows[(seq // BATCH_SEQUENCES) % 2 == rank][:224]
        np.testing.assert_array_equal(sorted_rows(got), sorted_rows(mine))
        firsts.append(sorted_rows(got))
    assert firsts[0].shape == firsts[1].shape and not np.array_equal(firsts[0], firsts[1])


def test_resumed_source_continues_with_the_same_batches(tiny):
    """A fresh source loaded with a mid-chunk state (the chunk starting inside a forward batch) serves
    bit-identical batches to an uninterrupted one, across a chunk boundary and an epoch boundary."""
    model, corpus = tiny
    cfg = capture_cfg(model, corpus, keep_special_tokens=True)
    whole = iter(ModelSource(cfg, [HOOK], 32, 200, seed=1))
    reference = [next(whole) for _ in range(60)]
    first = ModelSource(cfg, [HOOK], 32, 200, seed=1)
    it = iter(first)
    for _ in range(9):  # chunks of 224 rows = 7 batches: batch 9 is inside chunk 1
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert (state["chunk"], state["batch"]) == (1, 2) and state["row"] > 0
    resumed = ModelSource(cfg, [HOOK], 32, 200, seed=1)
    resumed.load_state_dict(state)
    it = iter(resumed)
    rest = [next(it) for _ in range(51)]
    assert resumed.state_dict()["epoch"] >= 1  # the comparison crossed into the second epoch
    for a, b in zip(reference[9:], rest):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="different batch order: seed"):
        ModelSource(cfg, [HOOK], 32, 200, seed=2).load_state_dict(state)


def train_cfg(out, model, corpus, **data) -> TrainConfig:
    harvest = capture_cfg(model, corpus)
    return TrainConfig(out=str(out), total_tokens=2048, checkpoint_every_tokens=512, lr=1e-3, progress=False,
                       log_every_steps=4, device="cpu", model=TopKConfig(n_latents=128, k=8),
                       data=DataConfig(source="model", harvest=harvest, hook=HOOK, batch_tokens=64,
                                       buffer_tokens=300, **data))


def test_killed_and_resumed_run_ends_bit_identical(tiny, tmp_path, monkeypatch):
    model, corpus = tiny
    full = train(train_cfg(tmp_path / "full", model, corpus))
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["tokens"] == 2048 and np.isfinite(metrics["fvu"])

    real_step = trainer_module.Trainer._step

    def crash(self, *batch):  # in step 11: after the checkpoint at step 8, inside the second chunk
        if self.step == 10:
            raise RuntimeError("simulated crash")
        real_step(self, *batch)

    cfg = train_cfg(tmp_path / "resumed", model, corpus)
    monkeypatch.setattr(trainer_module.Trainer, "_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer.json").read_text())["data_state"][0]
    assert (state["chunk"], state["batch"]) == (1, 3)  # 320-row chunks: step 8 ends in chunk 1
    monkeypatch.setattr(trainer_module.Trainer, "_step", real_step)
    resumed = train(cfg)
    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (full, resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("data, match", [
    ({"source": "model"}, r"'data.harvest' is not set, but data.source is 'model'"),
    ({"source": "model", "harvest": {"dataset": "x.txt"}}, r"'data.harvest.model' is not set"),
    ({"source": "model", "harvest": {"model": "m", "hooks": ["blocks.0.hook_resid_post"]}},
     r"'data.harvest.hooks' does not apply .* data.hook"),
    ({"source": "model", "harvest": {"model": "m", "out": "runs/x"}}, r"'data.harvest.out' does not apply"),
    ({"source": "model", "harvest": {"model": "m"}, "heldout_tokens": 100}, r"'data.heldout_tokens' \(100\)"),
    ({"harvest": {"model": "m"}}, r"'data.harvest' is set, but data.source is 'store'"),
    ({"source": "modle"}, r"did you mean 'model'"),
])
def test_bad_model_source_configs_are_refused_by_name(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, {"data": data})


def test_too_little_text_and_a_too_long_context_are_user_errors(tiny, tmp_path):
    from saekit.errors import UserError

    model, _ = tiny
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat.\n")  # not one window of 32 tokens
    source = ModelSource(capture_cfg(model, short), [HOOK], 64, 64)
    with pytest.raises(UserError, match="gives 0 activation rows, not one batch of 64"):
        next(iter(source))
    with pytest.raises(ConfigError, match=r"'data.harvest.context_size' \(128\) exceeds the model's 64"):
        ModelSource(CaptureConfig(model=str(model), dataset=str(short), context_size=128, device="cpu"),
                    [HOOK], 64, 64)
