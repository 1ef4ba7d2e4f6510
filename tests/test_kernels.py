"""Every fast-path piece against the dense reference: forward values and all gradients, in float64."""
import pytest
import torch
import torch.nn.functional as F

from saekit.autoencoders import kernels
from saekit.autoencoders.kernels import (KernelOptions, LatentMajor, SAEWeights, auxk_decode, gather_dots,
                                         select_topk, sparse_decode, topk_encode, topk_sae_fast,
                                         topk_sae_naive)
from saekit.errors import ConfigError

B, D, N, K = 48, 12, 80, 6
F64 = torch.float64


def _params(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=F64)
    p = dict(b_dec=torch.randn(D, generator=g, dtype=F64) * 0.1,
             W_enc=torch.randn(D, N, generator=g, dtype=F64) / D**0.5,
             b_enc=torch.randn(N, generator=g, dtype=F64) * 0.1,
             W_dec=torch.randn(N, D, generator=g, dtype=F64) / D**0.5)
    for t in p.values():
        t.requires_grad_(requires_grad)
    return x, p


def _w(p) -> SAEWeights:
    return SAEWeights(p["b_dec"], p["W_enc"], p["b_enc"], p["W_dec"])


def _close(a, b, what):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=what)


def test_select_topk_sorted_rows_and_relu():
    pre = torch.randn(B, N, dtype=F64)
    idx, vals = select_topk(pre, K)
    assert (idx.diff(dim=1) > 0).all()
    ref_vals, _ = pre.topk(K, dim=-1)
    _close(vals.sort(dim=1).values, ref_vals.relu().sort(dim=1).values, "values")
    _close(vals, pre.gather(1, idx).relu(), "values follow their indices")


def _same_selection(pre, vals, idx, k):
    """vals are the k largest of each row (as a multiset, so ties may pick either) and sit at idx."""
    assert torch.equal(vals.sort(-1).values, pre.topk(k, dim=-1).values.sort(-1).values)
    assert torch.equal(pre.gather(1, idx), vals)
    assert (idx.sort(-1).values.diff(dim=1) > 0).all()  # k distinct columns


@pytest.mark.parametrize("method", ["two_stage", "strided"])
@pytest.mark.parametrize("case", ["random", "one_group", "ties", "bf16"])
def test_two_stage_topk_selects_what_torch_topk_does(case, method):
    g = torch.Generator().manual_seed(8)
    b, n, k = 64, 32 * 24, 16
    pre = torch.randn(b, n, generator=g)
    if case == "one_group":  # the whole top k inside a few groups, some rows inside one group
        pre[:, 64:96] += 10
        pre[::2, 200:203] += 20
    elif case == "ties":  # few distinct values: many equal group maxima at the threshold
        pre = torch.randint(0, 6, (b, n), generator=g).float()
    elif case == "bf16":
        pre = pre.bfloat16()
    if method == "strided":  # strided groups: the top k inside a few groups is every 24th column
        if case == "one_group":
            pre[:, 5::24] += 30
        for group in (2, 4, 8, 16, 32, 48):
            vals, idx = kernels.strided_topk(pre, k, group)
            _same_selection(pre, vals, idx, k)
    else:
        vals, idx = kernels.two_stage_topk(pre, k)
        _same_selection(pre, vals, idx, k)


def test_strided_group_fits_the_row():
    for n in (80, 300, 768, 1536, 6144, 24576, 65536):
        for k in (1, 6, 16, 32, 64, 128):
            g = kernels.strided_group(n, k)
            if g:
                assert n % g == 0 and n // g >= k and g & (g - 1) == 0
            else:  # no power of two from 2 divides n with n/g >= k
                assert all(n % 2**e or n // 2**e < k for e in range(1, 21))
    assert kernels.strided_group(6144, 32) == 8  # sqrt(6144 / 64) = 9.8
    assert kernels.strided_group(1536, 128) == 2  # sqrt(6) = 2.4
    assert kernels.strided_group(7, 2) == 0


def test_select_topk_two_stage_and_fallback():
    pre = torch.randn(16, 32 * 10, dtype=F64)
    ref = select_topk(pre, 8)
    assert kernels.TOPK_GROUP == 32
    for method, width in (("two_stage", 320), ("two_stage", 300), ("torch", 320),  # 300: no whole groups
                          ("strided", 320), ("strided", 7 * 43)):  # 301: no group of a power of two
        rows = pre[:, :width].contiguous()  # contiguous: strided's own rule decides, not the layout
        got, want = select_topk(rows, 8, method), select_topk(rows, 8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(select_topk(pre, 8, "two_stage")[0], ref[0])
    assert torch.equal(select_topk(pre.T.contiguous().T, 8, "strided")[0], ref[0])  # strided rows: torch.topk
    assert kernels.resolve_topk_method("auto", torch.device("cuda")) == "two_stage"
    assert kernels.resolve_topk_method("auto", torch.device("cpu")) == "strided"
    with pytest.raises(ConfigError, match="'radix'.*valid: auto, strided, torch, two_stage"):
        KernelOptions(topk_method="radix")


def test_latent_major_matmul_equals_dense():
    idx, vals = select_topk(torch.randn(B, N, dtype=F64), K)
    dense = torch.randn(B, D, dtype=F64)
    G = torch.zeros(B, N, dtype=F64).scatter(1, idx, vals)
    _close(LatentMajor(idx, N).matmul(vals, dense), G.T @ dense, "G.T @ dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_latent_major_matmul_zeroes_unselected_rows_whatever_memory_held(dtype):
    # On the CPU the product writes into uninitialized memory (MKL's CSR product with beta 0): rows no
    # token selected must still come out exact zeros, selected ones the dense product.
    pre = torch.randn(B, N, dtype=F64)
    pre[:, 5] = -100  # latent 5: selected by no token
    idx, vals = select_topk(pre, K)
    vals = vals.abs() + 0.5
    dense = torch.randn(B, D, dtype=F64)
    want = torch.zeros(B, N, dtype=F64).scatter(1, idx, vals).T @ dense
    for _ in range(3):  # freed NaN-filled blocks of the result's size, for the allocator to hand back
        del_me = torch.full((N, D), float("nan"), dtype=dtype)
        del del_me
    got = LatentMajor(idx, N).matmul(vals.to(dtype), dense.to(dtype))
    assert got.dtype == dtype and torch.equal(got[5], torch.zeros(D, dtype=dtype))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gather_dots_equals_dense():
    idx, _ = select_topk(torch.randn(B, N, dtype=F64), K)
    g, W = torch.randn(B, D, dtype=F64), torch.randn(N, D, dtype=F64)
    _close(gather_dots(idx, g, W), (g @ W.T).gather(1, idx), "sampled dots")


def test_sparse_decode_forward_and_grads():
    idx, vals = select_topk(torch.randn(B, N, dtype=F64), K)
    W = torch.randn(N, D, dtype=F64)
    g_out = torch.randn(B, D, dtype=F64)
    grads = []
    for fn in (sparse_decode,
               lambda i, v, w: torch.zeros(B, N, dtype=F64).scatter(1, i, v) @ w):
        v, w = vals.clone().requires_grad_(), W.clone().requires_grad_()
        out = fn(idx, v, w)
        out.backward(g_out)
        grads.append((out, v.grad, w.grad))
    for name, a, b in zip(("x_hat", "grad vals", "grad W_dec"), *grads):
        _close(a, b, name)


def _encode_dense(x, w, k, cols):
    pre = torch.addmm(w.b_enc_N, x - w.b_dec_D, w.W_enc_DN)
    idx, vals = select_topk(pre, k)
    return vals, idx, pre[:, cols] if cols is not None else pre[:, :0]


@pytest.mark.parametrize("with_cols", [False, True])
def test_topk_encode_forward_and_all_grads(with_cols):
    x, p = _params()
    x.requires_grad_(True)
    cols = torch.tensor([3, 10, 11, 40, 79]) if with_cols else None
    g_vals = torch.randn(B, K, dtype=F64)
    g_pre = torch.randn(B, 5, dtype=F64)
    results = []
    for fn in (topk_encode, _encode_dense):
        for t in [x, *p.values()]:
            t.grad = None
        vals, idx, pre_sub = fn(x, _w(p), K, cols)
        loss = (vals * g_vals).sum() + ((pre_sub * g_pre).sum() if with_cols else 0)
        loss.backward()
        results.append([vals, idx, pre_sub] + [t.grad.clone() for t in (x, p["b_dec"], p["W_enc"], p["b_enc"])])
    names = ["vals", "idx", "pre_cols", "grad x", "grad b_dec", "grad W_enc", "grad b_enc"]
    for name, a, b in zip(names, *results):
        if name == "idx":
            assert torch.equal(a, b)
        else:
            _close(a, b, name)


@pytest.mark.parametrize("chunk,topk", [(0, "torch"), (7, "torch"), (7, "two_stage"), (7, "strided")])  # 48 = 6*7 + 6
@pytest.mark.parametrize("aux_path", ["dense", "sparse"])
@pytest.mark.parametrize("n_dead", [0, 3, 30])  # none, fewer than auxk_k, more
def test_fast_topk_sae_matches_naive(n_dead, aux_path, chunk, topk, monkeypatch):
    monkeypatch.setattr(kernels, "AUXK_DENSE_FACTOR", 10**6 if aux_path == "dense" else 0)
    monkeypatch.setattr(kernels, "TOPK_GROUP", 8)  # N 80 = 10 groups of 8 >= K: two stages apply
    auxk_k = 4
    x, p = _params(seed=1)
    dead = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:n_dead].sort().values
    target_aux = torch.randn(B, D, dtype=F64)
    results = []
    for impl in (topk_sae_fast, topk_sae_naive):
        for t in p.values():
            t.grad = None
        r = impl(x, _w(p), K, dead, auxk_k, KernelOptions(chunk_tokens=chunk, topk_method=topk))
        x_hat = r.xhat_BD + p["b_dec"]
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if n_dead:
            loss = loss + (r.ehat_BD - target_aux).pow(2).sum()
        else:
            assert r.ehat_BD is None
        loss.backward()
        # AuxK's rows reach W_dec as a sparse gradient; what the optimizer gets is one dense tensor.
        assert all(t.grad.layout == torch.strided for t in p.values())
        outs = [x_hat, r.vals_BK] + ([r.ehat_BD] if n_dead else [])
        results.append(outs + [t.grad.clone() for t in p.values()])
    for a, b in zip(*results):
        _close(a, b, "forward output or gradient")


def test_chunked_encoder_holds_one_chunk_of_pre_activations(monkeypatch):
    """The memory bound: with a budget of 10 tokens' worth, the largest [rows, n] block of
    pre-activations ever allocated (the reused CPU workspace) is 10 x n, not B x n, and the result is
    the unchunked one."""
    x, p = _params(seed=3, requires_grad=False)
    cols = torch.tensor([1, 2, 50])
    whole = topk_encode(x, _w(p), K, cols)
    monkeypatch.setattr(kernels, "PRE_CHUNK_ELEMENTS", 10 * N)
    monkeypatch.setattr(kernels._workspace, "pre", None, raising=False)
    assert kernels.chunk_rows(B, N) == 10
    chunked = topk_encode(x, _w(p), K, cols)
    assert kernels._workspace.pre.numel() == 10 * N
    assert torch.equal(whole[1], chunked[1])
    for a, b in zip(whole, chunked):
        _close(a.double(), b.double(), "chunked vs whole")


def test_auxk_dense_and_sparse_paths_agree(monkeypatch):
    pre = torch.randn(B, 20, dtype=F64)
    dead = torch.arange(0, 60, 3)
    W = torch.randn(N, D, dtype=F64)
    outs = []
    for factor in (1000, 0):  # dense subset, then sparse decode
        monkeypatch.setattr(kernels, "AUXK_DENSE_FACTOR", factor)
        pr, w = pre.clone().requires_grad_(), W.clone().requires_grad_()
        e = auxk_decode(pr, dead, 5, w)
        e.pow(2).sum().backward()
        outs.append((e, pr.grad, w.grad))
    for a, b in zip(*outs):
        _close(a, b, "aux decode")


def test_fewer_dead_than_auxk_uses_all_dead():
    pre = torch.randn(B, 3, dtype=F64)
    dead = torch.tensor([5, 9, 60])
    W = torch.randn(N, D, dtype=F64)
    ref = pre.relu() @ W[dead]
    _close(auxk_decode(pre, dead, 16, W), ref, "all dead latents used")


def test_decode_matches_embedding_bag_fp32():
    idx, vals = select_topk(torch.randn(B, N), K)
    W = torch.randn(N, D)
    torch.testing.assert_close(sparse_decode(idx, vals, W), F.embedding_bag(idx, W, per_sample_weights=vals,
                                                                            mode="sum"))


# --- the triton backend (interpreted on CPU: tests/conftest.py sets TRITON_INTERPRET) --------------
triton_kernels = pytest.importorskip("saekit.autoencoders.triton_kernels")
needs_triton = pytest.mark.skipif(not triton_kernels.available(), reason="triton is not installed")


@needs_triton
def test_triton_products_equal_torch_backend():
    """Each kernel against the torch backend, fp32, with widths that are not block multiples
    (d 150 > BLOCK_D, k 6 < BLOCK_K) and a latent chosen by many tokens (long CSR rows)."""
    g = torch.Generator().manual_seed(4)
    b, d, n, k = 40, 150, 90, 6
    pre = torch.randn(b, n, generator=g)
    pre[:, 7] += 10  # every token selects latent 7: one CSR row of 40 entries
    idx, vals = select_topk(pre, k)
    W, dense = torch.randn(n, d, generator=g), torch.randn(b, d, generator=g)
    lm = LatentMajor(idx, n)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_kernels.decode(idx, vals, W), F.embedding_bag(
        idx, W, per_sample_weights=vals, mode="sum"), **tol)
    torch.testing.assert_close(triton_kernels.gather_dots(idx, dense, W), (dense @ W.T).gather(1, idx), **tol)
    dense_grad = torch.zeros(b, n).scatter(1, idx, vals).T @ dense
    torch.testing.assert_close(lm.matmul(vals, dense, "triton"), dense_grad, **tol)


@needs_triton
@pytest.mark.parametrize("n_dead", [0, 30])
def test_fast_topk_sae_triton_backend_matches_naive(n_dead, monkeypatch):
    """The whole fast step with every sparse product in Triton: outputs and all gradients equal the
    dense reference (fp32 accumulation inside the kernels, hence the fp32-level tolerance)."""
    monkeypatch.setattr(kernels, "AUXK_DENSE_FACTOR", 0)  # the aux decode goes through the kernels too
    x, p = _params(seed=5)
    x.requires_grad_(True)
    dead = torch.randperm(N, generator=torch.Generator().manual_seed(6))[:n_dead].sort().values
    results = []
    for impl in ("triton", "naive"):
        for t in [x, *p.values()]:
            t.grad = None
        fn = topk_sae_naive if impl == "naive" else topk_sae_fast
        r = fn(x, _w(p), K, dead, 4, KernelOptions(chunk_tokens=7, backend="triton"))
        loss = (x - r.xhat_BD - p["b_dec"]).pow(2).sum() + (r.ehat_BD.pow(2).sum() if n_dead else 0)
        loss.backward()
        outs = [r.xhat_BD] + ([r.ehat_BD] if n_dead else [])
        results.append(outs + [t.grad.clone() for t in (x, *p.values())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_or_missing_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="config key 'backend' is 'cuda'.*valid: torch, triton"):
        KernelOptions(backend="cuda")


def test_triton_backend_falls_back_to_torch_off_cuda(monkeypatch):
    """A model trained with sparse_kernels: triton on a GPU must still encode on a CPU box."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_backend("triton", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("triton", torch.device("cuda")) == "triton"
    assert kernels.resolve_backend("torch", torch.device("cuda")) == "torch"


def test_workspace_made_in_inference_mode_is_replaced_outside_it(monkeypatch):
    x, p = _params(seed=7, requires_grad=False)
    monkeypatch.setattr(kernels._workspace, "pre", None, raising=False)  # made fresh, inside
    with torch.inference_mode():
        inside = topk_encode(x, _w(p), K)
    outside = topk_encode(x, _w(p), K)  # raised before the fix
    assert torch.equal(inside[1], outside[1])
