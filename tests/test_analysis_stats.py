"""The streaming feature-statistics pass against a naive computation over all codes at once."""
import torch

from saekit.analysis.stats import FeatureStatsAccumulator


def _codes(n_tokens=3000, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    code = torch.relu(torch.randn(n_tokens, n, generator=g) - 1.0)  # ~16% dense, distinct values
    code[:, 7] = 0  # a latent that never fires
    code[:5, 3] = 0
    return code


def test_streaming_top_examples_match_naive_over_batch_sizes():
    code = _codes()
    rows = torch.arange(len(code)) + 1000
    for batch in (64, 1000, 3000):
        acc = FeatureStatsAccumulator(code.shape[1], top_k=10, n_sample=30, seed=1)
        for i in range(0, len(code), batch):
            acc.update(code[i:i + batch], rows[i:i + batch])
        st = acc.result()
        naive_val, naive_idx = code.topk(10, dim=0)  # [10, n]
        for j in range(code.shape[1]):
            n_fire = int((code[:, j] > 0).sum())
            m = min(10, n_fire)
            assert torch.equal(st.top_val[j, :m], naive_val[:m, j])
            assert torch.equal(st.top_row[j, :m], rows[naive_idx[:m, j]])
            assert (st.top_row[j, m:] == -1).all()
        assert torch.equal(st.fire_count, (code > 0).sum(0))
        assert torch.allclose(st.max_act, code.max(0).values)
        assert torch.allclose(st.mean_act.float(), code.sum(0) / (code > 0).sum(0).clamp(min=1), atol=1e-5)
        assert st.n_tokens == len(code)


def test_uniform_sample_holds_only_firing_entries_and_is_unbiased():
    code = _codes(n_tokens=4000, n=12, seed=2)
    rows = torch.arange(len(code))
    acc = FeatureStatsAccumulator(code.shape[1], top_k=5, n_sample=200, seed=3)
    for i in range(0, len(code), 256):
        acc.update(code[i:i + 256], rows[i:i + 256])
    st = acc.result()
    for j in range(code.shape[1]):
        ok = st.sample_row[j] >= 0
        r = st.sample_row[j][ok]
        assert len(r) == min(200, int((code[:, j] > 0).sum()))
        assert len(set(r.tolist())) == len(r)  # without replacement
        assert torch.equal(st.sample_val[j][ok], code[r, j])
        if len(r) == 200:  # a uniform sample's mean is close to the population mean, not the top's
            pop = code[code[:, j] > 0, j]
            assert abs(st.sample_val[j][ok].mean() - pop.mean()) < 4 * pop.std() / 200 ** 0.5
    bins = st.quantile_examples(0, n_bins=5, per_bin=3)
    assert len(bins) == 5 and bins[0][0][0] >= bins[-1][0][0]
