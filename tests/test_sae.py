"""The sparse-autoencoder family: interface, losses, hooks, files, and a small JumpReLU training run."""
import copy

import pytest
import torch

from saekit.autoencoders import Autoencoder, AutoencoderConfig, KernelOptions, build
from saekit.autoencoders.kernels import select_topk
from saekit.errors import ConfigError

D, N, K, B = 16, 64, 4, 32
KINDS = ["relu", "topk", "batchtopk", "jumprelu"]


# Per-kind test defaults (each family takes only its own keys).
DEFAULTS = {"relu": {}, "topk": dict(k=K, auxk_latents=6), "batchtopk": dict(k=K, auxk_latents=6),
            "jumprelu": dict(initial_threshold=0.05)}


def make(kind, seed=0, fast_path=True, **over):
    torch.manual_seed(seed)
    model = build(AutoencoderConfig.for_kind(kind, n_latents=N, **(DEFAULTS[kind] | over)), D)
    model.use_kernels(KernelOptions(fast_path=fast_path))
    return model


def batch(seed=1, n=B):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 3.0


def randomize_(model, seed=2):
    """Nonzero biases and scale, so tests see every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.b_dec.copy_(torch.randn(D, generator=g))
        model.b_enc.copy_(torch.randn(N, generator=g) * 0.1)
        model.input_scale.fill_(0.4)
    return model


def dead_mask(ids):
    m = torch.zeros(N, dtype=torch.bool)
    m[list(ids)] = True
    return m


# --------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("kind", KINDS)
def test_builds_forward_shapes_and_loss_parts(kind):
    model = make(kind)
    assert isinstance(model, Autoencoder) and model.kind == kind
    assert model.W_enc.shape == (D, N) and model.W_dec.shape == (N, D)
    out = model(batch())
    assert out.x_hat.shape == (B, D)
    expected = {"relu": {"mse", "l1"}, "topk": {"mse", "auxk"}, "batchtopk": {"mse", "auxk"},
                "jumprelu": {"mse", "l0"}}[kind]
    assert set(out.losses) == expected
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    if kind == "topk":
        assert out.code is None and out.indices.shape == (B, K) and out.values.shape == (B, K)
    else:
        assert out.code.shape == (B, N)
    assert out.nonzero_per_token().shape == (B,)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_init_unit_decoder():
    model = make("topk")
    torch.testing.assert_close(model.W_enc, model.W_dec.T)
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(N))


@pytest.mark.parametrize("kind", KINDS)
def test_mse_is_sum_over_d_mean_over_batch(kind):
    model = randomize_(make(kind)).eval()
    x = batch()
    out = model(x)
    x_n, x_hat_n = x * 0.4, out.x_hat * 0.4
    torch.testing.assert_close(out.losses["mse"], (x_n - x_hat_n).pow(2).sum(-1).mean())
    if kind != "batchtopk":  # batch top-k codes depend on the batch; the rest are per-token
        torch.testing.assert_close(model(torch.cat([x, x])).losses["mse"], out.losses["mse"])


@pytest.mark.parametrize("kind", KINDS)
def test_input_scale_invariance(kind):
    model = randomize_(make(kind)).eval()
    x, c = batch(), 7.0
    out = model(x)
    with torch.no_grad():
        model.input_scale /= c
    out_c = model(x * c)
    torch.testing.assert_close(out_c.x_hat, out.x_hat * c, rtol=1e-5, atol=1e-5)
    for name in out.losses:
        torch.testing.assert_close(out_c.losses[name], out.losses[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_agree_with_forward(kind):
    model = randomize_(make(kind)).eval()
    x = batch()
    out = model(x)
    torch.testing.assert_close(model.decode(model.encode(x)), out.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode(x), out.dense_code(N))


@pytest.mark.parametrize("kind", KINDS)
def test_init_from_data_sets_b_dec_in_normalized_units(kind):
    model = randomize_(make(kind))
    center = torch.arange(D, dtype=torch.float32)
    model.init_from_data(batch(), center)
    torch.testing.assert_close(model.b_dec.detach(), center * 0.4)
    torch.testing.assert_close(model.decode(torch.zeros(1, N))[0], center)  # raw units back out
    model.init_from_data(batch(), None)  # None leaves b_dec alone
    torch.testing.assert_close(model.b_dec.detach(), center * 0.4)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    model = randomize_(make(kind))
    x = batch()
    if kind == "batchtopk":
        model.train()(x)  # sets the inference threshold
        assert model.threshold.item() > 0
    if kind == "jumprelu":
        with torch.no_grad():
            model.log_threshold.add_(torch.linspace(-1, 1, N))
    model.eval()
    out = model(x)
    model.save(tmp_path / "m")
    loaded = Autoencoder.load(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    out2 = loaded(x)
    assert torch.equal(out2.x_hat, out.x_hat)
    for name in out.losses:
        assert torch.equal(out2.losses[name], out.losses[name])


# ----------------------------------------------------------------------------------- TopK
def test_topk_keeps_k_per_token():
    out = make("topk")(batch())
    assert (out.indices.diff(dim=1) > 0).all()  # distinct latents
    assert out.nonzero_per_token().max() <= K


@pytest.mark.parametrize("transposed", [False, True])
def test_remove_parallel_grad_is_the_orthogonal_projection(transposed):
    from saekit.autoencoders.sae import remove_parallel_grad_

    g = torch.Generator().manual_seed(3)
    W = torch.nn.Parameter(torch.randn(40, 12, generator=g, dtype=torch.float64) * 3)  # rows not unit norm
    grad = torch.randn(40, 12, generator=g, dtype=torch.float64)
    W.grad = grad.T.contiguous().T if transposed else grad.clone()  # a non-contiguous gradient too
    remove_parallel_grad_(W)
    w = W.detach()
    want = grad - (grad * w).sum(-1, keepdim=True) / (w * w).sum(-1, keepdim=True) * w
    torch.testing.assert_close(W.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_gradient_projection_and_unit_norm_after_step(kind):
    model = randomize_(make(kind))
    model.set_dead_mask(dead_mask(range(10)))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(batch()).loss.backward()
    assert (model.W_dec.grad * model.W_dec).sum(-1).abs().max() > 1e-4  # something to remove
    model.before_optimizer_step()
    parallel = (model.W_dec.grad * model.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-5
    opt.step()
    model.after_optimizer_step()
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(N))


def _auxk_by_hand(model, x, dead_ids, batch_topk=False):
    """AuxK written out from the definition: the residual of the main reconstruction (b_dec counted
    once, in x_hat) against the top auxk_k dead pre-activations decoded with NO decoder bias."""
    with torch.no_grad():
        x_n = x * model.input_scale
        pre = (x_n - model.b_dec) @ model.W_enc + model.b_enc
        if batch_topk:
            acts = pre.relu().flatten()
            keep = acts.topk(K * x.shape[0]).indices
            code = torch.zeros_like(acts).scatter(0, keep, acts[keep]).view_as(pre)
        else:
            idx, vals = select_topk(pre, K)
            code = torch.zeros_like(pre).scatter(1, idx, vals)
        e = x_n - (code @ model.W_dec + model.b_dec)
        dead = torch.tensor(dead_ids)
        aux_vals, aux_loc = pre[:, dead].topk(min(model.auxk_latents, len(dead_ids)), dim=-1)
        aux_code = torch.zeros(x.shape[0], N).index_put_(
            (torch.arange(x.shape[0])[:, None], dead[aux_loc]), aux_vals.relu())
        e_hat = aux_code @ model.W_dec
        return model.cfg.auxk_alpha * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize("kind,fast", [("topk", True), ("topk", False), ("batchtopk", None)])
def test_auxk_zero_without_dead_and_matches_formula_with_dead(kind, fast):
    over = {} if fast is None else {"fast_path": fast}
    model = randomize_(make(kind, **over))
    with torch.no_grad():
        model.b_dec.mul_(10)  # a bias counted twice would dominate the residual
    x = batch()
    assert model(x).losses["auxk"].item() == 0.0
    model.set_dead_mask(torch.zeros(N, dtype=torch.bool))  # an all-false mask: nothing dead
    assert model(x).losses["auxk"].item() == 0.0
    for dead_ids in ([1, 5, 9, 20, 33, 40, 41, 50, 63], [3, 7]):  # more and fewer than auxk_k
        model.set_dead_mask(dead_mask(dead_ids))
        aux = model(x).losses["auxk"]
        assert aux.item() > 0
        torch.testing.assert_close(aux, _auxk_by_hand(model, x, dead_ids, kind == "batchtopk"))


def test_auxk_gradient_reaches_dead_latents_only_through_aux():
    original = randomize_(make("topk"))
    original.set_dead_mask(dead_mask(range(0, N, 4)))
    for model in (original, copy.deepcopy(original)):  # a copy gets the dense-gradient hook too
        out = model(batch())
        out.losses["auxk"].backward()  # the aux loss alone: the decoder's gradient is still dense
        assert not model.W_dec.grad.is_sparse
        assert model.W_dec.grad[1::4].abs().sum() == 0  # live latents get no AuxK decoder gradient
        assert model.W_dec.grad[0::4].abs().sum() > 0


def test_topk_fast_and_naive_models_agree():
    x = batch()
    outs, grads = [], []
    for fast in (True, False):
        model = randomize_(make("topk", fast_path=fast))
        model.set_dead_mask(dead_mask(range(0, N, 5)))
        out = model(x)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters()])
    assert torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(outs[0].x_hat, outs[1].x_hat, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- BatchTopK
def test_batchtopk_train_budget_and_eval_threshold():
    model = randomize_(make("batchtopk", threshold_beta=0.5))
    x = batch()
    assert model.threshold.item() < 0
    model.eval()
    assert (model(x).code != 0).sum() == K * B  # no threshold yet: falls back to the batch top-k
    model.train()
    out = model(x)
    assert (out.code != 0).sum() == K * B
    first = out.code[out.code > 0].min()
    torch.testing.assert_close(model.threshold, first)  # first estimate is taken as is
    out2 = model(batch(seed=5))
    second = out2.code[out2.code > 0].min()
    torch.testing.assert_close(model.threshold, 0.5 * first + 0.5 * second)  # then an EMA
    model.eval()
    before = model.threshold.clone()
    code = model(x).code
    assert torch.equal(model.threshold, before)  # eval leaves it alone
    acts = ((x * 0.4 - model.b_dec) @ model.W_enc + model.b_enc).relu()
    torch.testing.assert_close(code, acts * (acts > before))


def test_batchtopk_default_threshold_follows_drifting_activations():
    """The default EMA must track activations that drift during a short run: after 600 training
    batches at a new scale (a 600k-token run at batch 1024 has ~590), inference L0 is close to k.
    (With beta 0.999 the stale start keeps a weight of ~0.55 and L0 comes out near 0.1 here.)"""
    model = randomize_(make("batchtopk"))
    assert model.cfg.threshold_beta <= 0.99
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for step in range(650):  # 50 batches at 3x scale (an untrained start), then 600 at the final one
            scale = 3.0 if step < 50 else 1.0
            model(torch.randn(256, D, generator=gen) * 3.0 * scale)
        model.eval()
        l0 = model(torch.randn(4096, D, generator=gen) * 3.0).nonzero_per_token().float().mean().item()
    assert abs(l0 - K) < 0.15 * K, l0


# ---------------------------------------------------------------------------------- ReLU/L1
def test_relu_l1_weights_codes_by_decoder_norms():
    model = randomize_(make("relu", l1_coefficient=2.0))
    with torch.no_grad():
        model.W_dec[:8] *= 3.0
    x = batch()
    out = model(x)
    expected = 2.0 * (out.code.abs() * model.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out.losses["l1"], expected)
    model.set_sparsity_scale(0.25)
    torch.testing.assert_close(model(x).losses["l1"], 0.25 * expected)


# ---------------------------------------------------------------------------------- JumpReLU
def test_jumprelu_code_and_threshold_gradient():
    model = randomize_(make("jumprelu", bandwidth=0.5))
    x = batch()
    out = model(x)
    pre = (x * 0.4 - model.b_dec) @ model.W_enc + model.b_enc
    theta = model.log_threshold.exp()
    torch.testing.assert_close(out.code, pre * (pre > theta))
    torch.testing.assert_close(out.losses["l0"], model.cfg.l0_coefficient * (pre > theta).sum(-1).float().mean())
    out.losses["l0"].backward()
    # STE: d l0 / d theta_j = -(coef / B) * sum_b rect((pre - theta) / eps) / eps; times theta for log.
    rect = ((pre - theta).abs() / 0.5 < 0.5).float()
    expected = -(model.cfg.l0_coefficient / B) * rect.sum(0) / 0.5 * theta
    torch.testing.assert_close(model.log_threshold.grad, expected.detach())
    assert model.W_enc.grad is None or model.W_enc.grad.abs().sum() == 0  # L0 trains thresholds only
    model.set_sparsity_scale(0.5)
    torch.testing.assert_close(model(x).losses["l0"], 0.5 * out.losses["l0"].detach())


def test_jumprelu_default_threshold_is_the_l0_break_even_activation():
    # A latent firing at c removes at most c^2 of squared error (unit decoder row) and costs l0_coefficient.
    model = make("jumprelu", initial_threshold=None, l0_coefficient=4.0)
    torch.testing.assert_close(model.threshold, torch.full((N,), 2.0))
    assert make("jumprelu", initial_threshold=0.3, l0_coefficient=4.0).threshold[0].item() == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="initial_threshold' is needed when l0_coefficient is 0"):
        make("jumprelu", initial_threshold=None, l0_coefficient=0.0)
    defaults = AutoencoderConfig.for_kind("jumprelu")
    assert defaults.initial_threshold is None and defaults.bandwidth >= 0.1  # normalized units


def _sparse_data(n_tok, seed, d=D, n_feat=32):
    dirs = torch.randn(n_feat, d, generator=torch.Generator().manual_seed(0))
    dirs /= dirs.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n_tok, n_feat, generator=g) < 3 / n_feat
    return (active * (torch.rand(n_tok, n_feat, generator=g) * 2 + 1)) @ dirs


def test_jumprelu_l0_falls_as_l0_coefficient_rises(one_thread):
    x, x_test = _sparse_data(4096, seed=1), _sparse_data(1024, seed=2)
    l0s = []
    for coef in (0.01, 0.1, 1.0):
        model = make("jumprelu", l0_coefficient=coef, initial_threshold=0.1, bandwidth=0.2)
        model.input_scale.fill_((D / x.pow(2).sum(-1).mean()).sqrt().item())
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(3)
        for _ in range(300):
            model(x[torch.randint(0, len(x), (256,), generator=gen)]).loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            l0s.append(model(x_test).nonzero_per_token().float().mean().item())
            assert (model.threshold - 0.1).abs().max() > 0.01  # the thresholds moved
    assert l0s[0] > l0s[1] > l0s[2], l0s


def test_data_decoder_init_points_rows_at_centered_samples():
    from saekit.autoencoders import TopKConfig

    torch.manual_seed(0)
    x = torch.randn(100, 16) * 3 + 5
    model = build(TopKConfig(n_latents=64, k=4), 16)
    model.input_scale.fill_(0.5)
    center = x.mean(0)
    model.init_from_data(x, center)
    rows = model.W_dec.detach()
    assert torch.allclose(rows.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.equal(model.W_enc.detach(), rows.T)
    # Each row is a distinct sample, centered at b_dec (normalized units) and scaled to unit norm.
    target = (x * 0.5 - center * 0.5)
    target = target / target.norm(dim=-1, keepdim=True)
    sims = rows @ target.T
    assert torch.allclose(sims.max(-1).values, torch.ones(64), atol=1e-5)
    assert len(set(sims.argmax(-1).tolist())) == 64
    random_init = build(TopKConfig(n_latents=64, k=4, decoder_init="random"), 16)
    before = random_init.W_dec.detach().clone()
    random_init.init_from_data(x, center)
    assert torch.equal(random_init.W_dec.detach(), before)


# The flat config every saved model had before the per-family configs (format 1): all fields of all
# families, with the old names.
FORMAT_1 = {"kind": "topk", "n_latents": N, "k": K, "l1_coefficient": 5.0, "l0_coefficient": 0.3,
            "jumprelu_threshold": 0.05, "jumprelu_bandwidth": 0.5, "jumprelu_threshold_lr_scale": 10.0,
            "decoder_init": "data", "auxk_alpha": 1 / 32, "auxk_k": 6, "dead_tokens": None, "fast_path": True,
            "chunk_tokens": 0, "sparse_kernels": "torch", "topk_method": "auto", "batchtopk_threshold_beta": 0.9,
            "hidden": [], "activation": "relu", "noise": "gaussian", "noise_level": 0.1,
            "contractive_coefficient": 0.1, "visible": "gaussian", "cd_k": 1, "persistent": False}


@pytest.mark.parametrize("kind", KINDS)
def test_models_saved_before_per_family_configs_still_load(kind, tmp_path):
    import json

    model = randomize_(make(kind, bandwidth=0.5) if kind == "jumprelu" else
                       make(kind, threshold_beta=0.9) if kind == "batchtopk" else make(kind)).eval()
    model.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == 2 and meta["model"]["kind"] == kind
    (tmp_path / "config.json").write_text(json.dumps({"kind": kind, "d_in": D, "model": {**FORMAT_1, "kind": kind}}))
    loaded = Autoencoder.load(tmp_path).eval()
    assert loaded.cfg == model.cfg  # renamed keys mapped, other families' keys dropped
    x = batch()
    assert torch.equal(loaded(x).x_hat, model(x).x_hat)


def test_a_model_config_accepts_only_its_own_keys():
    with pytest.raises(ConfigError, match="'model.l1_coefficient' does not apply to kind 'topk'.*relu"):
        from saekit.schema import from_dict

        from_dict(AutoencoderConfig, {"kind": "topk", "l1_coefficient": 5}, where="model.")
    with pytest.raises(ConfigError, match="'k' is 65, more than n_latents"):
        AutoencoderConfig.for_kind("batchtopk", n_latents=64, k=65)
    with pytest.raises(TypeError):
        build(AutoencoderConfig.for_kind("relu"), D).__class__(D, AutoencoderConfig.for_kind("topk"))
