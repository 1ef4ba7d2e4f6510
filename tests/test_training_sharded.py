"""Latent-sharded TopK: two gloo CPU processes, each holding half the latents, equal one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.autoencoders.base import Autoencoder
from saekit.autoencoders.batchtopk import BatchTopKConfig, BatchTopKSAE
from saekit.autoencoders.topk import TopKConfig, TopKSAE
from saekit.errors import ConfigError
from saekit.files import sha256_file
from saekit.training.distributed import Dist
from saekit.training.sharded import ShardedTopK

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sharded_check.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd: list[str], timeout: int) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_rank_sharded_topk_matches_single_process(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    _run([sys.executable, str(SCRIPT), "--out", str(single)], timeout=120)
    _run([*TORCHRUN, str(SCRIPT), "--out", str(sharded)], timeout=180)

    # Step 0: the same global top k (ids and values) and the same reconstruction.
    a, b = load_file(str(single / "step0.safetensors")), load_file(str(sharded / "step0.safetensors"))
    assert (a["values"] > 0).all(), "the check wants every selected value positive (no padding ids)"
    assert torch.equal(a["indices"], b["indices"])
    assert torch.allclose(a["values"], b["values"], rtol=1e-6, atol=1e-6)
    assert torch.allclose(a["x_hat"], b["x_hat"], rtol=1e-5, atol=1e-5)

    # Every step's loss parts (AuxK included, dead latents on both, one or no shard) and global grad norm.
    ta, tb = load_file(str(single / "trace.safetensors")), load_file(str(sharded / "trace.safetensors"))
    assert (ta["losses"][:, 1] > 0).sum() >= 3, "AuxK must have run on several steps"
    assert (ta["norms"] > 12.0).any() and (ta["norms"] < 12.0).any(), "clipping must bite on some steps only"
    assert torch.allclose(ta["losses"], tb["losses"], rtol=1e-5, atol=1e-5)
    assert torch.allclose(ta["norms"], tb["norms"], rtol=1e-5, atol=1e-5)

    # After 6 Adam steps the gathered model (saved by rank 0 as a normal TopK model) matches.
    pa = load_file(str(single / "model" / "model.safetensors"))
    pb = load_file(str(sharded / "model" / "model.safetensors"))
    assert pa.keys() == pb.keys()
    start = TopKSAE(16, TopKConfig(n_latents=64, k=4))  # they moved: the comparison is not vacuous
    for key in pa:
        assert torch.allclose(pa[key], pb[key], rtol=1e-5, atol=1e-6), key
        if key in ("W_enc", "W_dec"):
            assert not torch.allclose(pa[key], start.state_dict()[key], atol=1e-3)
    assert isinstance(Autoencoder.load(sharded / "model"), TopKSAE)
    shutil.rmtree(tmp_path)


def test_shard_needs_latents_divisible_by_ranks():
    model = TopKSAE(8, TopKConfig(n_latents=64, k=4))
    with pytest.raises(ConfigError) as err:
        ShardedTopK.from_full(model, Dist(rank=0, world_size=3))
    message = str(err.value)
    assert "\n" not in message and "n_latents is 64" in message and "multiple of 3" in message
    with pytest.raises(ConfigError, match="multiple of 5"):
        ShardedTopK.from_config(8, TopKConfig(n_latents=64, k=4), Dist(rank=1, world_size=5))
    with pytest.raises(ConfigError, match="'topk' only"):
        ShardedTopK.from_full(BatchTopKSAE(8, BatchTopKConfig(n_latents=64, k=4)), Dist(rank=0, world_size=2))


def test_shard_holds_its_slice():
    model = TopKSAE(8, TopKConfig(n_latents=64, k=4))
    shard = ShardedTopK.from_full(model, Dist(rank=1, world_size=4))
    assert (shard.lo, shard.hi) == (16, 32) and shard.n_latents == 64
    assert torch.equal(shard.W_enc, model.W_enc[:, 16:32]) and torch.equal(shard.W_dec, model.W_dec[16:32])
    assert torch.equal(shard.b_enc, model.b_enc[16:32]) and torch.equal(shard.b_dec, model.b_dec)
    assert shard.W_enc.is_contiguous()


TRAIN_CHECK = ROOT / "scripts" / "train_check.py"
# 16 steps of 64 tokens, checkpoints every 8 steps; TopK k 4 of 48 latents, some of them dead (AuxK).
TRAIN_ARGS = ["--kind", "topk", "--batch", "64", "--total-tokens", "1024", "--checkpoint-every", "512"]


def _train(out: Path, *extra: str, sharded: bool = True, ok: bool = True) -> None:
    """train_check.py with TRAIN_ARGS, then ``extra`` (later flags win)."""
    cmd = [*TORCHRUN, str(TRAIN_CHECK), "--shard-latents"] if sharded else [sys.executable, str(TRAIN_CHECK)]
    done = subprocess.run([*cmd, "--out", str(out), *TRAIN_ARGS, *extra], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode == 0) == ok, done.stderr[-3000:]


def test_saekit_train_with_shard_latents_matches_one_process_and_resumes(tmp_path):
    """The trainer with shard_latents under torchrun (2 gloo ranks, each half the latents, both reading
    every batch) ends where one process ends, saves a plain TopK model, and a run killed after its first
    checkpoint resumes (each rank reloading the whole model's slice and its own Adam state) to the same
    weights as the uninterrupted sharded run."""
    # Long enough that batches are fetched after the init sample (the first 64): the resumed run is
    # killed when batch 70 is fetched, after a checkpoint and before the end (80 steps).
    longer = ["--batch", "256", "--total-tokens", "20480", "--checkpoint-every", "2560"]
    single, sharded, resumed = tmp_path / "single", tmp_path / "sharded", tmp_path / "resumed"
    _train(single, *longer, sharded=False)
    _train(sharded, *longer)
    ckpt = sharded / "checkpoint"
    files = json.loads((ckpt / "trainer.json").read_text())["files"]  # each rank wrote and hashed its own
    for name in ("optimizer.rank0.safetensors", "optimizer.rank1.safetensors", "optimizer.rank1.json"):
        assert files[name] == sha256_file(ckpt / name), name
    a = load_file(str(single / "model" / "model.safetensors"))
    b = load_file(str(sharded / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # same up to float summation order (the decode summed over ranks, the clip norm)
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    assert type(Autoencoder.load(sharded / "model")) is TopKSAE

    _train(resumed, *longer, "--kill-at-batch", "70", ok=False)
    assert not (resumed / "model").exists()
    assert 0 < json.loads((resumed / "checkpoint" / "trainer.json").read_text())["step"] < 80
    _train(resumed, *longer)
    c = load_file(str(resumed / "model" / "model.safetensors"))
    for key in b:
        assert torch.equal(b[key], c[key]), key
