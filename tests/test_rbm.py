"""RBMs checked against exact enumeration (Bernoulli) and the analytic Gaussian mixture (Gaussian)."""
import itertools
import math

import pytest
import torch

from saekit.autoencoders import build
from saekit.autoencoders.base import Autoencoder
from saekit.autoencoders import RBMConfig

PATTERNS = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 0]],
                        dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(d: int, n: int, visible: str, **fields):
    return build(RBMConfig(n_latents=n, visible=visible, **fields), d).double()


def randomize(model, scale: float = 1.0):
    with torch.no_grad():
        model.W.normal_(0, scale)
        model.b_v.normal_(0, 0.5)
        model.b_h.normal_(0, 0.5)
    return model


def states(k: int) -> torch.Tensor:
    """All 2^k binary vectors [2^k, k], the first unit the most significant bit."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)), dtype=torch.float64)


def neg_energy(model, v, h):
    """-E(v, h) for every pair of rows: [V, H], written out here independently of the model's code."""
    pair = v @ model.W @ h.T + (h @ model.b_h)[None, :]
    if model.visible == "bernoulli":
        return pair + (v @ model.b_v)[:, None]
    return pair - 0.5 * (v - model.b_v).pow(2).sum(1)[:, None]


@torch.no_grad()
def exact_log_likelihood(model, data) -> float:
    """Mean log p(v) over data, with log Z summed over all 2^d * 2^n joint states."""
    V, H = states(model.d_in), states(model.n_latents)
    log_z = neg_energy(model, V, H).logsumexp(dim=(0, 1))
    return (neg_energy(model, data, H).logsumexp(1) - log_z).mean().item()


@torch.no_grad()
def gaussian_mixture(model):
    """A Gaussian-Bernoulli RBM's p(v) is a mixture over h of N(b_v + W h, I) with weights
    proportional to exp(b_h.h + (||b_v + W h||^2 - ||b_v||^2) / 2): returns (log Z, weights, means)."""
    H = states(model.n_latents)
    mu_HD = model.b_v + H @ model.W.T
    log_w_H = H @ model.b_h + 0.5 * (mu_HD.pow(2).sum(1) - model.b_v.pow(2).sum())
    log_z = log_w_H.logsumexp(0) + 0.5 * model.d_in * math.log(2 * math.pi)
    return log_z.item(), (log_w_H - log_w_H.logsumexp(0)).exp(), mu_HD


# ------------------------------------------------------------------------------------- free energy
@pytest.mark.parametrize("visible", ["bernoulli", "gaussian"])
def test_free_energy_sums_out_the_hidden_units(visible):
    torch.manual_seed(0)
    model = randomize(make(6, 4, visible))
    v = states(6) if visible == "bernoulli" else torch.randn(20, 6, dtype=torch.float64)
    expected = -neg_energy(model, v, states(4)).logsumexp(1)
    torch.testing.assert_close(model.free_energy(v), expected)


def test_gaussian_free_energy_integrates_to_the_analytic_partition_function():
    torch.manual_seed(0)
    model = randomize(make(2, 3, "gaussian"))
    log_z, _, _ = gaussian_mixture(model)
    grid = torch.linspace(-12, 12, 1201, dtype=torch.float64)
    step = (grid[1] - grid[0]).item()
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        numeric = (-model.free_energy(points)).logsumexp(0).item() + 2 * math.log(step)
    assert numeric == pytest.approx(log_z, abs=1e-6)


# ------------------------------------------------------------------------------------------ sampling
def test_gibbs_samples_match_the_exact_distribution():
    torch.manual_seed(0)
    model = randomize(make(6, 4, "bernoulli"))
    with torch.no_grad():
        neg_e = neg_energy(model, states(6), states(4))
        p_exact = (neg_e.logsumexp(1) - neg_e.logsumexp(dim=(0, 1))).exp()
    samples = model.sample(20000, steps=100)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    index = (samples * 2 ** torch.arange(5, -1, -1, dtype=torch.float64)).sum(1).long()
    p_empirical = torch.bincount(index, minlength=64).double() / len(samples)
    assert 0.5 * (p_empirical - p_exact).abs().sum().item() < 0.05


def test_gaussian_samples_match_the_mixture_moments():
    torch.manual_seed(0)
    model = randomize(make(2, 3, "gaussian"))
    _, w_H, mu_HD = gaussian_mixture(model)
    mean_D = w_H @ mu_HD
    second_DD = torch.einsum("h,hd,he->de", w_H, mu_HD, mu_HD)
    cov_DD = torch.eye(2, dtype=torch.float64) + second_DD - torch.outer(mean_D, mean_D)
    samples = model.sample(20000, steps=100)
    torch.testing.assert_close(samples.mean(0), mean_D, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), cov_DD, atol=0.08, rtol=0)


def test_sample_from_init_in_raw_units():
    torch.manual_seed(0)
    model = make(3, 2, "gaussian")
    model.input_scale.fill_(0.01)
    init = torch.full((5, 3), 100.0)
    assert model.sample(5, steps=0, init=init).equal(init)  # zero steps: back in raw units unchanged
    assert model.sample(7, steps=3).shape == (7, 3)


# ---------------------------------------------------------------------------------------- training
def train(model, data, steps, lr, batch=None):
    """The generic trainer's step in miniature: full-batch SGD, or Adam on random minibatches."""
    if batch is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x = data if batch is None else data[torch.randint(0, len(data), (batch,))]
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()


@pytest.mark.parametrize("persistent", [False, True], ids=["cd1", "pcd"])
def test_exact_log_likelihood_rises_with_training(persistent):
    torch.manual_seed(0)
    data = PATTERNS.repeat(8, 1)
    model = make(6, 4, "bernoulli", cd_steps=1, persistent=persistent)
    model.init_from_data(data)
    lls = [exact_log_likelihood(model, data)]
    for _ in range(3):
        train(model, data, steps=100, lr=0.3)
        lls.append(exact_log_likelihood(model, data))
    assert lls[-1] > lls[0] + 1.0 and lls[2] > lls[0] + 0.3, lls
    assert lls[-1] > -3.0 > lls[0]  # 4 equally likely patterns would be log(1/4) = -1.39


def test_gaussian_rbm_learns_a_correlated_gaussian():
    torch.manual_seed(0)
    cov = torch.tensor([[2.0, 0.8], [0.8, 1.5]], dtype=torch.float64)  # >= I: unit-variance units can fit it
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    data = torch.randn(4096, 2, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + mean
    model = make(2, 8, "gaussian")
    model.init_from_data(data)
    torch.testing.assert_close(model.b_v.data, data.mean(0))
    train(model, data, steps=600, lr=0.01, batch=256)
    samples = model.sample(10000, steps=200)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.2, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.35, rtol=0)


# ------------------------------------------------------------------------------------ the loss parts
@pytest.mark.parametrize("visible", ["bernoulli", "gaussian"])
def test_cd_loss_gradient_is_the_cd_update(visible):
    torch.manual_seed(0)
    model = randomize(make(6, 4, visible, cd_steps=2))
    v = PATTERNS.repeat(3, 1) if visible == "bernoulli" else torch.randn(12, 6, dtype=torch.float64)
    out = model(v)
    assert set(out.losses) == {"cd", "mse"}
    assert out.losses["cd"].requires_grad and not out.losses["mse"].requires_grad
    out.loss.backward()
    v_model = out.extras["v_model"]
    with torch.no_grad():
        p_data, p_model = model.prob_h(v), model.prob_h(v_model)
        dW = v.T @ p_data / len(v) - v_model.T @ p_model / len(v_model)
        dh = p_data.mean(0) - p_model.mean(0)
        dv = v.mean(0) - v_model.mean(0)
    # Gradient descent on "cd" ascends the CD estimate of the log-likelihood gradient.
    torch.testing.assert_close(model.W.grad, -dW)
    torch.testing.assert_close(model.b_h.grad, -dh)
    torch.testing.assert_close(model.b_v.grad, -dv)


@pytest.mark.parametrize("visible", ["bernoulli", "gaussian"])
def test_encode_decode_and_monitoring_mse(visible):
    torch.manual_seed(0)
    model = randomize(make(6, 4, visible))
    v = PATTERNS if visible == "bernoulli" else torch.randn(4, 6, dtype=torch.float64)
    out = model(v)
    torch.testing.assert_close(out.code, torch.sigmoid(v @ model.W + model.b_h))
    torch.testing.assert_close(out.x_hat, model.decode(model.encode(v)))
    torch.testing.assert_close(out.losses["mse"], (out.x_hat - v).pow(2).sum(-1).mean().detach())
    if visible == "bernoulli":
        assert ((out.x_hat > 0) & (out.x_hat < 1)).all()


def test_persistent_chains_carry_over_train_steps_only():
    torch.manual_seed(0)
    model = randomize(make(6, 4, "bernoulli", persistent=True))
    data = PATTERNS.repeat(4, 1)
    model(data)
    first = model.chains.clone()
    assert first.shape == (16, 6)
    out = model(data[:5])  # a smaller batch keeps the 16 chains
    assert model.chains.shape == (16, 6) and out.extras["v_model"] is model.chains
    model.eval()
    kept = model.chains.clone()
    model(data)
    assert torch.equal(model.chains, kept)  # evaluation leaves the chains alone
    assert "chains" not in model.state_dict()


# ------------------------------------------------------------------------------ interface duties
@pytest.mark.parametrize("visible", ["bernoulli", "gaussian"])
def test_save_load_round_trip(visible, tmp_path):
    torch.manual_seed(0)
    model = randomize(make(6, 4, visible, persistent=True, cd_steps=3)).float()
    model.input_scale.fill_(0.3)
    model.save(tmp_path)
    loaded = Autoencoder.load(tmp_path)
    assert loaded.visible == visible and loaded.cfg.cd_steps == 3 and loaded.cfg.persistent
    x = PATTERNS.float()
    model.eval(), loaded.eval()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.code, b.code)
    assert all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)


def test_gaussian_input_scale_invariance():
    torch.manual_seed(0)
    x, c = torch.randn(16, 6, dtype=torch.float64), 25.0
    model = randomize(make(6, 4, "gaussian"))
    scaled = make(6, 4, "gaussian")
    scaled.load_state_dict(model.state_dict())
    scaled.input_scale.fill_(1 / c)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = scaled(x * c)
    torch.testing.assert_close(b.code, a.code)
    torch.testing.assert_close(b.x_hat, a.x_hat * c)
    for part in a.losses:
        torch.testing.assert_close(b.losses[part], a.losses[part])


def test_bernoulli_units_ignore_input_scale():
    """Binary data must stay binary: the trainer's normalization would break it, so it is not applied."""
    torch.manual_seed(0)
    model = randomize(make(6, 4, "bernoulli"))
    before = model.encode(PATTERNS)
    model.input_scale.fill_(3.0)
    torch.testing.assert_close(model.encode(PATTERNS), before)
    assert set(model.sample(50, steps=2).unique().tolist()) <= {0.0, 1.0}


def test_bernoulli_init_from_data_uses_log_odds():
    model = make(6, 4, "bernoulli")
    model.init_from_data(PATTERNS)
    p = PATTERNS.mean(0).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(model.b_v.data, torch.log(p / (1 - p)))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="did you mean 'gaussian'"):
        make(3, 2, "gausian")
    with pytest.raises(ValueError, match="cd_steps"):
        make(3, 2, "bernoulli", cd_steps=0)
