"""Transcoders and skip transcoders: the model against its definition written out densely in float64,
the paired loader, config errors, train -> evaluate -> analyze -> resume on a tiny GPT-2 store, and the
splice of a perfect prediction of an MLP's output from its input."""
import copy
import json

import numpy as np
import pytest
import torch

from saekit.autoencoders import Autoencoder, AutoencoderConfig, KernelOptions, build
from saekit.config import DataConfig, EvalConfig, TrainConfig, load_config
from saekit.data.loader import ActivationLoader
from saekit.data.store import StoreError, StoreReader
from saekit.errors import ConfigError, UserError
from saekit.evaluation import evaluate_run
from saekit.evaluation.downstream import downstream_metrics
from saekit.lm import load_lm, mlp_hooks
from saekit.lm.hooks import blocks_of
from saekit.training import train
from support import harvest_store, save_tiny, write_corpus

D, N, K, B = 12, 32, 4, 40
F64 = torch.float64
MLP_IN, MLP_OUT = mlp_hooks(0)


def randomized(kind="transcoder", seed=0, d_in=D, **fields):
    torch.manual_seed(seed)
    model = build(AutoencoderConfig.for_kind(kind, n_latents=N, k=K, **fields), d_in).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
        model.W_dec.div_(model.W_dec.norm(dim=-1, keepdim=True))
        model.b_in.copy_(torch.randn(d_in, generator=g, dtype=F64) * 0.2)
        model.input_scale.fill_(0.7)
        model.output_scale.fill_(1.3)
    return model


def pair(d_in=D, d_out=D, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d_in, generator=g, dtype=F64) * 2, torch.randn(B, d_out, generator=g, dtype=F64) * 3


def by_hand(model, x, y, dead):
    """The definition (transcoder.py's docstring), densely: TopK + ReLU, prediction, mse and AuxK."""
    x_c = x * model.input_scale - model.b_in
    pre = x_c @ model.W_enc + model.b_enc
    top = pre.topk(K, dim=-1).indices
    code = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top)).relu()
    y_hat_n = code @ model.W_dec + model.b_dec
    if model.skip:
        y_hat_n = y_hat_n + x_c @ model.W_skip
    y_n = y * model.output_scale
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    aux_top = aux_pre.topk(model.auxk_latents, dim=-1).indices
    aux_code = torch.zeros_like(pre).scatter(1, aux_top, pre.gather(1, aux_top)).relu()
    e = (y_n - y_hat_n).detach()
    auxk = model.cfg.auxk_alpha * ((aux_code @ model.W_dec - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    losses = {"mse": ((y_n - y_hat_n) ** 2).sum(-1).mean(), "auxk": auxk}
    return code, y_hat_n / model.output_scale, losses


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("d_out", [D, 7])
def test_forward_and_gradients_match_the_dense_definition(kind, fast, d_out):
    model = randomized(kind, d_out=d_out, auxk_latents=3)
    model.use_kernels(KernelOptions(fast_path=fast))
    x, y = pair(d_out=d_out)
    dead = torch.arange(N) % 4 == 0
    model.set_dead_mask(dead)
    out = model(x, y)
    code, y_hat, losses = by_hand(model, x, y, dead)
    assert out.x_hat.shape == (B, d_out) and model.d_out == d_out
    torch.testing.assert_close(out.dense_code(N), code)
    torch.testing.assert_close(out.x_hat, y_hat)
    assert out.losses.keys() == losses.keys()
    for name in losses:
        torch.testing.assert_close(out.losses[name], losses[name], msg=name)
    grads = []
    for loss in (out.loss, sum(losses.values())):  # the sparse backward against autograd's dense one
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    # Without a target (spliced into the LM) the same prediction, and no losses.
    assert torch.equal(model(x).x_hat, out.x_hat) and model(x).losses == {}


def test_skip_transcoder_at_init_is_the_transcoder():
    torch.manual_seed(3)
    plain = build(AutoencoderConfig.for_kind("transcoder", n_latents=N, k=K), D)
    torch.manual_seed(3)
    skip = build(AutoencoderConfig.for_kind("skip_transcoder", n_latents=N, k=K), D)
    assert torch.equal(skip.W_skip, torch.zeros(D, D))
    assert {k: v for k, v in skip.state_dict().items() if k != "W_skip"}.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(skip.state_dict()[name], value), name
    x, y = pair()
    a, b = plain(x.float(), y.float()), skip(x.float(), y.float())
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.loss, b.loss)
    b.loss.backward()
    assert skip.W_skip.grad.abs().sum() > 0  # ... and the skip path learns from the first step


def test_decode_is_the_dictionary_part_and_save_load_round_trips(tmp_path):
    model = randomized("skip_transcoder", d_out=7).float()
    x, y = pair(d_out=7)
    x = x.float()
    out = model(x)
    x_c = model.scale_in(x) - model.b_in
    torch.testing.assert_close(model.decode(out.dense_code(N)), out.x_hat - (x_c @ model.W_skip) / 1.3)
    model.save(tmp_path / "m")
    back = Autoencoder.load(tmp_path / "m")
    assert back.kind == "skip_transcoder" and back.d_out == 7 and back.predicts_target
    assert torch.equal(back(x).x_hat, out.x_hat)


# ---------------------------------------------------------------------------------- store, loader
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoder")
    model_dir = save_tiny("gpt2", root / "gpt2")
    store = harvest_store(model_dir, root / "store", write_corpus(root / "corpus.txt"), max_tokens=3000,
                          hooks=(MLP_IN, MLP_OUT))
    return {"root": root, "model_dir": model_dir, "store": store}


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    """Two hooks whose rows carry their store row's id: input column 0 = id, target column 0 = -id - 1."""
    from saekit.data.store import StoreWriter

    path = tmp_path_factory.mktemp("id_store")
    ctx, n_seq = 8, 40
    keep = torch.rand(n_seq, ctx, generator=torch.Generator().manual_seed(0)) > 0.25
    acts = {MLP_IN: torch.randn(n_seq, ctx, 5), MLP_OUT: torch.randn(n_seq, ctx, 5)}
    row = (keep.flatten().long().cumsum(0) - 1).view(n_seq, ctx).float()  # the row id of each kept token
    acts[MLP_IN][..., 0], acts[MLP_OUT][..., 0] = row, -row - 1
    w = StoreWriter(path, {"model": "synthetic", "context_size": ctx}, {}, [MLP_IN, MLP_OUT], 5, "float32",
                    shard_sequences=4)
    for s in range(0, n_seq, 6):
        w.add(torch.zeros(min(6, n_seq - s), ctx, dtype=torch.long), keep[s:s + 6],
              {h: a[s:s + 6] for h, a in acts.items()})
    w.finish()
    return StoreReader(path)


def test_loader_pairs_rows_of_the_same_store_row(id_store):
    n = id_store.n_rows
    assert torch.equal(id_store.activations(MLP_IN, (0, n))[:, 0], torch.arange(n).float())
    loader = ActivationLoader(id_store, MLP_IN, 16, buffer_tokens=50, seed=1, target_hook=MLP_OUT,
                              row_range=(0, n - 20), epochs=1)
    seen = []
    for x, y in loader:
        assert x.shape == y.shape == (16, 5) and x.dtype == y.dtype == torch.float32
        assert torch.equal(y[:, 0], -x[:, 0] - 1)  # row i's target is from row i's store row
        rows = x[:, 0].long()
        torch.testing.assert_close(y, id_store.activations(MLP_OUT, rows=rows), atol=0, rtol=0)
        seen.append(rows)
    seen = torch.cat(seen)
    full = (n - 20) // 16 * 16
    assert len(seen) == full and len(seen.unique()) == full and int(seen.max()) < n - 20  # once each
    assert not torch.equal(seen, seen.sort().values)  # ... shuffled
    # Alone, the input hook gives the same batches as the pairs' inputs: one shuffle serves both.
    single = ActivationLoader(id_store, MLP_IN, 16, buffer_tokens=50, seed=1, row_range=(0, n - 20), epochs=1)
    paired = ActivationLoader(id_store, MLP_IN, 16, buffer_tokens=50, seed=1, target_hook=MLP_OUT,
                              row_range=(0, n - 20), epochs=1)
    for a, (b, _) in zip(single, paired):
        assert torch.equal(a, b)


def test_loader_pairs_on_a_harvested_store(tiny):
    """On real MLP activations: each target is the MLP's output of its input's store row (inputs that
    repeat, e.g. one token at position 0, have the same output)."""
    reader = StoreReader(tiny["store"])
    xs = reader.activations(MLP_IN, (0, reader.n_rows), dtype=torch.float32)
    ys = reader.activations(MLP_OUT, (0, reader.n_rows), dtype=torch.float32)
    lookup = {tuple(row.tolist()): i for i, row in enumerate(xs)}
    loader = ActivationLoader(reader, MLP_IN, 100, buffer_tokens=700, seed=1, target_hook=MLP_OUT, epochs=1)
    for x, y in loader:
        assert torch.equal(y, ys[torch.tensor([lookup[tuple(r.tolist())] for r in x])])


def test_loader_pairs_resume_exactly(tiny):
    def loader():
        return ActivationLoader(tiny["store"], MLP_IN, 128, buffer_tokens=512, seed=3, target_hook=MLP_OUT)

    full = loader()
    it = iter(full)
    batches = [next(it) for _ in range(9)]
    part = loader()
    it = iter(part)
    for _ in range(5):
        next(it)
    state = part.state_dict()
    assert state["target_hook"] == MLP_OUT
    again = loader()
    again.load_state_dict(json.loads(json.dumps(state)))
    it = iter(again)
    for want in batches[5:]:
        got = next(it)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    unpaired = ActivationLoader(tiny["store"], MLP_IN, 128, buffer_tokens=512, seed=3)
    with pytest.raises(ValueError, match="target_hook"):
        unpaired.load_state_dict(state)
    with pytest.raises(StoreError, match=r"hook 'blocks.0.hook_mlp_post' is not in this store.*data.target_hook"):
        ActivationLoader(tiny["store"], MLP_IN, 128, target_hook="blocks.0.hook_mlp_post")


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("overrides,message", [
    ({"model.kind": "transcoder"}, r"^config key 'data.target_hook' is not set, but kind 'transcoder' predicts"),
    ({"model.kind": "skip_transcoder", "model.k": 8}, r"^config key 'data.target_hook' is not set"),
    ({"data.target_hook": MLP_OUT}, r"^config key 'data.target_hook' is set .* kind 'topk' reconstructs its "
                                    r"input; drop data.target_hook, or set model.kind to transcoder"),
    ({"model.kind": "gated", "data.target_hook": MLP_OUT}, "kind 'gated' reconstructs its input"),
    ({"model.kind": "transcoder", "data.target_hook": MLP_OUT, "model.l1_coefficient": 1},
     "'model.l1_coefficient' does not apply to kind 'transcoder'"),
    ({"model.kind": "transcoder", "data.target_hook": MLP_OUT, "model.d_out": 0}, "'model.d_out' must be >= 1"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TrainConfig, None, overrides)
    assert "\n" not in str(err.value)


def _cfg(tiny, name, kind="transcoder", **over):
    data = DataConfig(store=str(tiny["store"]), hook=MLP_IN, target_hook=MLP_OUT, batch_tokens=128,
                      buffer_tokens=512, heldout_tokens=600)
    fields = dict(out=str(tiny["root"] / name), total_tokens=2048, progress=False, device="cpu",
                  log_every_steps=4, lr=3e-3, data=data,
                  model=AutoencoderConfig.for_kind(kind, n_latents=128, k=8))
    fields.update(over)
    return TrainConfig(**fields)


def test_data_errors(tiny):
    with pytest.raises(ConfigError, match=r"'model.d_out' is 32, but the targets .* have width 64"):
        train(_cfg(tiny, "bad_dout", model=AutoencoderConfig.for_kind("transcoder", n_latents=128, k=8, d_out=32)))
    x = torch.randn(512, 64)
    with pytest.raises(UserError, match="trains on \\(input, target\\) pairs"):
        train(_cfg(tiny, "plain_iterable"), data=x.split(128))
    with pytest.raises(StoreError, match="data.target_hook"):
        train(_cfg(tiny, "bad_hook", data=DataConfig(store=str(tiny["store"]), hook=MLP_IN,
                                                    target_hook="blocks.1.hook_mlp_out")))


# --------------------------------------------------------------------------- end to end, resume
def test_train_evaluate_analyze_end_to_end(tiny):
    from saekit.analysis.report import FeatureReport

    results = {}
    for kind in ("transcoder", "skip_transcoder"):
        run = train(_cfg(tiny, kind, kind))
        res = evaluate_run(EvalConfig(run=str(run), device="cpu", downstream_sequences=4, error_check=True))
        results[kind] = res
        assert res["hook"] == MLP_IN and res["target_hook"] == MLP_OUT and res["kind"] == kind
        # FVU is of the prediction of the target, recomputed here from the held-out rows.
        reader = StoreReader(tiny["store"])
        start, stop = res["heldout_rows"]
        model = Autoencoder.load(run / "model")
        x = reader.activations(MLP_IN, (start, stop), dtype=torch.float32)
        y = reader.activations(MLP_OUT, (start, stop), dtype=torch.float32)
        with torch.no_grad():
            y_hat = model(x).x_hat.double()
        y = y.double()
        fvu = ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        assert res["reconstruction"]["fvu"] == pytest.approx(float(fvu), rel=1e-6)
        assert res["reconstruction"]["fvu"] < 0.9 and res["reconstruction"]["l0"] == pytest.approx(8, abs=0.1)
        down = res["downstream"]
        assert down["kind"] == "causal" and down["hook"] == MLP_OUT and down["source_hook"] == MLP_IN
        assert abs(down["loss_increase_with_error"]) < 1e-5  # the splice path itself changes nothing
        assert down["ce_spliced"] != down["ce_clean"]
        report = FeatureReport.build(run, device="cpu", progress=False)
        assert report.hook == MLP_IN and report.target_hook == MLP_OUT
        latent = report.pick_features(1)[0]
        card = report.card(latent)
        assert card.top and card.lens_title.startswith("logit lens of the predicted output")
        torch.testing.assert_close(report.directions, (model.W_dec / model.output_scale).detach())
        page = report.write_html(tiny["root"] / kind / "dash.html", [latent], worst=3)
        assert "Worst-predicted tokens" in page.read_text()
    # The skip path can only help a linear-plus-sparse fit of the MLP (same seed, data and budget).
    assert results["skip_transcoder"]["reconstruction"]["fvu"] < results["transcoder"]["reconstruction"]["fvu"]


def test_killed_and_resumed_transcoder_run_equals_uninterrupted(tiny, monkeypatch):
    from saekit.training.trainer import Trainer

    every = dict(checkpoint_every_tokens=512, total_tokens=1536)
    full = train(_cfg(tiny, "resume_full", "skip_transcoder", **every))
    step = Trainer._step

    def crash_at_step_7(self, *batch):
        if self.step == 7:
            raise KeyboardInterrupt  # stands in for a kill between checkpoints (steps 4 and 8)
        step(self, *batch)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny, "resume_cut", "skip_transcoder", **every))
    monkeypatch.setattr(Trainer, "_step", step)
    cut = train(_cfg(tiny, "resume_cut", "skip_transcoder", **every))
    from safetensors.torch import load_file

    for name in ("model/model.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"


# -------------------------------------------------------------------------------------- splicing
def test_perfect_prediction_splices_to_cosine_one_on_minilm():
    """A "transcoder" that returns the true MLP output of its input (the real MLP itself) leaves the
    sentence embedding unchanged; zero-ablating the MLP output does not."""
    lm = load_lm("all-MiniLM-L6-v2")
    block = blocks_of(lm)[3]
    # Copies: the splice hooks the model's own modules, which the prediction must not re-enter.
    intermediate, dense = copy.deepcopy(block.intermediate), copy.deepcopy(block.output.dense)
    mlp_in, mlp_out = mlp_hooks(3)
    batch = lm.tokenizer(["The cat sat on the mat.", "Return the sum of two numbers.",
                          "Open the file for reading and return a stream."], padding="max_length",
                         max_length=16, return_tensors="pt")
    res = downstream_metrics(lm, mlp_out, lambda h: dense(intermediate(h)),
                             batch.input_ids, batch.attention_mask, source_hook=mlp_in, error_check=True)
    assert res["kind"] == "encoder" and res["source_hook"] == mlp_in
    assert res["cosine_spliced"] == pytest.approx(1.0, abs=1e-6)
    assert res["cosine_with_error"] == pytest.approx(1.0, abs=1e-6)
    assert res["cosine_zero_ablated"] < 0.999
    # The input itself is no prediction of the output: spliced as one, it changes the embedding.
    wrong = downstream_metrics(lm, mlp_out, lambda h: h, batch.input_ids, batch.attention_mask,
                               source_hook=mlp_in)
    assert wrong["cosine_spliced"] < 0.999


@pytest.mark.parametrize("backend", ["hf", "transformer_lens"])
def test_perfect_prediction_recovers_all_ce_loss(tiny, backend):
    lm = load_lm(str(tiny["model_dir"]))
    mlp = copy.deepcopy(blocks_of(lm)[0].mlp)
    tokens = torch.stack([StoreReader(tiny["store"]).sequence(s) for s in range(4)])
    res = downstream_metrics(lm, MLP_OUT, mlp, tokens, source_hook=MLP_IN, backend=backend)
    assert abs(res["loss_increase"]) < 1e-5 and res["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(res["ce_zero_ablated"]) and res["ce_zero_ablated"] != res["ce_clean"]


def test_compare_report_puts_transcoders_in_their_own_table(tmp_path):
    from saekit.compare import PLOT_TRANSCODER, write_markdown

    def row(name, kind, fvu, target=None):
        return {"method": name, "kind": kind, "code_size": 64, "l0": 8.0, "fvu": fvu, "downstream": 0.99,
                "downstream_name": "cosine_spliced", "dead_pct": 0.0, "dead_window_tokens": 100,
                "hook": MLP_IN if target else "blocks.0.hook_resid_post", "target_hook": target}

    md = write_markdown([row("topk", "topk", 0.1), row("tc", "transcoder", 0.2, MLP_OUT)],
                        tmp_path / "compare.md").read_text()
    saes, transcoders = md.split("## Transcoders")
    assert "| topk |" in saes and "| tc |" not in saes
    assert "| tc |" in transcoders and f"predicts `{MLP_OUT}` from `{MLP_IN}`" in transcoders
    assert PLOT_TRANSCODER in transcoders
