"""`evaluate_run` end to end on a tiny random GPT-2 store, plus the probe, anomaly scores and RBM sampling."""
import json

import pytest
import torch

from saekit.analysis import token_scores, worst_contexts
from saekit.autoencoders import Autoencoder, AutoencoderConfig, KernelOptions, RBMConfig, TopKConfig, build
from saekit.cli import main as cli_main
from saekit.config import DataConfig, EvalConfig, TrainConfig
from saekit.data.store import StoreReader
from saekit.evaluation import evaluate_run
from saekit.evaluation.evaluate import heldout_sequences
from saekit.metrics import evaluate as metrics_evaluate
from saekit.evaluation.probe import continues_word, train_probe
from saekit.evaluation.sampling import moment_errors, rbm_moment_check
from saekit.lm import load_lm
from saekit.schema import from_dict
from saekit.training import train
from support import HOOK, harvest_store, save_tiny, write_corpus

N_ROWS, HELDOUT = 3000, 1000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_tiny("gpt2", root / "gpt2")
    store = harvest_store(model_dir, root / "store", write_corpus(root / "corpus.txt"), max_tokens=N_ROWS)
    cfg = TrainConfig(out=str(root / "run"), total_tokens=2048, progress=False, device="cpu", log_every_steps=4,
                      data=DataConfig(store=str(store), hook=HOOK, batch_tokens=256, buffer_tokens=1024,
                                      heldout_tokens=HELDOUT),
                      model=TopKConfig(n_latents=128, k=8))
    return {"dir": train(cfg), "store": store, "model_dir": model_dir}


def _rows(store, start, stop):
    return StoreReader(store).activations(HOOK, (start, stop), dtype=torch.float32)


def test_evaluate_run_writes_json_beside_the_model(run):
    cfg = EvalConfig(run=str(run["dir"]), downstream_sequences=6, probe=True, probe_tokens=900, device="cpu")
    res = evaluate_run(cfg)
    assert json.loads((run["dir"] / "eval.json").read_text()) == res
    assert (run["dir"] / "density.png").stat().st_size > 0
    # The held-out rows are the last rows of the store, exactly the ones the trainer left out.
    assert res["heldout_rows"] == [N_ROWS - HELDOUT, N_ROWS] and res["heldout_rows_seen_in_training"] == 0
    rec = res["reconstruction"]
    model = Autoencoder.load(run["dir"] / "model")
    ref = metrics_evaluate(model, _rows(run["store"], N_ROWS - HELDOUT, N_ROWS).split(300)).compute()
    for key in ("fvu", "mse", "l0", "dead_fraction", "cosine"):
        assert rec[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    assert rec["dead_window_tokens"] == HELDOUT
    hist = rec["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 128
    down = res["downstream"]
    assert down["kind"] == "causal" and down["windows_held_out"] and down["sequences"] == 6
    assert abs(down["loss_increase_with_error"]) < 1e-5
    assert down["ce_loss_recovered"] == pytest.approx(
        (down["ce_zero_ablated"] - down["ce_spliced"]) / (down["ce_zero_ablated"] - down["ce_clean"]))
    probe = res["probe"]
    assert probe["property"] == "continues_word" and 0 <= probe["accuracy"] <= 1
    assert probe["accuracy_raw"] > probe["chance"]  # token identity is in the layer-0 residual
    assert res["training"]["tokens_per_s"] > 0


def test_dead_window_and_cli(run, tmp_path, capsys):
    out = tmp_path / "e.json"
    code = cli_main(["evaluate", str(run["dir"]), "--downstream", "false", "--dead_window_tokens", "100",
                     "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    assert "downstream" not in res and res["reconstruction"]["dead_window_tokens"] == 100
    full = evaluate_run(EvalConfig(run=str(run["dir"]), downstream=False, device="cpu",
                                   out=str(tmp_path / "full.json")))["reconstruction"]
    assert full["fvu"] == res["reconstruction"]["fvu"]  # FVU, L0 still over all held-out rows
    assert full["dead_window_tokens"] == HELDOUT
    # fewer tokens can only leave more latents dead
    assert res["reconstruction"]["dead_fraction"] >= full["dead_fraction"]


def test_downstream_windows_are_held_out(run):
    reader = StoreReader(run["store"])
    first = N_ROWS - HELDOUT
    tokens, held_out = heldout_sequences(reader, first, 4)
    assert held_out and tokens.shape == (4, reader.context_size)
    seqs, _, _ = reader.token_info((first - 1, first + 1))
    # the windows come after the sequence the held-out boundary cuts through, in order
    start = int(seqs[1]) + int(seqs[0] == seqs[1])
    for i in range(4):
        assert torch.equal(tokens[i], reader.sequence(start + i))
    row_seq, _, _ = reader.token_info((0, first))
    assert int(row_seq.max()) < start  # no training row comes from these windows


def test_anomaly_scores_and_worst_contexts(run):
    model = Autoencoder.load(run["dir"] / "model")
    x = _rows(run["store"], 2000, 3000)
    scores = token_scores(model, x)
    ref = metrics_evaluate(model, [x]).compute()
    assert scores.mean().item() == pytest.approx(ref["mse"], rel=1e-5)  # mean score = MSE
    worst = worst_contexts(model, run["store"], top=5, rows=(2000, 3000), batch_size=256)
    assert [w["row"] for w in worst] == (2000 + scores.argsort(descending=True)[:5]).tolist()
    assert [w["score"] for w in worst] == pytest.approx(scores.sort(descending=True).values[:5].tolist())
    tok = load_lm(str(run["model_dir"])).tokenizer
    reader = StoreReader(run["store"])
    for w in worst:
        assert w["context"][w["index"]] == w["token"] and f"[[{w['token']}]]" in w["text"]
        ids, index = reader.context(w["sequence"], w["position"], 8, 4)
        assert w["context"] == [tok.decode([i]) for i in ids] and index == w["index"]
    rel = worst_contexts(model, run["store"], top=3, rows=(2000, 3000), relative=True, tokenizer=tok)
    norm = (x.double() - x.double().mean(0)).square().sum(-1)
    assert [w["row"] for w in rel] == (2000 + (scores.double() / norm).argsort(descending=True)[:3]).tolist()


# ----------------------------------------------------------------------------------------- probe
def test_probe_beats_chance_on_an_easy_property():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 20, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.3)
    res = train_probe(x[:2000], y[:2000], x[2000:], y[2000:])
    assert res["accuracy"] > 0.95 and res["accuracy"] > res["chance"] + 0.3
    noise = train_probe(x[:2000], torch.rand(2000, generator=g) > 0.5, x[2000:], y[2000:])
    assert noise["accuracy"] < 0.65  # labels unrelated to x: nothing to learn


def test_word_continuation_labels(tmp_path):
    bert = load_lm(str(save_tiny("bert", tmp_path / "bert"))).tokenizer
    ids = torch.tensor([bert("the playing cats.")["input_ids"]])
    assert bert.convert_ids_to_tokens(ids[0]) == ["[CLS]", "the", "play", "##ing", "cat", "##s", ".", "[SEP]"]
    assert continues_word(bert, ids)[0].tolist() == [False, False, False, True, False, True, False, False]
    gpt2 = load_lm(str(save_tiny("gpt2", tmp_path / "gpt2"))).tokenizer
    text = " the playing cats. big"
    ids = torch.tensor([gpt2(text)["input_ids"]])
    pieces = gpt2.convert_ids_to_tokens(ids[0])
    labels = continues_word(gpt2, ids)[0].tolist()
    # every token continues a word exactly when it does not open one: rebuild the words from the labels
    words, current = [], ""
    for piece, cont in zip(pieces, labels):
        if not cont and current:
            words.append(current)
            current = ""
        current += piece.replace("Ġ", " ")
    words.append(current)
    assert [w.strip() for w in words] == ["the", "playing", "cats", ".", "big"]


# ---------------------------------------------------------------------------------- RBM sampling
def test_moment_errors_definition():
    x = torch.randn(5000, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 1
    same = moment_errors(x, x)
    assert same["mean_error"] == 0 and same["cov_error"] == 0 and same["var_ratio"] == pytest.approx(1)
    shifted = moment_errors(x + torch.tensor([0.0, 0.0, 0.0, 30 ** 0.5]), x)
    assert shifted["mean_error"] == pytest.approx(1.0, rel=0.05)  # sqrt(tr cov) = sqrt(30)


def test_rbm_gibbs_samples_approach_the_data_moments(tmp_path):
    torch.manual_seed(0)
    d = 12
    mix, mu = torch.randn(3, d) * 1.5, torch.randn(d)

    def batches(n=256):
        g = torch.Generator().manual_seed(1)
        while True:
            yield torch.randn(n, 3, generator=g) @ mix + mu + 0.5 * torch.randn(n, d, generator=g)

    cfg = TrainConfig(out=str(tmp_path / "rbm"), total_tokens=256 * 250, lr=3e-3, progress=False,
                      device="cpu", log_every_steps=50,
                      model=RBMConfig(n_latents=24, persistent=True))
    model = Autoencoder.load(train(cfg, data=batches()) / "model")
    data = next(batches(4000))
    res = rbm_moment_check(model, data, n_samples=800, steps=100)
    untrained = build(cfg.model, d)
    untrained.input_scale.copy_(model.input_scale)
    before = rbm_moment_check(untrained, data, n_samples=800, steps=100)
    assert res["cov_error"] < res["cov_error_start"] and res["cov_error"] < 0.75 * before["cov_error"]
    assert res["mean_error"] < 0.25


def test_fast_path_reaches_the_naive_heldout_fvu_on_minilm(minilm_run, tmp_path):
    """Issue 6's quality bar at CI size: the sparse-kernel TopK and the dense reference, trained alike
    on real MiniLM activations, reach held-out FVUs within 1% of each other (the full-size check on the
    built-in store is in the closing note: 0.09829 vs 0.09833)."""
    cfg = json.loads((minilm_run / "config.json").read_text())
    naive = train(TrainConfig(out=str(tmp_path / "naive"), total_tokens=cfg["total_tokens"], progress=False,
                              lr=cfg["lr"], data=DataConfig(**cfg["data"]),
                              model=from_dict(AutoencoderConfig, cfg["model"]),
                              kernels=KernelOptions(fast_path=False)))
    fvu = {}
    for name, run in (("fast", minilm_run), ("naive", naive)):
        result = evaluate_run(EvalConfig(run=str(run), downstream=False, out=str(tmp_path / f"{name}.json")))
        fvu[name] = result["reconstruction"]["fvu"]
    assert 0 < fvu["fast"] < 0.8  # it learned something: the mean alone gives 1
    assert abs(fvu["fast"] - fvu["naive"]) / fvu["naive"] < 0.01, fvu
