"""Every registered autoencoder kind trains through the one trainer, saves, loads, and resumes exactly."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.autoencoders import REGISTRY, Autoencoder
from saekit.training import train
from saekit.training import trainer as trainer_module
from support import load_train_check

ROOT = Path(__file__).resolve().parents[1]
tc = load_train_check()

KINDS = sorted(k for k in REGISTRY if "test" not in k)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, kind):
    closed_form = REGISTRY[kind].model.closed_form
    n_latents = 8 if closed_form else 32  # PCA: at most d_in components
    cfg = tc.toy_config(out, total_tokens=1024, batch=64, checkpoint_every=512, n_latents=n_latents,
                        kind=kind)  # 16 steps
    cfg.lr = 1e-3
    return cfg, closed_form


def data(kind):
    """The toy batches; (input, target) pairs for the families that predict a target (transcoders)."""
    source = tc.SyntheticBatches(batch=64)
    return tc.PairedBatches(source) if REGISTRY[kind].model.predicts_target else source


@pytest.mark.parametrize("kind", KINDS)
def test_kind_trains_saves_and_resumes(tmp_path, kind, monkeypatch):
    cfg, closed_form = config(tmp_path / "full", kind)
    out = train(cfg, data=data(kind))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens"] == 1024 and math.isfinite(metrics["fvu"]) and math.isfinite(metrics["l0"])
    model = Autoencoder.load(out / "model").eval()
    with torch.no_grad():
        x_hat = model(tc.SyntheticBatches(batch=64).global_batch(99)).x_hat
    assert x_hat.shape == (64, 16) and torch.isfinite(x_hat).all()
    if closed_form:
        assert metrics["closed_form"] and not (out / "checkpoint").exists()
        return

    assert_resumes_exactly(tmp_path, kind, out, monkeypatch)


def assert_resumes_exactly(tmp_path, kind, out, monkeypatch):
    """Crash in step 11 (after the checkpoint at step 8), resume: bit-identical to the full run ``out``."""
    cfg, _ = crash_after_first_checkpoint(tmp_path, monkeypatch, kind)
    resumed = train(cfg, data=data(kind))
    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (out, resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def crash_after_first_checkpoint(tmp_path, monkeypatch, kind="topk"):
    """A run killed in step 11, after its checkpoint at step 8: (config, run dir)."""
    real_step = trainer_module.Trainer._step

    def crash(self, *batch):
        if self.step == 10:
            raise RuntimeError("simulated crash")
        real_step(self, *batch)

    cfg, _ = config(tmp_path / "run", kind)
    monkeypatch.setattr(trainer_module.Trainer, "_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, data=data(kind))
    monkeypatch.setattr(trainer_module.Trainer, "_step", real_step)
    return cfg, tmp_path / "run"


@pytest.mark.parametrize("name", ["model/model.safetensors", "model/config.json", "optimizer.safetensors",
                                  "optimizer.json", "trainer.safetensors"])
def test_a_damaged_checkpoint_is_named_and_kept(tmp_path, monkeypatch, name):
    """trainer.json lists the sha256 of every other checkpoint file; a resume checks each file before
    it reads it, and one flipped byte anywhere is a one-line error naming the file (nothing rewritten)."""
    from saekit.files import sha256_file
    from saekit.training.checkpoint import DamagedCheckpointError

    cfg, run = crash_after_first_checkpoint(tmp_path, monkeypatch)
    ckpt = run / "checkpoint"
    files = json.loads((ckpt / "trainer.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"trainer.json"}
    assert all(sha256_file(ckpt / n) == sha for n, sha in files.items())

    path = ckpt / name
    data_bytes = bytearray(path.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01
    path.write_bytes(bytes(data_bytes))
    with pytest.raises(DamagedCheckpointError) as err:
        train(cfg, data=data("topk"))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "delete" in message
    assert path.read_bytes() == bytes(data_bytes) and not (run / "model").exists()


@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
def test_resume_takes_the_same_dense_or_sparse_path(tmp_path, kind, monkeypatch):
    """ReLU and JumpReLU choose the dense or the sparse step from the previous step's density, and the
    two differ in float rounding; the choice is checkpointed (step_state). With the crossover at 0.999
    the first step runs dense and every later one sparse, so a resume that forgot the state would run
    step 9 dense and end with other weights."""
    from saekit.autoencoders import sae

    monkeypatch.setattr(sae, "SPARSE_MAX_DENSITY", 0.999)
    cfg, _ = config(tmp_path / "full", kind)
    out = train(cfg, data=data(kind))
    state = load_file(str(out / "checkpoint" / "trainer.safetensors"))
    assert float(state["step_state.0.pattern_density"]) < 0.999  # the last steps ran sparse
    assert_resumes_exactly(tmp_path, kind, out, monkeypatch)


@pytest.mark.parametrize("variant", ["compile", "triton"])
def test_topk_trains_alike_compiled_and_on_triton_kernels(tmp_path, variant):
    """The trainer's optional torch.compile, and the triton backend of the sparse products (interpreted
    on CPU), train the TopK SAE to the same weights as the eager torch backend, AuxK included (a short
    dead window marks latents dead within the run)."""
    if variant == "triton":
        pytest.importorskip("triton")
    runs = {}
    for name in ("eager", variant):
        cfg, _ = config(tmp_path / name, "topk")
        # 8 steps (Triton's CPU interpreter takes seconds a step), AuxK from the third
        cfg.checkpoint_every_tokens, cfg.dead_after_tokens, cfg.model.n_latents = 0, 128, 256
        cfg.total_tokens = 512
        if name == "compile":
            cfg.compile = True
        if name == "triton":
            cfg.kernels.backend = "triton"
        out = train(cfg, data=tc.SyntheticBatches(batch=64))
        assert json.loads((out / "metrics.json").read_text())["loss/auxk"] > 0  # AuxK ran
        runs[name] = load_file(str(out / "model" / "model.safetensors"))
    for key, want in runs["eager"].items():
        torch.testing.assert_close(runs[variant][key], want, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("adam", ["torch", "layout"])
def test_loaded_optimizer_state_takes_the_parameter_layout_fused_adam_needs(tmp_path, adam):
    """An SAE's W_enc is a transposed view ([n, d] memory). Fused Adam pairs a parameter, its gradient
    and its moments in memory order, so moments loaded from a checkpoint (contiguous in the file) must
    take the parameter's strides: then steps after a save/load equal the uninterrupted ones exactly
    (torch's Adam and the trainer's LayoutAdam alike)."""
    from saekit.training import checkpoint
    from saekit.training.optimizer import LayoutAdam

    Adam = LayoutAdam if adam == "layout" else torch.optim.Adam

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(32, 16, generator=generator)
    grads = [torch.randn(16, 32, generator=generator) for _ in range(6)]

    def stepped(param, optimizer, steps):
        for i in steps:
            param.grad = None
            (param * grads[i]).sum().backward()  # the gradient arrives through autograd, as in training
            optimizer.step()

    full = torch.nn.Parameter(start.T.clone())  # strides (1, 16), like W_enc
    opt = Adam([full], lr=0.1, fused=True)
    stepped(full, opt, range(3))
    checkpoint.save_optimizer(tmp_path, opt)
    saved = full.detach().clone()
    stepped(full, opt, range(3, 6))

    resumed = torch.nn.Parameter(start.T.clone())
    with torch.no_grad():
        resumed.copy_(saved)  # what load_state_dict does: values into the fresh model's layout
    opt2 = Adam([resumed], lr=0.1, fused=True)
    checkpoint.load_optimizer(tmp_path, opt2)
    assert opt2.state[resumed]["exp_avg"].stride() == resumed.stride()
    stepped(resumed, opt2, range(3, 6))
    assert torch.equal(resumed.detach(), full.detach())


@pytest.mark.parametrize("fused", [True, False])
def test_layout_adam_steps_a_transposed_parameter_exactly_as_adam_steps_its_contiguous_copy(fused):
    """The trainer's LayoutAdam hands the kernel a transposed parameter (W_enc) as its contiguous
    transpose, with its gradient and moments: the update must be bit-identical to torch's Adam on a
    contiguous copy, moments included, and agree with Adam written out in float64."""
    from saekit.training.optimizer import LayoutAdam

    g = torch.Generator().manual_seed(0)
    start = torch.randn(24, 8, generator=g)  # [n, d] memory
    grads = [torch.randn(8, 24, generator=g) for _ in range(5)]
    view = torch.nn.Parameter(start.T.clone())  # [d, n], strides (1, 8)
    plain = torch.nn.Parameter(start.T.contiguous())
    opts = [LayoutAdam([view], lr=0.05, fused=fused), torch.optim.Adam([plain], lr=0.05, fused=fused)]
    m = v = torch.zeros(8, 24, dtype=torch.float64)
    ref = start.T.double()
    for t, grad in enumerate(grads, 1):
        for param, opt in zip((view, plain), opts):
            param.grad = grad.clone().T.contiguous().T if param is view else grad.clone()
            opt.step()
        m, v = 0.9 * m + 0.1 * grad.double(), 0.999 * v + 0.001 * grad.double() ** 2
        ref = ref - 0.05 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    assert view.stride() == (1, 8) and torch.equal(view.detach(), plain.detach())
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opts[0].state[view][name], opts[1].state[plain][name])
    torch.testing.assert_close(view.detach().double(), ref, rtol=1e-5, atol=1e-6)
