"""Matryoshka BatchTopK and Gated SAEs against their definitions, written out densely here in float64."""
import pytest
import torch

from saekit.autoencoders import AutoencoderConfig, build
from saekit.errors import ConfigError

D, N, K, B = 12, 32, 4, 40
F64 = torch.float64


def randomized(kind, seed=0, **fields):
    torch.manual_seed(seed)
    model = build(AutoencoderConfig.for_kind(kind, n_latents=N, **fields), D).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
        model.W_dec.div_(model.W_dec.norm(dim=-1, keepdim=True))
        model.input_scale.fill_(0.7)
    return model


def batch(seed=5):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2


# ---------------------------------------------------------------------------------- Matryoshka
@pytest.mark.parametrize("weights", [None, [4.0, 2.0, 1.0, 2.0]])
def test_matryoshka_loss_is_the_sum_of_prefix_losses_one_by_one(weights):
    model = randomized("matryoshka", k=K, group_sizes=[4, 4, 8, 16], group_weights=weights).train()
    x = batch()
    out = model(x)
    x_n = x * 0.7
    pre = (x_n - model.b_dec) @ model.W_enc + model.b_enc
    acts = pre.relu().flatten()
    keep = acts.topk(K * B).indices
    code = torch.zeros_like(acts).scatter(0, keep, acts[keep]).view(B, N)
    torch.testing.assert_close(out.code, code)
    per_prefix = []
    for m in (4, 8, 16, 32):  # each prefix on its own: the first m latents, the rest zeroed
        mask = torch.zeros(N, dtype=F64)
        mask[:m] = 1
        x_hat = (code * mask) @ model.W_dec + model.b_dec
        per_prefix.append((x_n - x_hat).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.losses["mse"], per_prefix[-1])
    relative = [w / weights[-1] for w in weights[:-1]] if weights else [1.0] * 3  # the full prefix's stays 1
    torch.testing.assert_close(out.losses["prefix_mse"], sum(w * p for w, p in zip(relative, per_prefix)))
    torch.testing.assert_close(out.x_hat, ((code @ model.W_dec + model.b_dec) / 0.7))


def test_matryoshka_with_one_group_is_batchtopk_exactly():
    mat = randomized("matryoshka", k=K, group_fractions=[1.0]).train()
    btk = randomized("batchtopk", k=K).train()
    btk.load_state_dict(mat.state_dict())
    x = batch()
    for dead in (None, torch.arange(N) % 3 == 0):  # with AuxK on, too
        mat.set_dead_mask(dead), btk.set_dead_mask(dead)
        a, b = mat(x), btk(x)
        assert a.losses.keys() == b.losses.keys() == {"mse", "auxk"}
        for name in a.losses:
            assert torch.equal(a.losses[name], b.losses[name]), name
        assert torch.equal(a.x_hat, b.x_hat)
    assert torch.equal(mat.threshold, btk.threshold)  # the same inference threshold learned
    mat.eval(), btk.eval()
    assert torch.equal(mat.encode(x), btk.encode(x))


def test_matryoshka_prefix_gradients_reach_early_latents_more():
    """Every prefix loss sees the first group, only the full one sees the last: the gradient of the
    prefix part leaves the last group's decoder rows alone."""
    model = randomized("matryoshka", k=K, group_sizes=[8, 8, 16]).train()
    model(batch()).losses["prefix_mse"].backward()
    assert model.W_dec.grad[16:].abs().sum() == 0 and model.W_dec.grad[:8].abs().sum() > 0


@pytest.mark.parametrize("fields,message", [
    (dict(group_fractions=[0.5, 0.25]), "'group_fractions' sum to 0.75, not 1"),
    (dict(group_sizes=[8, 8]), "'group_sizes' sum to 16, not n_latents"),
    (dict(group_fractions=[0.001, 0.999]), "empty group"),
    (dict(group_weights=[1.0, 1.0]), "'group_weights' give 2 weights for 4 groups"),
    (dict(k=0), "'k' must be >= 1"),
])
def test_matryoshka_config_is_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        AutoencoderConfig.for_kind("matryoshka", n_latents=N, **fields)


# ---------------------------------------------------------------------------------------- Gated
def gated_by_the_equations(model, x):
    """Rajamanoharan et al. 2024, eqs. (3)-(6) and the loss of sec. 3.2, densely, in float64."""
    W_gate, b_gate = model.W_enc, model.b_enc
    W_mag = W_gate * model.r_mag.exp()[None, :]
    x_n = x * model.input_scale
    x_c = x_n - model.b_dec
    pi_gate = x_c @ W_gate + b_gate
    f_gate = (pi_gate > 0).to(F64)
    f_mag = torch.relu(x_c @ W_mag + model.b_mag)
    code = f_gate * f_mag
    x_hat_n = code @ model.W_dec + model.b_dec
    frozen = torch.relu(pi_gate) @ model.W_dec.detach() + model.b_dec.detach()
    losses = {"mse": (x_n - x_hat_n).pow(2).sum(-1).mean(),
              "l1": model.cfg.l1_coefficient * torch.relu(pi_gate).sum(-1).mean(),
              "aux": (x_n - frozen).pow(2).sum(-1).mean()}
    return code, x_hat_n / model.input_scale, losses


def test_gated_forward_and_gradients_match_the_paper_equations():
    model = randomized("gated", l1_coefficient=0.7)
    x = batch()
    out = model(x)
    code, x_hat, losses = gated_by_the_equations(model, x)
    assert 0 < (code != 0).float().mean() < 1  # some gates open, some shut
    torch.testing.assert_close(out.code, code)
    torch.testing.assert_close(out.x_hat, x_hat)
    for name in losses:
        torch.testing.assert_close(out.losses[name], losses[name])
    grads = []
    for loss in (out.loss, sum(losses.values())):
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_gated_gate_learns_only_from_l1_and_aux():
    model = randomized("gated")
    out = model(batch())
    out.losses["mse"].backward()
    assert model.b_enc.grad is None or model.b_enc.grad.abs().sum() == 0  # b_gate: only through the step
    assert model.W_enc.grad.abs().sum() > 0  # W_gate: through the tied magnitude path
    model.zero_grad()
    out = model(batch())
    out.losses["aux"].backward()
    assert model.W_dec.grad is None or model.W_dec.grad.abs().sum() == 0  # the decoder is frozen there
    assert model.b_enc.grad.abs().sum() > 0
