"""The trainer in one process: run-dir layout, schedules, init, config checks, inf/nan, W&B readback."""
import dataclasses
import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.autoencoders import Autoencoder
from saekit.autoencoders.base import register as register_family
from saekit.errors import ConfigError, UserError
from saekit.training import NonFiniteLossError, default_lr, train
from saekit.training import trainer as trainer_module
from saekit.training.data_stats import geometric_median, input_scale
from saekit.training.dead_latents import DeadTracker
from saekit.training.optimizer import param_groups
from saekit.training.schedule import base_lr, lr_factor, sparsity_scale

ROOT = Path(__file__).resolve().parents[1]


def _load_check_script():
    from support import load_train_check

    return load_train_check()


tc = _load_check_script()


@pytest.fixture(autouse=True)
def toy_kind():
    """Register the toy model only while a test runs, so other tests' REGISTRY loops never see it."""
    tc.register()
    yield
    tc.unregister()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- pieces
def test_default_lr_and_schedules():
    assert default_lr(16384) == pytest.approx(6e-4)
    assert default_lr(4 * 16384) == pytest.approx(3e-4)
    cfg = tc.toy_config("unused", total_tokens=1000)
    cfg.lr_warmup_tokens, cfg.lr_decay_start_fraction, cfg.sparsity_warmup_tokens = 100, 0.8, 400
    assert lr_factor(50, cfg) == pytest.approx(0.5)
    assert lr_factor(500, cfg) == 1.0
    assert lr_factor(900, cfg) == pytest.approx(0.5)
    assert lr_factor(1000, cfg) == 0.0
    assert sparsity_scale(100, cfg) == pytest.approx(0.25) and sparsity_scale(800, cfg) == 1.0
    cfg.lr = None
    assert base_lr(cfg) == pytest.approx(default_lr(cfg.model.n_latents))


def test_param_groups_carry_the_model_lr_scales():
    from saekit.autoencoders import build
    from saekit.autoencoders import AutoencoderConfig

    model = build(AutoencoderConfig.for_kind("jumprelu", n_latents=16, threshold_lr_scale=10.0), 8)
    groups = param_groups(model)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scales[id(model.log_threshold)] == 10.0 and scales[id(model.W_enc)] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    topk = build(AutoencoderConfig.for_kind("topk", n_latents=16, k=2), 8)
    assert [g["lr_scale"] for g in param_groups(topk)] == [1.0]


def test_input_scale_and_geometric_median():
    x = torch.randn(4000, 8) * 7 + 3
    s = input_scale(x)
    assert (s * x).square().sum(-1).mean().item() == pytest.approx(8.0, rel=1e-6)
    # the median of a cloud with a far outlier stays with the cloud; the mean does not
    pts = torch.cat([torch.randn(99, 2) * 0.01, torch.tensor([[1000.0, 1000.0]])])
    assert geometric_median(pts).norm() < 0.1 < pts.mean(0).norm()
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert torch.allclose(geometric_median(square), torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_dead_tracker():
    t = DeadTracker(3)
    t.update(torch.tensor([1, 0, 0]), 100)
    t.update(torch.tensor([0, 2, 0]), 100)
    assert t.idle.tolist() == [100, 0, 200]
    assert t.dead_mask(150).tolist() == [False, False, True]
    assert t.dead_fraction(1000) == pytest.approx(1 / 3)  # window capped at the 200 tokens seen
    assert t.dead_fraction(100) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ a run
def test_run_dir_layout_and_outputs(tmp_path):
    cfg = tc.toy_config(tmp_path / "run", total_tokens=2048, checkpoint_every=512)
    data = tc.SyntheticBatches(batch=64)
    out = train(cfg, data=data)
    assert out == tmp_path / "run"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [".saekit.lock", "checkpoint/model/config.json", "checkpoint/model/model.safetensors",
                     "checkpoint/optimizer.json", "checkpoint/optimizer.safetensors",
                     "checkpoint/trainer.json", "checkpoint/trainer.safetensors", "config.json",
                     "loss.png", "metrics.json", "model/config.json", "model/model.safetensors"]
    assert json.loads((out / "config.json").read_text())["total_tokens"] == 2048

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "loss/mse", "loss/l1", "fvu", "mse", "l0", "dead_fraction", "dense_fraction",
                "cosine", "lr", "tokens_per_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["tokens"] == 2048 and metrics["step"] == 32

    model = Autoencoder.load(out / "model")
    sample = torch.cat([data.global_batch(i) for i in range(32)])  # init sample: min(16384, total)
    scaled = (model.input_scale * sample).square().sum(-1).mean().item()
    assert scaled == pytest.approx(16.0, rel=1e-4)  # E‖s·x‖² = d_in

    trainer = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert trainer["step"] == 32 and trainer["tokens"] == 2048 and trainer["data_state"] == [{"i": 32}]
    opt = json.loads((out / "checkpoint" / "optimizer.json").read_text())
    assert opt["param_groups"][0]["betas"] == [0.9, 0.999]
    opt_tensors = load_file(str(out / "checkpoint" / "optimizer.safetensors"))
    assert {k.split(".", 2)[2] for k in opt_tensors} == {"step", "exp_avg", "exp_avg_sq"}
    state = load_file(str(out / "checkpoint" / "trainer.safetensors"))
    assert state["rng_cpu.0"].dtype == torch.uint8 and state["history"].shape == (16, 5)
    loss = state["history"][:, 2]
    assert loss[-1] < 0.5 * loss[0] and loss[-1].item() == pytest.approx(metrics["loss"])  # it learns

    # finished: a rerun (display-only keys may change) does nothing
    stamp = (out / "metrics.json").stat().st_mtime_ns
    cfg.progress = True
    train(cfg, data=tc.SyntheticBatches(batch=64))
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_different_config_is_refused_naming_keys(tmp_path):
    cfg = tc.toy_config(tmp_path / "run", total_tokens=256)
    train(cfg, data=tc.SyntheticBatches(batch=64))
    cfg.total_tokens, cfg.model.n_latents = 512, 32
    with pytest.raises(ConfigError, match=r"model\.n_latents.*total_tokens"):
        train(cfg, data=tc.SyntheticBatches(batch=64))


def test_sparse_output_and_mean_bias_init(tmp_path):
    """A model returning the sparse (indices, values) form trains and logs like a dense one."""

    class SparseToy(tc.ToyReLU):
        def forward(self, x):
            out = super().forward(x)
            values, indices = out.code.topk(4, dim=-1)
            out.code, out.indices, out.values = None, indices, values
            return out

    @dataclasses.dataclass
    class SparseToyConfig(tc.ToyConfig):
        pass

    register_family("sparse_toy_test", SparseToyConfig)(SparseToy)
    try:
        cfg = tc.toy_config(tmp_path / "run", total_tokens=512, b_dec_init="mean")
        cfg.model = SparseToyConfig(n_latents=cfg.model.n_latents)
        out = train(cfg, data=tc.SyntheticBatches(batch=64))
        assert json.loads((out / "metrics.json").read_text())["l0"] <= 4
    finally:
        tc.REGISTRY.pop("sparse_toy_test", None)


@pytest.mark.parametrize("bad_batch", [9, 11])
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, bad_batch):
    # keep the bad batch out of the initialization sample (that case is the next test)
    monkeypatch.setattr(trainer_module, "INIT_SAMPLE_TOKENS", 128)
    cfg = tc.toy_config(tmp_path / "run", total_tokens=2048, checkpoint_every=256)  # every 4 steps
    with pytest.raises(NonFiniteLossError, match=rf"step {bad_batch + 1} .*mse="):
        train(cfg, data=tc.SyntheticBatches(batch=64, bad_at=bad_batch))
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 8  # not 12, even for bad step 12
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model" / "model.safetensors")).values())
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoint.tmp").exists()

    # resuming from a plain list cannot restore the data position: it warns, then finishes
    clean = [tc.SyntheticBatches(batch=64, seed=1).global_batch(i) for i in range(24)]
    with pytest.warns(UserWarning, match="cannot restore its data position"):
        train(cfg, data=clean)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tokens"] == 2048


def test_non_finite_init_sample_is_an_error(tmp_path):
    with pytest.raises(UserError, match="non-finite"):
        train(tc.toy_config(tmp_path / "run", total_tokens=512), data=tc.SyntheticBatches(batch=64, bad_at=0))


# ------------------------------------------------------------------------------------- W&B readback
def read_wandb_records(path: Path) -> list:
    """Parse an offline run's .wandb file (LevelDB-style log of protobuf Records) with wandb's protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block trailer too short for a header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_wandb_history(run_dir: Path, timeout: float = 60.0) -> list[dict]:
    """Rows logged to the run's history. wandb-core may still be writing when finish() returns, so
    wait for the file's final "exit" record."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_logs_metrics_and_density_histogram(tmp_path):
    cfg = tc.toy_config(tmp_path / "run", total_tokens=1024, wandb=True, wandb_project="saekit-test")
    out = train(cfg, data=tc.SyntheticBatches(batch=64))
    rows = read_wandb_history(out)
    assert [row["_step"] for row in rows] == list(range(2, 17, 2))  # log_every = 2 steps
    last = rows[-1]
    for key in ("train/loss", "train/loss/mse", "train/loss/l1", "train/mse", "train/fvu", "train/l0",
                "train/dead_fraction", "train/lr", "train/tokens"):
        assert all(key in row for row in rows), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert last["train/loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    assert last["train/fvu"] == pytest.approx(metrics["fvu"], rel=1e-6)
    assert last["train/tokens"] == 1024
    assert last["train/feature_density._type"] == "histogram"
    counts, bins = last["train/feature_density.values"], last["train/feature_density.bins"]
    assert len(bins) == len(counts) + 1
    dead = last["train/dead_latents_in_density_window"]
    assert sum(counts) + dead == cfg.model.n_latents


# ------------------------------------------------------------------------------ the real data path
@pytest.fixture
def store(tmp_path):
    from saekit.data.store import StoreWriter

    hook, ctx, d = "blocks.0.hook_resid_post", 16, 8
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(40, ctx, d, generator=g) + 2.0
    keep = torch.rand(40, ctx, generator=g) > 0.25
    writer = StoreWriter(tmp_path / "store", {"model": "synthetic", "context_size": ctx}, {}, [hook], d,
                         "float32", shard_sequences=4)
    for s in range(0, 40, 8):
        writer.add(torch.zeros(8, ctx, dtype=torch.long), keep[s:s + 8], {hook: acts[s:s + 8]})
    writer.finish()
    return tmp_path / "store", hook


def test_store_loader_resume_after_crash_equals_uninterrupted(tmp_path, store, monkeypatch):
    """data=None reads cfg.data.store through ActivationLoader; its state_dict makes resume exact."""
    path, hook = store

    def config(out):
        cfg = tc.toy_config(out, total_tokens=1024, batch=32, checkpoint_every=256)  # 32 steps
        cfg.data.store, cfg.data.hook, cfg.data.heldout_tokens = str(path), hook, 64
        cfg.data.buffer_tokens = 128  # several fills and epochs over the ~400 training rows
        return cfg

    full = train(config(tmp_path / "full"))
    real_step = trainer_module.Trainer._step

    def crash_in_step_13(self, x):
        if self.step == 12:
            raise RuntimeError("simulated crash")
        real_step(self, x)

    monkeypatch.setattr(trainer_module.Trainer, "_step", crash_in_step_13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "resumed"))
    monkeypatch.setattr(trainer_module.Trainer, "_step", real_step)
    meta = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 8 and meta["data_state"][0]["batch"] > 0
    resumed = train(config(tmp_path / "resumed"))

    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "metrics.json").read_text())["d_in"] == 8


def test_command_line_entry_point_trains_from_store(tmp_path, store):
    """`python -m saekit.training [CONFIG] --key value` (what torchrun launches)."""
    from saekit.training.__main__ import main

    path, hook = store
    out = tmp_path / "run"
    main(["--out", str(out), "--data.store", str(path), "--data.hook", hook, "--data.batch_tokens", "32",
          "--data.buffer_tokens", "128", "--model.kind", "topk", "--model.n_latents", "32", "--model.k", "4",
          "--total_tokens", "256", "--progress", "false", "--device", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "topk" and metrics["l0"] <= 4 and metrics["d_in"] == 8
    assert Autoencoder.load(out / "model").kind == "topk"


def test_rejects_non_batch_data(tmp_path):
    with pytest.raises(TypeError, match=r"x\.split\(batch_size\)"):
        train(tc.toy_config(tmp_path / "run"), data=torch.randn(100, 16))
