"""evaluation.prefixes: the reconstruction by latents [0, m) alone, against a dense float64 reference."""
import pytest
import torch

from saekit.autoencoders import AutoencoderConfig, build
from saekit.data.store import StoreReader
from saekit.evaluation.prefixes import prefix_metrics
from test_import_run import HOOK, synthetic_store


def test_prefix_metrics_against_a_dense_reference(tmp_path):
    reader = StoreReader(synthetic_store(tmp_path / "store", d=13))
    model = build(AutoencoderConfig.for_kind("matryoshka", n_latents=40, k=6, group_fractions=[0.25, 0.25, 0.5]), 13)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.W_enc.copy_(torch.randn(13, 40, generator=g))
        model.b_enc.copy_(0.1 * torch.randn(40, generator=g))
        model.b_dec.copy_(0.3 * torch.randn(13, generator=g))
        model.input_scale.fill_(0.6)
        model.threshold.fill_(0.5)
    model.eval()
    rows = (100, 400)
    got = prefix_metrics(model, reader, HOOK, rows, [10, 20, 40], batch_size=64)  # batches split the rows
    x = reader.activations(HOOK, rows, dtype=torch.float64)
    s = 0.6
    pre = ((x * s - model.b_dec.double()) @ model.W_enc.double() + model.b_enc.double()).relu()
    code = pre * (pre > 0.5)
    for r, m in zip(got, [10, 20, 40]):
        x_hat = (code[:, :m] @ model.W_dec.double()[:m] + model.b_dec.double()) / s
        fvu = (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()
        assert r["latents"] == m
        assert r["fvu"] == pytest.approx(fvu.item(), rel=1e-5)
        assert r["l0"] == pytest.approx((code[:, :m] != 0).sum(-1).double().mean().item(), rel=1e-9)
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
        assert r["cosine"] == pytest.approx(cos.item(), rel=1e-5)
    assert len({round(r["fvu"], 6) for r in got}) == 3 and 0 < got[0]["l0"] < got[2]["l0"]  # prefixes differ
    with pytest.raises(ValueError, match="prefix ends"):
        prefix_metrics(model, reader, HOOK, rows, [0])


def test_evaluate_reports_a_matryoshkas_group_prefixes(tmp_path):
    from saekit.config import EvalConfig
    from saekit.evaluation.evaluate import evaluate_model

    reader = StoreReader(synthetic_store(tmp_path / "store", d=13))
    model = build(AutoencoderConfig.for_kind("matryoshka", n_latents=40, k=6, group_fractions=[0.25, 0.75]), 13)
    with torch.no_grad():
        model.threshold.fill_(0.1)
    result = evaluate_model(model.eval(), reader, HOOK, EvalConfig(downstream=False, probe=False, suite=["core"]), 200)
    prefixes = result["reconstruction"]["prefixes"]
    assert [p["latents"] for p in prefixes] == [10, 40]
    assert prefixes[-1]["fvu"] == pytest.approx(result["reconstruction"]["fvu"], rel=1e-6)
