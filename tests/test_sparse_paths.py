"""The variable-count sparse steps (sparse_paths.py: BatchTopK, Matryoshka, JumpReLU, ReLU) against each
family's dense reference step (``kernels.fast_path: false``): forward outputs, every loss part and every
parameter's gradient, in float64."""
import pytest
import torch

from saekit.autoencoders import AutoencoderConfig, KernelOptions, build
from saekit.autoencoders import sparse_paths
from saekit.autoencoders.sparse_paths import Rule, csr_decode, csr_dots, padded, select

D, N, K, B = 12, 64, 4, 48
F64 = torch.float64


def _close(a, b, what):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=what)


def randomized(kind, seed=0, **fields):
    torch.manual_seed(seed)
    model = build(AutoencoderConfig.for_kind(kind, n_latents=N, **fields), D).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
        model.W_dec.div_(model.W_dec.norm(dim=-1, keepdim=True))
        model.input_scale.fill_(0.7)
    return model


def batch(seed=5, b=B):
    return torch.randn(b, D, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2


def run(model, x, opts, dead=None, weights=None):
    """(x_hat, dense code, losses, grads by name) of one forward + backward of the summed loss."""
    model.use_kernels(opts)
    model.set_dead_mask(dead)
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = sum(v * (weights or {}).get(k, 1.0) for k, v in out.losses.items())
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return out.x_hat.detach(), out.dense_code(N).detach(), {k: v.detach() for k, v in out.losses.items()}, grads


def compare(make, x, opts, dead=None, prepare=None):
    fast, dense = make(), make()
    if prepare:
        prepare(fast), prepare(dense)
    a = run(fast, x, opts, dead)
    b = run(dense, x, KernelOptions(fast_path=False), dead)
    _close(a[0], b[0], "x_hat")
    _close(a[1], b[1], "code")
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        _close(a[2][k], b[2][k], f"loss {k}")
    for k in a[3]:
        _close(a[3][k], b[3][k], f"grad {k}")
    return fast, dense


OPTS = [KernelOptions(), KernelOptions(chunk_tokens=7)]  # one chunk; 48 = 6 * 7 + 6


@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("kind,fields", [("batchtopk", {}), ("matryoshka", dict(group_sizes=[8, 8, 16, 32])),
                                         ("matryoshka", dict(group_fractions=[1.0]))])
@pytest.mark.parametrize("n_dead", [0, 5, 40])  # AuxK: none, fewer than auxk_latents, more
def test_batchtopk_family_matches_dense(kind, fields, opts, n_dead):
    dead = None
    if n_dead:
        dead = torch.zeros(N, dtype=torch.bool)
        dead[torch.randperm(N, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    make = lambda: randomized(kind, k=K, auxk_latents=6, **fields).train()  # noqa: E731
    fast, dense = compare(make, batch(), opts, dead)
    _close(fast.threshold, dense.threshold, "the inference-threshold statistic")
    # A second batch starts from the first's guess; eval uses the learned threshold on both paths.
    compare(lambda: fast, batch(seed=9), opts, dead)
    fast.eval()
    dense.load_state_dict(fast.state_dict())
    dense.eval()
    compare(lambda: fast, batch(seed=11), opts, dead)


@pytest.mark.parametrize("guess", [None, 0.0, 1e-3, 5.0, 1e6])  # first batch, all positives, low, high, far too high
@pytest.mark.parametrize("chunk", [0, 5])
def test_batch_topk_selection_is_exact_for_any_guess(guess, chunk):
    g = torch.Generator().manual_seed(1)
    x_c = torch.randn(B, D + 1, generator=g, dtype=F64)
    W, b = torch.randn(D + 1, N, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
    x_c[:, D] = 0
    x_c[3, D] = 1
    W[D] = 5  # token 3's pre-activations all 5 higher: it holds far more than k of the winners
    pre = torch.addmm(b, x_c, W)
    s = select(x_c, W, b, None, Rule("batchtopk", lo=guess, k=K), torch.zeros(0, dtype=torch.long), chunk)
    want = pre.relu().flatten().topk(K * B).values
    assert s.vals_E.numel() == K * B
    _close(s.vals_E.sort().values, want.sort().values, "the k*B largest")
    assert s.p.crow.diff()[3] > 3 * K  # the full token kept its share
    _close(pre[s.p.row, s.p.col], s.vals_E, "values at their positions")
    assert ((s.p.row * N + s.p.col).diff() > 0).all()  # CSR order: by token, then latent
    _close(s.low, want.min(), "smallest kept")


def test_batch_topk_with_fewer_positives_than_k_b_keeps_them_all():
    x_c = torch.randn(B, D, dtype=F64)
    W = torch.randn(D, N, dtype=F64)
    b = torch.full((N,), -6.0, dtype=F64)  # almost everything negative
    pre = torch.addmm(b, x_c, W)
    s = select(x_c, W, b, None, Rule("batchtopk", lo=None, k=K), torch.zeros(0, dtype=torch.long))
    assert s.vals_E.numel() == (pre > 0).sum() < K * B


@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("bandwidth", [0.3, 2.0])  # band within the positives; band reaching below 0
def test_jumprelu_matches_dense_with_threshold_gradients(opts, bandwidth):
    def make():
        m = randomized("jumprelu", l0_coefficient=0.4, bandwidth=bandwidth)
        m.pattern_density = 0.0  # take the sparse step
        m.set_sparsity_scale(0.6)
        return m

    def forced_sparse(m):
        m.pattern_density = 0.0

    x = batch()
    compare(make, x, opts, prepare=forced_sparse)
    g = run(make(), x, opts)[3]["log_threshold"]
    assert (g != 0).sum() > N // 4  # the thresholds do get gradient


@pytest.mark.parametrize("opts", OPTS)
def test_relu_matches_dense(opts):
    def make():
        m = randomized("relu", l1_coefficient=0.3)
        with torch.no_grad():
            m.b_enc.sub_(1.0)  # sparse enough that the sparse step is the one taken
        m.set_sparsity_scale(0.5)
        return m

    compare(make, batch(), opts, prepare=lambda m: setattr(m, "pattern_density", 0.0))


def test_dense_fallback_switches_on_measured_density():
    m = randomized("relu")
    x = batch()
    assert m.pattern_density == 1.0 and not m.use_sparse_step()  # first step: dense, measured
    m(x)
    dense_now = m.pattern_density
    assert 0.2 < dense_now < 0.8 and not m.use_sparse_step()
    with torch.no_grad():
        m.b_enc.sub_(6.0)
    m(x)  # still dense (the previous density), measures the new one
    assert m.pattern_density < sparse_paths.SPARSE_MAX_DENSITY and m.use_sparse_step()
    out = m(x)
    assert out.indices is not None and out.code.shape == (B, N)  # sparse form, dense code on demand
    m.use_kernels(KernelOptions(fast_path=False))
    assert not m.use_sparse_step()


def test_csr_pieces_equal_dense_and_padding():
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(B, N, generator=g, dtype=F64)
    pre[0] = -1  # an empty row
    s = select(torch.eye(B, dtype=F64), pre, torch.zeros(N, dtype=F64), None, Rule("above", lo=1.0),
               torch.zeros(0, dtype=torch.long))
    dense = torch.where(pre > 1.0, pre, 0.0)
    W, gr = torch.randn(N, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    _close(csr_decode(s.p, s.vals_E, W), dense @ W, "decode")
    _close(csr_dots(s.p, gr, W), (gr @ W.T)[s.p.row, s.p.col], "sampled dots")
    idx, vals = padded(s.p, s.vals_E)
    assert idx.shape[1] == int((pre > 1).sum(1).max())
    _close(torch.zeros(B, N, dtype=F64).scatter_add_(1, idx, vals), dense, "padded form")
