"""Generative sampling: do an RBM's Gibbs samples have the data's first and second moments?

    mean_error = ‖μ_samples − μ_data‖ / sqrt(tr Σ_data)    (the mean gap in units of the data's spread)
    cov_error  = ‖Σ_samples − Σ_data‖_F / ‖Σ_data‖_F
    var_ratio  = tr Σ_samples / tr Σ_data

reported for the chains' starting point (P(v | h = 0)) and after ``steps`` block-Gibbs rounds: a model
that learned the data moves both errors down along the chain.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(x.shape[0] - 1, 1)


def moment_errors(samples: Tensor, data: Tensor) -> dict[str, float]:
    mu_s, cov_s = _moments(samples)
    mu_d, cov_d = _moments(data.to(samples.device))
    spread = cov_d.trace().clamp_min(1e-30)
    return {"mean_error": ((mu_s - mu_d).norm() / spread.sqrt()).item(),
            "cov_error": ((cov_s - cov_d).norm() / cov_d.norm().clamp_min(1e-30)).item(),
            "var_ratio": (cov_s.trace() / spread).item()}


@torch.no_grad()
def rbm_moment_check(model, data: Tensor, n_samples: int = 1000, steps: int = 200, seed: int = 0) -> dict:
    """Moment errors of ``n_samples`` Gibbs chains against ``data`` (raw units), at the start and after
    ``steps`` rounds."""
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        start = model.sample(n_samples, steps=0)
        final = model.sample(n_samples, steps=steps, init=start)
    finally:
        torch.random.set_rng_state(state)
    first, last = moment_errors(start, data), moment_errors(final, data)
    return {"samples": n_samples, "gibbs_steps": steps, **last,
            **{f"{k}_start": v for k, v in first.items()}}
