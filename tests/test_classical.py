"""The classical family: PCA, linear, nonlinear, denoising and contractive autoencoders."""
import math

import pytest
import torch

from saekit.autoencoders import AutoencoderConfig, build
from saekit.autoencoders.base import Autoencoder
from saekit.errors import UserError

CLASSICAL = ["linear", "autoencoder", "denoising", "contractive", "pca"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind: str, d: int = 8, **fields) -> Autoencoder:
    fields.setdefault("n_latents", 4)
    return build(AutoencoderConfig.for_kind(kind, **fields), d)


def correlated_gaussian(n: int, spectrum: list[float], seed: int = 0, offset: float = 0.0):
    """Rows with covariance Q diag(spectrum) Q^T for a random rotation Q, shifted by ``offset``."""
    g = torch.Generator().manual_seed(seed)
    d = len(spectrum)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor(spectrum).sqrt()
    return z @ Q.T + offset + torch.randn(d, generator=g, dtype=torch.float64)


def fitted(kind: str, x: torch.Tensor, **fields) -> Autoencoder:
    """A model of ``kind`` with non-trivial weights for x (PCA fitted, the others randomly initialized)."""
    model = make(kind, x.shape[1], **fields).to(x.dtype)
    if kind == "pca":
        model.fit_stream([x])
    else:
        model.init_from_data(x)
    return model


SPECTRUM16 = [9.0, 7.0, 5.0, 4.0, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.02]


def data_optimum(x: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """Discarded variance and top-n eigenvectors of x's population covariance, by eigh directly."""
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc / x.shape[0])
    return evals[:-n].sum().item(), evecs[:, -n:]


def largest_principal_angle_deg(A: torch.Tensor, B: torch.Tensor) -> float:
    Q1, _ = torch.linalg.qr(A)
    Q2, _ = torch.linalg.qr(B)
    cos = torch.linalg.svdvals(Q1.T @ Q2).clamp(max=1.0)
    return math.degrees(torch.arccos(cos.min()).item())


# ------------------------------------------------------------------------------------------- every kind
@pytest.mark.parametrize("kind", CLASSICAL)
def test_shapes_and_mse_definition(kind):
    x = torch.randn(32, 8)
    model = fitted(kind, x).eval()
    out = model(x)
    assert out.x_hat.shape == x.shape and out.code.shape == (32, 4)
    torch.testing.assert_close(out.code, model.encode(x))
    torch.testing.assert_close(out.x_hat, model.decode(out.code))
    mse = (model.scale_in(out.x_hat) - model.scale_in(x)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse"], mse)


@pytest.mark.parametrize("kind", CLASSICAL)
def test_save_load_round_trip(kind, tmp_path):
    x = torch.randn(16, 8) * 3 + 1
    shape = {"autoencoder": dict(hidden=[6], activation="tanh"), "denoising": dict(hidden=[6], activation="tanh"),
             "contractive": dict(activation="tanh")}.get(kind, {})
    model = fitted(kind, x, **shape)
    model.input_scale.fill_(0.37)
    model.save(tmp_path)
    loaded = Autoencoder.load(tmp_path)
    assert type(loaded) is type(model) and loaded.training  # a fresh module, in train mode like any
    model.eval(), loaded.eval()
    a, b = model(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.code, b.code)
    assert all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)


@pytest.mark.parametrize("kind", CLASSICAL)
def test_input_scale_invariance(kind):
    """Raw data scaled by c with input_scale divided by c: same code and losses, x_hat scaled by c."""
    torch.manual_seed(0)
    x, c = torch.randn(32, 8, dtype=torch.float64) + 2, 40.0
    model = fitted(kind, x).eval()
    scaled = make(kind).double().eval()
    scaled.load_state_dict(model.state_dict())
    model.input_scale.fill_(0.5)
    if kind == "pca":
        scaled.fit_stream([x * c])  # a fit on scaled data, too, must agree
    scaled.input_scale.fill_(0.5 / c)
    a, b = model(x), scaled(x * c)
    torch.testing.assert_close(b.code, a.code)
    torch.testing.assert_close(b.x_hat, a.x_hat * c)
    for part in a.losses:
        torch.testing.assert_close(b.losses[part], a.losses[part])


@pytest.mark.parametrize("kind", ["linear", "autoencoder", "denoising", "contractive"])
def test_init_from_data_sets_decoder_bias(kind):
    x = torch.randn(64, 8) + 5
    model = make(kind)
    model.input_scale.fill_(0.5)
    model.init_from_data(x)
    torch.testing.assert_close(model.b_dec.data, 0.5 * x.mean(0))
    center = torch.arange(8.0)
    model.init_from_data(x, b_dec=center)  # given in raw units
    torch.testing.assert_close(model.b_dec.data, 0.5 * center)


def test_unknown_choices_name_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'tanh'"):
        make("autoencoder", activation="tahn")
    with pytest.raises(ValueError, match="did you mean 'mask'"):
        make("denoising", noise="masks")
    with pytest.raises(ValueError, match="'hidden' does not apply to kind 'contractive'.*autoencoder, denoising"):
        make("contractive", hidden=[4])
    with pytest.raises(ValueError, match="n_latents"):
        make("pca", d=3, n_latents=4)


# -------------------------------------------------------------------------------------------------- PCA
def test_pca_streamed_fit_matches_eigh():
    x = correlated_gaussian(3000, SPECTRUM16, offset=50.0)  # a big common offset, as in residual streams
    model = make("pca", 16).double()
    assert model.closed_form and not list(model.parameters()) and not model.fitted
    model.fit_stream(x[i:i + 512].float() for i in range(0, len(x), 512))  # a generator of float32 batches
    assert model.fitted and model.n_tokens.item() == 3000
    discarded, top = data_optimum(x.float().double(), 4)
    xc = x - x.mean(0)
    ref_evals = torch.linalg.eigvalsh(xc.T @ xc / len(x)).flip(0)
    torch.testing.assert_close(model.eigenvalues, ref_evals, rtol=1e-6, atol=1e-6)
    assert model.discarded_variance() == pytest.approx(discarded, rel=1e-6)
    assert largest_principal_angle_deg(model.components, top) < 1e-3
    torch.testing.assert_close(model.components.T @ model.components, torch.eye(4, dtype=torch.float64))
    # Its reconstruction error on the fitted data is exactly the discarded variance.
    assert model(x).losses["mse"].item() == pytest.approx(discarded, rel=1e-6)


def test_pca_max_tokens_and_sign_convention():
    x = correlated_gaussian(1000, SPECTRUM16[:6]).float()
    a = make("pca", 6).fit_stream([x[:300], x[300:]], max_tokens=500)
    b = make("pca", 6).fit_stream([x[:500]])
    assert a.n_tokens.item() == 500
    torch.testing.assert_close(a.components, b.components)
    torch.testing.assert_close(a.mean, b.mean)
    with pytest.raises(UserError, match="at least 2 training rows"):
        make("pca", 6).fit_stream([])


def test_pca_eigenvalues_are_in_normalized_space():
    x = correlated_gaussian(500, SPECTRUM16[:6]).float()
    model = make("pca", 6).fit_stream([x])
    before = model.discarded_variance()
    model.input_scale.fill_(0.1)
    assert model.discarded_variance() == pytest.approx(before * 0.01, rel=1e-6)
    assert model(x).losses["mse"].item() == pytest.approx(model.discarded_variance(), rel=1e-3)


# ----------------------------------------------------------------------------------------------- linear
def test_linear_autoencoder_reaches_the_pca_optimum():
    torch.manual_seed(0)
    x = correlated_gaussian(4096, SPECTRUM16, seed=1, offset=3.0).float()
    optimum, top = data_optimum(x.double(), 4)
    model = make("linear", 16)
    model.init_from_data(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=800)
    for _ in range(800):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        mse = model(x).losses["mse"].item()
    assert optimum <= mse * (1 + 1e-5) and mse < 1.01 * optimum, (mse, optimum)
    assert largest_principal_angle_deg(model.W_dec.detach().double().T, top) < 5.0


# -------------------------------------------------------------------------------------------- nonlinear
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid"])
def test_nonlinear_depth_and_activation(activation):
    torch.manual_seed(0)
    model = make("autoencoder", 8, n_latents=3, hidden=[16, 12], activation=activation)
    assert [tuple(layer.weight.shape) for layer in model.encoder] == [(16, 8), (12, 16), (3, 12)]
    assert [tuple(layer.weight.shape) for layer in model.decoder] == [(12, 3), (16, 12), (8, 16)]
    x = torch.randn(64, 8)
    code = model.encode(x)
    if activation == "relu":
        assert (code >= 0).all()
    if activation == "sigmoid":
        assert ((code > 0) & (code < 1)).all()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(x).loss.item()
    for _ in range(30):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    assert model(x).loss.item() < first


# -------------------------------------------------------------------------------------------- denoising
@pytest.mark.parametrize("noise", ["gaussian", "mask"])
def test_denoising_corrupts_in_training_only(noise):
    torch.manual_seed(0)
    x = torch.randn(256, 8) + 1
    model = make("denoising", noise=noise, noise_level=0.3)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.code, model.encode(x))
    model.train()
    c, d = model(x), model(x)
    assert not torch.equal(c.code, d.code) and not torch.equal(c.code, a.code)
    torch.testing.assert_close(model.encode(x), a.code)  # encode is always the clean code
    # The target is the clean input, not the corrupted one.
    torch.testing.assert_close(c.losses["mse"], (c.x_hat - x).pow(2).sum(-1).mean())
    xn = model.scale_in(x)
    corrupted = model.corrupt(xn)
    if noise == "mask":
        zeroed = (corrupted == 0).float().mean().item()
        assert 0.25 < zeroed < 0.35 and torch.equal(corrupted[corrupted != 0], xn[corrupted != 0])
    else:
        assert 0.27 < (corrupted - xn).std().item() < 0.33


def test_denoising_noise_is_in_normalized_space():
    torch.manual_seed(0)
    x = 100 * torch.randn(2000, 8)
    model = make("denoising", noise="gaussian", noise_level=0.5)
    model.input_scale.fill_(0.01)
    xn = model.scale_in(x)
    assert 0.48 < (model.corrupt(xn) - xn).std().item() < 0.52


# ------------------------------------------------------------------------------------------ contractive
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "gelu"])
def test_contractive_closed_form_matches_autograd_jacobian(activation):
    torch.manual_seed(0)
    model = make("contractive", 5, n_latents=7, activation=activation, contractive_coefficient=0.3).double()
    with torch.no_grad():
        model.encoder[0].weight.mul_(3)  # leave the near-linear regime of sigmoid / tanh
        model.b_dec.normal_()
    xn = torch.randn(6, 5, dtype=torch.float64)
    closed = model.jacobian_sq_norm(xn)
    for i in range(len(xn)):
        J = torch.autograd.functional.jacobian(lambda v: model.encode_normalized(v[None])[0], xn[i])
        assert J.shape == (7, 5)
        torch.testing.assert_close(closed[i], J.pow(2).sum(), rtol=1e-10, atol=1e-12)
    out = model(model.scale_out(xn))
    torch.testing.assert_close(out.losses["contractive"], 0.3 * closed.mean())


def test_contractive_penalty_is_trained():
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    model = make("contractive", activation="sigmoid", contractive_coefficient=1.0)
    out = model(x)
    assert set(out.losses) == {"mse", "contractive"}
    out.losses["contractive"].backward()
    grad = model.encoder[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # Minimizing the penalty alone shrinks the Jacobian.
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before = model.jacobian_sq_norm(model.scale_in(x)).mean().item()
    for _ in range(20):
        opt.zero_grad()
        model(x).losses["contractive"].backward()
        opt.step()
    assert model.jacobian_sq_norm(model.scale_in(x)).mean().item() < 0.5 * before
