"""Many SAEs from one pass over the data: train_many, sweep files, resume, and runs dealt to ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saekit.cli import main as cli_main
from saekit.config import load_train_configs
from saekit.errors import ConfigError
from saekit.training import train
from saekit.training import trainer as trainer_module
from saekit.training.trainer import train_many

ROOT = Path(__file__).resolve().parents[1]
RESID, MLP_IN, MLP_OUT = "blocks.0.hook_resid_post", "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"


def _load_check_script():
    from support import load_train_check

    return load_train_check()


tc = _load_check_script()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def toy_kind():
    tc.register()  # the toy family draws input-dropout noise every step: runs must keep their own RNG
    yield
    tc.unregister()


@pytest.fixture
def store(tmp_path):
    """A real on-disk store with three hooks of the same rows (the MLP output a function of its input)."""
    from saekit.data.store import StoreWriter

    ctx, d = 16, 8
    g = torch.Generator().manual_seed(0)
    resid = torch.randn(40, ctx, d, generator=g) + 2.0
    mlp_in = torch.randn(40, ctx, d, generator=g)
    mlp_out = torch.tanh(mlp_in @ torch.randn(d, d, generator=g))
    keep = torch.rand(40, ctx, generator=g) > 0.25
    writer = StoreWriter(tmp_path / "store", {"model": "synthetic", "context_size": ctx}, {},
                         [RESID, MLP_IN, MLP_OUT], d, "float32", shard_sequences=4)
    for s in range(0, 40, 8):
        acts = {RESID: resid[s:s + 8], MLP_IN: mlp_in[s:s + 8], MLP_OUT: mlp_out[s:s + 8]}
        writer.add(torch.zeros(8, ctx, dtype=torch.long), keep[s:s + 8], acts)
    writer.finish()
    return tmp_path / "store"


def configs(root: Path, store: Path, checkpoint_every: int = 256):
    """Four runs of one pass: two kinds on one hook, another hook with its own lr and budget, and a
    transcoder reading two hooks."""
    def cfg(name, kind, hook=RESID, target=None, **over):
        c = tc.toy_config(root / name, total_tokens=over.pop("total_tokens", 1024), batch=32,
                          checkpoint_every=checkpoint_every, kind=kind, n_latents=32, **over)
        c.data.store, c.data.hook, c.data.target_hook = str(store), hook, target
        c.data.heldout_tokens, c.data.buffer_tokens = 64, 128  # several fills and epochs
        return c

    return [cfg("toy", tc.TOY_KIND), cfg("topk", "topk"),
            cfg("topk_mlp", "topk", hook=MLP_IN, lr=1e-3, total_tokens=768),
            cfg("transcoder", "transcoder", hook=MLP_IN, target=MLP_OUT)]


def assert_same_runs(a: Path, b: Path) -> None:
    for name in ("model/model.safetensors", "checkpoint/optimizer.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"{a.name} {name}: {key}"
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["tokens"] == mb["tokens"] and ma["step"] == mb["step"] and ma["loss"] == mb["loss"]


def test_one_pass_equals_separate_runs_and_skips_finished_ones(tmp_path, store):
    separate = [train(c) for c in configs(tmp_path / "separate", store)]
    together = train_many(configs(tmp_path / "together", store))
    assert [p.name for p in together] == ["toy", "topk", "topk_mlp", "transcoder"]
    for a, b in zip(separate, together):
        assert_same_runs(a, b)
    assert json.loads((together[2] / "metrics.json").read_text())["tokens"] == 768  # its own budget
    # A rerun trains nothing; a run added to the list trains alone and equals its separate run.
    stamps = {p: (p / "metrics.json").stat().st_mtime_ns for p in together}
    extra = tc.toy_config(tmp_path / "together" / "relu", total_tokens=512, batch=32, kind="relu", n_latents=32)
    extra.data = configs(tmp_path, store)[0].data
    *_, added = train_many([*configs(tmp_path / "together", store), extra])
    assert stamps == {p: (p / "metrics.json").stat().st_mtime_ns for p in together}
    extra.out = str(tmp_path / "relu_alone")
    assert_same_runs(train(extra), added)


def test_kill_between_two_runs_checkpoints_resumes_exactly(tmp_path, store, monkeypatch):
    full = train_many(configs(tmp_path / "full", store))
    real_save = trainer_module.Trainer._save_checkpoint

    def crash_in_second_runs_save(self):
        if self.run_dir.name == "topk" and self.step == 16:  # toy has written step 16, topk has not
            raise KeyboardInterrupt
        real_save(self)

    monkeypatch.setattr(trainer_module.Trainer, "_save_checkpoint", crash_in_second_runs_save)
    with pytest.raises(KeyboardInterrupt):
        train_many(configs(tmp_path / "cut", store))
    monkeypatch.setattr(trainer_module.Trainer, "_save_checkpoint", real_save)
    steps = {n: json.loads((tmp_path / "cut" / n / "checkpoint" / "trainer.json").read_text())["step"]
             for n in ("toy", "topk", "topk_mlp", "transcoder")}
    assert steps == {"toy": 16, "topk": 8, "topk_mlp": 8, "transcoder": 8}  # the toy run is ahead

    real_step = trainer_module.Trainer._step

    def crash_mid_step(self, *batch):  # a second kill, inside a step, after the resume has begun
        if self.run_dir.name == "transcoder" and self.step == 13:
            raise RuntimeError("simulated crash")
        real_step(self, *batch)

    monkeypatch.setattr(trainer_module.Trainer, "_step", crash_mid_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_many(configs(tmp_path / "cut", store))
    monkeypatch.setattr(trainer_module.Trainer, "_step", real_step)
    resumed = train_many(configs(tmp_path / "cut", store))
    for a, b in zip(full, resumed):
        assert_same_runs(a, b)


def test_shared_data_keys_must_agree(tmp_path, store):
    cfgs = configs(tmp_path, store)
    cfgs[1].data.batch_tokens = 64
    with pytest.raises(ConfigError, match=r"'data.batch_tokens' differs .*topk: 64"):
        train_many(cfgs)
    cfgs = configs(tmp_path, store)
    cfgs[1].out = cfgs[0].out
    with pytest.raises(ConfigError, match="config key 'out'.*own"):
        train_many(cfgs)
    cfgs = configs(tmp_path, store)
    cfgs[1].data.hook = "blocks.9.hook_resid_post"
    with pytest.raises(ConfigError, match="'blocks.9.hook_resid_post' is not in this store"):
        train_many(cfgs)
    assert not (tmp_path / "toy" / "checkpoint").exists()


def sweep_yaml(path: Path, store: Path, out: Path, **extra) -> Path:
    doc = {"out": str(out), "total_tokens": 512, "progress": False, "device": "cpu", "log_every_steps": 4,
           "lr": 3e-3, "checkpoint_every_tokens": 256,
           "data": {"store": str(store), "hook": RESID, "batch_tokens": 32, "buffer_tokens": 128,
                    "heldout_tokens": 64},
           "model": {"n_latents": 32},
           "models": [{"name": "topk", "model": {"kind": "topk"}, "sweep": {"model.k": [2, 4]}},
                      {"name": "relu", "model": {"kind": "relu"}, "data": {"hook": MLP_IN}}], **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sweep_file_expands_and_trains_from_the_cli(tmp_path, store, capsys):
    path = sweep_yaml(tmp_path / "sweep.yaml", store, tmp_path / "runs")
    runs = load_train_configs(path, {"total_tokens": "256"})
    assert [n for n, _ in runs] == ["topk-k2", "topk-k4", "relu"]
    assert [c.out for _, c in runs] == [str(tmp_path / "runs" / n) for n in ("topk-k2", "topk-k4", "relu")]
    assert [c.model.k for _, c in runs[:2]] == [2, 4] and runs[2][1].data.hook == MLP_IN
    assert all(c.total_tokens == 256 for _, c in runs)  # the command line wins over every entry
    assert cli_main(["train", str(path), "--total_tokens", "256"]) == 0
    assert capsys.readouterr().out.count("run: ") == 3
    for name in ("topk-k2", "topk-k4", "relu"):
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        assert metrics["tokens"] == 256
    assert json.loads((tmp_path / "runs" / "topk-k2" / "metrics.json").read_text())["l0"] <= 2
    # What torchrun launches reads the same file the same way.
    from saekit.training.__main__ import main as training_main
    assert training_main([str(path), "--total_tokens", "256", "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.count("run: ") == 3
    for name in ("topk-k2", "topk-k4", "relu"):
        assert_same_runs(tmp_path / "runs" / name, tmp_path / "again" / name)

    bad = sweep_yaml(tmp_path / "bad.yaml", store, tmp_path / "bad",
                     models=[{"model": {"kind": "topk"}}, {"model": {"kind": "relu"}, "data": {"batch_tokens": 64}}])
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'data.batch_tokens' differs" in err
    typo = sweep_yaml(tmp_path / "typo.yaml", store, tmp_path / "typo", models=[{"model": {"kind": "topk", "kk": 3}}])
    with pytest.raises(ConfigError, match=r"models\[0\] \(topk\).*did you mean 'k'"):
        load_train_configs(typo)


def test_two_ranks_train_their_share_like_one_process(tmp_path, store):
    """torchrun, 2 gloo processes: run i trains on rank i % 2 from whole batches; each equals the same
    run trained alone in one process."""
    path = sweep_yaml(tmp_path / "sweep.yaml", store, tmp_path / "ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, "-m", "saekit.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, cfg in load_train_configs(path, {"out": str(tmp_path / "alone")}):
        alone = train(cfg)
        a = load_file(str(alone / "model" / "model.safetensors"))
        b = load_file(str(tmp_path / "ranks" / name / "model" / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), f"{name}: {key}"
        meta = json.loads((tmp_path / "ranks" / name / "checkpoint" / "trainer.json").read_text())
        assert meta["world_size"] == 1 and meta["tokens"] == 512  # whole batches, no data split


def test_a_diverged_run_stops_alone(tmp_path, store, monkeypatch):
    """A run whose loss turns non-finite stops (its last checkpoint kept); the others of the pass finish."""
    real_step = trainer_module.Trainer._step

    def diverge(self, *batch):
        if self.run_dir.name == "topk" and self.step == 5:
            raise trainer_module.NonFiniteLossError("non-finite loss at step 5")
        real_step(self, *batch)

    monkeypatch.setattr(trainer_module.Trainer, "_step", diverge)
    cfgs = configs(tmp_path / "pass", store)[:3]
    with pytest.raises(trainer_module.NonFiniteLossError, match=r"1 of 3 runs .*topk: non-finite loss at step 5"):
        train_many(cfgs)
    assert not (tmp_path / "pass" / "topk" / "metrics.json").exists()
    assert all((tmp_path / "pass" / n / "metrics.json").exists() for n in ("toy", "topk_mlp"))
