"""saekit.intervene on real (tiny, random) HF models: a GPT-2 causal LM and a BERT encoder (MiniLM's
architecture), with small untrained TopK SAEs, on the HF backend and TransformerLens 4's bridge."""
import dataclasses

import pytest
import torch

from saekit.autoencoders import AutoencoderConfig, build
from saekit.errors import UserError
from saekit.intervene import attach, tokens_html
from saekit.lm import load_lm, make_capture, splice
from support import save_tiny

HOOK = "blocks.0.hook_resid_post"
TEXT = "the cat runs over the big red house."


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def lm(request, tmp_path_factory):
    return load_lm(str(save_tiny(request.param, tmp_path_factory.mktemp(request.param))))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_lm(str(save_tiny("gpt2", tmp_path_factory.mktemp("gpt2_only"))))


def make_sae(d, n=96, k=6, seed=0):
    torch.manual_seed(seed)
    sae = build(AutoencoderConfig.for_kind("topk", n_latents=n, k=k), d)
    with torch.no_grad():
        sae.b_enc.add_(0.05)  # a few more clearly-positive pre-activations
    return sae.eval()


def clean_out(lm, ids, backend="hf"):
    """The model's output with nothing attached (on the bridge: an identity splice routes through it)."""
    with torch.no_grad():
        if backend == "hf":
            out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        else:
            with splice(lm, HOOK, lambda a: a, backend=backend):
                out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.logits if lm.is_causal else out.last_hidden_state)[0]


def with_replacement(lm, ids, fn):
    with torch.no_grad(), splice(lm, HOOK, fn):
        out = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.logits if lm.is_causal else out.last_hidden_state)[0]


def hook_act(lm, ids):
    with make_capture(lm, [HOOK]) as cap:
        return cap(ids)[HOOK]


# ------------------------------------------------------------------------------- attach, features
@pytest.mark.parametrize("backend", ["hf", "transformer_lens"])
def test_error_term_without_edits_is_exactly_the_clean_model(lm, backend):
    sae = make_sae(lm.d_model)
    with attach(lm, sae, hook=HOOK, backend=backend) as run:
        ids = run.tokenize(TEXT)
        assert torch.equal(run.forward(TEXT), clean_out(lm, ids, backend))
        acts = run.features(TEXT)
    # the model is clean again after the block: no hook left behind
    assert torch.equal(clean_out(lm, ids), clean_out(lm, ids))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())
    assert acts.dense().shape == (ids.shape[1], sae.n_latents)


def test_features_are_the_sae_code_aligned_with_tokens(lm):
    sae = make_sae(lm.d_model)
    with attach(lm, sae, hook=HOOK) as run:
        acts = run.features(TEXT)
        ids = run.tokenize(TEXT)
    assert acts.token_ids == ids[0].tolist() and len(acts.tokens) == ids.shape[1]
    assert acts.acts.is_sparse
    with torch.no_grad():
        expect = sae.encode(hook_act(lm, ids)[0])
    torch.testing.assert_close(acts.dense(), expect)
    assert all(len(acts.active(p)) <= 6 for p in range(len(acts.tokens)))


def test_attach_from_a_saved_directory(gpt2, tmp_path):
    sae = make_sae(gpt2.d_model)
    sae.save(tmp_path / "sae")
    with attach(gpt2, {HOOK: tmp_path / "sae"}) as run:
        loaded = run.features(TEXT).dense()
    with attach(gpt2, sae, hook=HOOK) as run:
        assert torch.equal(run.features(TEXT).dense(), loaded)


# ------------------------------------------------------------------------------- ablate, clamp, scale
def test_ablating_a_feature_subtracts_its_activation_times_decoder_row(lm):
    sae = make_sae(lm.d_model)
    with attach(lm, sae, hook=HOOK) as run:
        acts = run.features(TEXT).dense()
        ids = run.tokenize(TEXT)
        j = int(acts.sum(0).argmax())
        with run.ablate(j):
            got = run.forward(TEXT)
        with run.ablate(j, positions=[1, -1]):
            got_pos = run.forward(TEXT)
        assert torch.equal(run.forward(TEXT), clean_out(lm, ids))  # the edit is gone after its block
    d_j = sae.W_dec[j].detach() / sae.input_scale

    def by_hand(where):
        return lambda act: act - (acts[:, j] * where)[None, :, None] * d_j

    everywhere = torch.ones(ids.shape[1])
    some = torch.zeros(ids.shape[1])
    some[[1, -1]] = 1
    assert not torch.allclose(got, clean_out(lm, ids))
    torch.testing.assert_close(got, with_replacement(lm, ids, by_hand(everywhere)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_pos, with_replacement(lm, ids, by_hand(some)), atol=1e-5, rtol=1e-5)


def test_clamp_and_scale_move_along_the_decoder_row(gpt2):
    sae = make_sae(gpt2.d_model)
    with attach(gpt2, sae, hook=HOOK) as run:
        ids = run.tokenize(TEXT)
        acts = run.features(TEXT).dense()
        j = int(acts.sum(0).argmax())
        with run.clamp(j, 2.0, positions=slice(0, 3)):
            clamped = run.forward(TEXT)
        with run.scale(j, 3.0):
            scaled = run.forward(TEXT)
        with run.scale(j, 1.0):
            assert torch.equal(run.forward(TEXT), clean_out(gpt2, ids))
    d_j = sae.W_dec[j].detach() / sae.input_scale
    where = torch.zeros(ids.shape[1])
    where[:3] = 1
    torch.testing.assert_close(clamped, with_replacement(
        gpt2, ids, lambda a: a + ((2.0 - acts[:, j]) * where)[None, :, None] * d_j), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled, with_replacement(
        gpt2, ids, lambda a: a + (2.0 * acts[:, j])[None, :, None] * d_j), atol=1e-5, rtol=1e-5)


def test_without_error_term_the_hook_sees_the_reconstruction(lm):
    sae = make_sae(lm.d_model)
    with attach(lm, sae, hook=HOOK, error_term=False) as run:
        ids = run.tokenize(TEXT)
        got = run.forward(TEXT)
    recon = with_replacement(lm, ids, lambda a: sae(a.reshape(-1, a.shape[-1])).x_hat.view_as(a))
    torch.testing.assert_close(got, recon, atol=1e-5, rtol=1e-5)


def test_the_bridge_backend_matches_the_hf_backend(lm):
    sae = make_sae(lm.d_model)
    outs = {}
    for backend in ("hf", "transformer_lens"):
        with attach(lm, sae, hook=HOOK, backend=backend) as run:
            j = int(run.features(TEXT).dense().sum(0).argmax())
            run.ablate(j)
            outs[backend] = run.forward(TEXT)
            target = " the" if lm.is_causal else "a dog reads."
            outs[backend + "-attr"] = run.attribute(TEXT, target).scores[HOOK]
            if lm.is_causal:
                outs[backend + "-gen"] = run.generate("the cat", 5, steer=2, coef=20.0)
    torch.testing.assert_close(outs["hf"], outs["transformer_lens"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["hf-attr"], outs["transformer_lens-attr"], atol=1e-5, rtol=1e-3)
    assert outs.get("hf-gen") == outs.get("transformer_lens-gen")


# ------------------------------------------------------------------------------- steering
def test_steering_generation(gpt2):
    sae = make_sae(gpt2.d_model)
    with attach(gpt2, sae, hook=HOOK) as run:
        plain = run.generate("the cat", 8)
        assert run.generate("the cat", 8, steer=5, coef=0.0) == plain
        steered = run.generate("the cat", 8, steer=5, coef=50.0)
        assert steered != plain
        assert run.generate("the cat", 8) == plain  # a call's steering ends with the call
        a = run.generate("the cat", 6, greedy=False, temperature=1.5, top_k=20, seed=3)
        assert a == run.generate("the cat", 6, greedy=False, temperature=1.5, top_k=20, seed=3)
        ids = run.tokenize("the cat")
        v = torch.randn(gpt2.d_model)
        with run.steer(v, 2.0, hook="blocks.1.hook_resid_pre"):  # a hook with no SAE
            got = run.forward("the cat")
        torch.testing.assert_close(got, with_replacement(gpt2, ids, lambda a: a + 2.0 * v), atol=1e-5, rtol=1e-5)


def test_steering_an_encoder_forward_pass(lm):
    sae = make_sae(lm.d_model)
    with attach(lm, sae, hook=HOOK) as run:
        ids = run.tokenize(TEXT)
        with run.steer(3, 0.0):
            assert torch.equal(run.forward(TEXT), clean_out(lm, ids))
        with run.steer(3, 10.0, positions=[2]):
            got = run.forward(TEXT)
        d = run.direction(3)
    torch.testing.assert_close(d, sae.W_dec[3].detach() / sae.input_scale)
    where = torch.zeros(ids.shape[1])
    where[2] = 1
    torch.testing.assert_close(got, with_replacement(lm, ids, lambda a: a + 10.0 * where[None, :, None] * d),
                               atol=1e-5, rtol=1e-5)
    if not lm.is_causal:
        with attach(lm, sae, hook=HOOK) as run:
            clean = run.embed(TEXT)
            with run.steer(3, 10.0):
                assert torch.nn.functional.cosine_similarity(run.embed(TEXT), clean, dim=0) < 0.999


# ------------------------------------------------------------------------------- attribution
def as_float64(lm):
    lm.model.double()
    return dataclasses.replace(lm, dtype=torch.float64)


def test_attribution_matches_finite_differences(lm):
    lm64 = as_float64(lm)
    try:
        sae = make_sae(lm.d_model).double()
        with torch.no_grad():  # small activations (a_j |d_j| << |x|): ablation stays in the linear regime
            sae.W_enc.mul_(0.05)
            sae.b_enc.mul_(0.05)
        target = " the" if lm.is_causal else "a dog reads the stone."
        with attach(lm64, sae, hook=HOOK) as run:
            attr = run.attribute(TEXT, target)
            base = run.target_value(TEXT, target)
            assert attr.target == pytest.approx(base, rel=1e-9, abs=1e-12)
            top = attr.top(4)
            assert top and all(r["activation"] > 0 for r in top)
            for r in top:
                with torch.no_grad():
                    eps = 1e-4  # d target / d(scale of this feature), at scale 1
                    with run.scale(r["feature"], 1 - eps, positions=[r["position"]]):
                        fd = (base - run.target_value(TEXT, target)) / eps
                    with run.ablate(r["feature"], positions=[r["position"]]):
                        ablated = base - run.target_value(TEXT, target)
                assert r["attribution"] == pytest.approx(fd, rel=1e-3)
                assert r["attribution"] == pytest.approx(ablated, rel=0.05)
    finally:
        lm.model.float()


def test_attribution_is_one_backward_pass_over_several_saes(gpt2):
    saes = {HOOK: make_sae(gpt2.d_model, seed=1), "blocks.1.hook_resid_post": make_sae(gpt2.d_model, seed=2)}
    with attach(gpt2, saes) as run:
        attr = run.attribute(TEXT, (" the", " c"), dashboard="runs/x/dashboard")
        rows = attr.top(5)
    assert set(attr.scores) == set(saes)
    assert {r["hook"] for r in attr.top(50)} <= set(saes)
    assert rows == sorted(rows, key=lambda r: -abs(r["attribution"]))
    assert "<table>" in attr._repr_html_()
    assert rows[0]["link"] == f"runs/x/dashboard/index.html#f{rows[0]['feature']}"


# ------------------------------------------------------------------------------- bad input
def one_line_error(fn, *needles):
    with pytest.raises(UserError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_bad_input_is_a_one_line_user_error(gpt2):
    sae = make_sae(gpt2.d_model)
    one_line_error(lambda: attach(gpt2, make_sae(32), hook=HOOK), "32", "d_model 64", HOOK)
    one_line_error(lambda: attach(gpt2, sae, hook="blocks.9.hook_resid_post"), "blocks.9.hook_resid_post", "2 layers")
    one_line_error(lambda: attach(gpt2, sae, hook="blocks.0.hook_resid_mid"), "blocks.0.hook_resid_mid")
    one_line_error(lambda: attach(gpt2, sae), "hook")
    with attach(gpt2, sae, hook=HOOK) as run:
        one_line_error(lambda: run.ablate(96), "96", "96 features")
        one_line_error(lambda: run.clamp([3, -1], 1.0), "-1")
        one_line_error(lambda: run.features(TEXT, hook="blocks.1.hook_resid_post"), "no SAE is attached")
        one_line_error(lambda: run.steer(torch.zeros(10)), "10", "d_model 64")
        one_line_error(lambda: run.steer(torch.zeros(64), hook="blocks.0.hook_nope"), "blocks.0.hook_nope")
        one_line_error(lambda: run.attribute(TEXT, "the cat runs"), "tokens")
        with run.ablate(1, positions=[40]):
            one_line_error(lambda: run.forward(TEXT), "position 40")
    one_line_error(lambda: run.forward(TEXT), "not attached")


# ------------------------------------------------------------------------------- display
def test_html_escapes_every_token(gpt2):
    sae = make_sae(gpt2.d_model)
    with attach(gpt2, sae, hook=HOOK) as run:
        acts = run.features("<b>cat</b> & dog")
        with run.ablate(list(range(10))):
            table = run.compare("<i>the</i> cat")
    page = tokens_html(acts)
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page
    assert page == acts._repr_html_()
    assert "<i>" not in table._repr_html_() and len(table.before) == 5
    assert "before" in str(table)
