"""Metric definitions: FVU about the mean, and every metric independent of how tokens are batched."""
import math

import pytest
import torch

from saekit.autoencoders.base import Output
from saekit.metrics import (FiringStats, Metrics, ReconstructionStats, density_histogram,
                                       fvu)


def _data(n=1000, d=24, offset=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a large common offset, like a residual stream's mean direction, stresses the mean-centering
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3.0, d) + offset
    x_hat = x + 0.3 * torch.randn(n, d, generator=g)
    code = torch.relu(torch.randn(n, 40, generator=g) - 1.0)
    code[:, :5] = 0  # five dead latents
    code[:, 5] = 1.0  # one latent on every token (dense)
    return x, x_hat, code


def _run(x, x_hat, code, sizes):
    m = Metrics(code.shape[1])
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        m.update(x[sl], Output(x_hat=x_hat[sl], code=code[sl]))
        start += size
    assert start == x.shape[0]
    return m.compute()


def test_predicting_the_mean_gives_fvu_one():
    x, _, _ = _data()
    x_bar = x.double().mean(0).float().expand_as(x)
    for sizes in ([1000], [1] * 10 + [990], [333, 333, 334]):
        stats = ReconstructionStats()
        start = 0
        for s in sizes:
            stats.update(x[start:start + s], x_bar[start:start + s])
            start += s
        assert stats.compute()["fvu"] == pytest.approx(1.0, abs=1e-6)


def test_perfect_reconstruction_gives_zero():
    x, _, code = _data()
    out = _run(x, x.clone(), code, [100] * 10)
    assert out["fvu"] == 0.0 and out["mse"] == 0.0
    assert out["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_no_metric_depends_on_batch_split():
    x, x_hat, code = _data()
    reference = _run(x, x_hat, code, [1000])
    for sizes in ([1] * 1000, [7] * 142 + [6], [500, 499, 1], [64] * 15 + [40]):
        got = _run(x, x_hat, code, sizes)
        assert got.keys() == reference.keys()
        for key, value in reference.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_values_match_the_definitions():
    x, x_hat, code = _data(n=300)
    got = _run(x, x_hat, code, [100, 200])
    xd, xhd = x.double(), x_hat.double()
    sq_err = (xd - xhd).square().sum()
    assert got["fvu"] == pytest.approx((sq_err / (xd - xd.mean(0)).square().sum()).item(), rel=1e-9)
    assert got["mse"] == pytest.approx((sq_err / 300).item(), rel=1e-9)
    assert got["mse_per_element"] == pytest.approx((sq_err / (300 * 24)).item(), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(xd, xhd, dim=-1).mean().item()
    assert got["cosine"] == pytest.approx(cos, rel=1e-9)
    assert got["l0"] == pytest.approx((code != 0).sum(1).double().mean().item())
    assert got["dead_fraction"] == pytest.approx(5 / 40)
    density = (code != 0).double().mean(0)
    assert got["dense_fraction"] == pytest.approx((density > 0.1).double().mean().item())
    assert got["tokens"] == 300
    assert fvu(x, x_hat) == pytest.approx(got["fvu"], rel=1e-9)


def test_sparse_and_dense_codes_agree():
    _, _, code = _data(n=200)
    values, indices = code.topk(8, dim=-1)  # some of the top 8 are zero: they must not count
    dense = torch.zeros_like(code).scatter_(1, indices, values)
    x = torch.randn(200, 24)
    a, b = Metrics(40), Metrics(40)
    a.update(x, Output(x_hat=x, code=dense))
    b.update(x, Output(x_hat=x, indices=indices, values=values))
    assert a.compute() == b.compute()
    assert torch.equal(a.firing.fire_counts, b.firing.fire_counts)


def test_merge_and_tensor_roundtrip_equal_one_pass():
    x, x_hat, code = _data()
    whole = ReconstructionStats()
    whole.update(x, x_hat)
    left, right = ReconstructionStats(), ReconstructionStats()
    left.update(x[:123], x_hat[:123])
    right.update(x[123:], x_hat[123:])
    merged = ReconstructionStats.from_tensor(left.to_tensor())
    merged.merge(ReconstructionStats.from_tensor(right.to_tensor()))
    for key, value in whole.compute().items():
        assert merged.compute()[key] == pytest.approx(value, rel=1e-12)

    f1 = FiringStats(40)
    f1.update((code[:500] != 0).sum(0), (code[:500] != 0).sum(1))
    f1.add_counts((code[500:] != 0).sum(0), (code[500:] != 0).sum(), 500)  # another rank's sums
    assert f1.n == 1000 and torch.equal(f1.fire_counts, (code != 0).sum(0))


def test_density_histogram():
    counts = torch.tensor([0, 0, 1, 10, 100, 1000])
    hist, edges, n_dead = density_histogram(counts, 1000, bins=8, low=-4.0)
    assert n_dead == 2 and hist.sum() == 4 and edges.numel() == 9
    assert edges[0] == -4.0 and edges[-1] == 0.0
    # densities 1e-3, 1e-2, 1e-1, 1: one latent each in the bins holding -3, -2, -1 and 0
    for value in (-3.0, -2.0, -1.0, 0.0):
        b = min(int(((value + 4.0) / 0.5)), 7)
        assert hist[b] >= 1
    assert math.isnan(ReconstructionStats().compute().get("fvu", math.nan))


def test_evaluate_runs_a_model_in_eval_mode():
    from saekit.metrics import evaluate

    class Mean(torch.nn.Module):
        n_latents = 3

        def forward(self, x):
            assert not self.training
            return Output(x_hat=x.mean(0, keepdim=True).expand_as(x), code=torch.ones(x.shape[0], 3))

    x = torch.randn(50, 4)
    model = Mean()
    got = evaluate(model, [x]).compute()
    assert model.training and got["fvu"] == pytest.approx(1.0) and got["l0"] == 3.0
