"""Downstream metrics by splicing into tiny random GPT-2 and BERT models (saved to tmp_path, never the hub).

The definitions are pinned by cases whose answer is known exactly: the reconstruction with its error
added back changes nothing (zero loss increase, KL 0, cosine 1), the identity recovers 1, zeros recover 0.
"""
import math

import pytest
import torch

from saekit.autoencoders import build
from saekit.autoencoders import AutoencoderConfig
from saekit.evaluation.downstream import (ce_loss_recovered, downstream_metrics, embedding_recovered,
                                         fraction_recovered, mean_activation, splice_positions)
from saekit.lm import load_lm
from support import HOOK, corpus, save_tiny

FAMILIES = ["gpt2", "bert"]


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: load_lm(str(save_tiny(f, root / f))) for f in FAMILIES}


def _tokens(lm, n=6, ctx=24):
    from saekit.data.tokens import iter_windows

    windows = iter_windows(lm.tokenizer, corpus(60), ctx)
    return torch.stack([w for _, w in zip(range(n), windows)])


def _sae(d=64, kind="topk"):
    torch.manual_seed(0)
    return build(AutoencoderConfig.for_kind(kind, n_latents=128, k=8), d)


def test_recovered_formula():
    assert fraction_recovered(2.0, 2.0, 5.0) == 1.0
    assert fraction_recovered(2.0, 5.0, 5.0) == 0.0
    assert fraction_recovered(2.0, 3.5, 5.0) == pytest.approx(0.5)
    assert math.isnan(fraction_recovered(2.0, 3.0, 2.0))
    assert ce_loss_recovered(3.0, 3.0, 7.0) == 1.0
    assert embedding_recovered(1.0, 0.2) == 1.0 and embedding_recovered(0.2, 0.2) == 0.0
    assert embedding_recovered(0.6, 0.2) == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["hf", "transformer_lens"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_reconstruction_gives_zero_loss_increase(lms, family, backend):
    lm = lms[family]
    tokens = _tokens(lm)
    res = downstream_metrics(lm, HOOK, _sae(), tokens, backend=backend, error_check=True)
    assert res["backend"] == backend and res["sequences"] == len(tokens)
    if family == "gpt2":
        assert res["kind"] == "causal"
        assert abs(res["loss_increase_with_error"]) < 1e-5
        assert abs(res["kl_clean_with_error"]) < 1e-6
        # ... while the reconstruction alone (a random SAE) really changes the output.
        assert abs(res["loss_increase"]) > 1e-4 and res["kl_clean_spliced"] > 1e-4
        assert res["loss_increase"] == pytest.approx(res["ce_spliced"] - res["ce_clean"])
    else:
        assert res["kind"] == "encoder"
        assert res["cosine_with_error"] == pytest.approx(1.0, abs=1e-6)
        assert res["cosine_spliced"] < 0.9999


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_recovers_one_and_ablation_zero(lms, family):
    lm = lms[family]
    tokens = _tokens(lm)
    same = downstream_metrics(lm, HOOK, lambda x: x, tokens)
    zero = downstream_metrics(lm, HOOK, torch.zeros_like, tokens)
    if family == "gpt2":
        assert same["ce_spliced"] == same["ce_clean"] and same["loss_increase"] == 0.0
        assert same["ce_loss_recovered"] == 1.0 and same["ce_loss_recovered_mean"] == 1.0
        assert same["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-7)  # KL(clean || clean)
        assert zero["ce_spliced"] == zero["ce_zero_ablated"] and zero["ce_loss_recovered"] == 0.0
        assert zero["kl_clean_spliced"] == pytest.approx(zero["kl_clean_zero_ablated"])
        # the causal predictions are counted once per adjacent pair of real tokens
        assert same["predictions"] == tokens.numel() - len(tokens)
    else:
        assert same["cosine_spliced"] == pytest.approx(1.0, abs=1e-6)
        assert same["embedding_recovered"] == pytest.approx(1.0, abs=1e-6)
        assert zero["cosine_spliced"] == zero["cosine_zero_ablated"] and zero["embedding_recovered"] == 0.0


def test_positions_and_mean(lms):
    lm = lms["bert"]
    tokens = _tokens(lm)
    mask = torch.ones_like(tokens)
    real = splice_positions(lm.tokenizer, tokens, mask, "real")
    assert not real[:, 0].any() and not real[:, -1].any()  # [CLS] ... [SEP] stay clean
    assert splice_positions(lm.tokenizer, tokens, mask, "all").all()
    res = downstream_metrics(lm, HOOK, lambda x: x, tokens, positions="all")
    assert res["spliced_positions"] == tokens.numel()
    with pytest.raises(ValueError, match="positions"):
        splice_positions(lm.tokenizer, tokens, mask, "most")
    # The default mean for mean-ablation is the activation mean over the spliced positions.
    from saekit.lm import make_capture

    with make_capture(lm, [HOOK]) as cap:
        acts = cap(tokens, mask)[HOOK]
    mean = mean_activation(lm, HOOK, tokens, lambda ids, m: splice_positions(lm.tokenizer, ids, m, "real"),
                           batch_size=4)
    torch.testing.assert_close(mean, acts[real].double().mean(0), atol=1e-5, rtol=0)
    # Passing that mean gives the same mean-ablated numbers as computing it.
    a = downstream_metrics(lm, HOOK, _sae(), tokens)
    b = downstream_metrics(lm, HOOK, _sae(), tokens, mean=mean)
    assert a["cosine_mean_ablated"] == pytest.approx(b["cosine_mean_ablated"], abs=1e-6)
