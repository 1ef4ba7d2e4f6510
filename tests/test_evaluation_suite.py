"""The evaluation suite (saekit/evaluation/{absorption,probing,autointerp,saebench,suite}.py): each metric
against a case whose answer is known by construction, the chat explainer against a real local HTTP
server, the one-line errors, and the whole suite on the built-in MiniLM with results in both forms."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from saekit.autoencoders import build
from saekit.autoencoders.relu_l1 import ReLUConfig
from saekit.config import EvalConfig, load_config
from saekit.errors import ConfigError, UserError
from saekit.evaluation.absorption import LETTERS, absorption_scores
from saekit.evaluation.autointerp import ChatExplainer, Rows, TokenSetExplainer, interpret_latents
from saekit.evaluation.probing import probe_task

L, S = len(LETTERS), LETTERS.index("s")
GROUPS, PER_GROUP = 10, 3


# ------------------------------------------------------------------------------------ absorption
def first_letter_examples(n_per=200, d=64, seed=0):
    """Activations = 3 * (the letter's direction) + noise; 30 of the 's' words (10 groups of 3, each its
    own clean direction, like tokens with their own latent) carry their group's direction too."""
    g = torch.Generator().manual_seed(seed)
    letter = torch.arange(L).repeat_interleave(n_per)
    x = 0.3 * torch.randn(len(letter), d, generator=g)
    x[torch.arange(len(letter)), letter] += 3.0
    x[:, L:L + GROUPS] = 0.0
    group = torch.full((len(letter),), -1)
    s_rows = (letter == S).nonzero().flatten()
    for j in range(GROUPS):
        rows = s_rows[j * PER_GROUP:(j + 1) * PER_GROUP]
        x[rows, L + j] += 3.0
        group[rows] = j
    return x, letter, torch.rand(len(letter), generator=g) < 0.8, group


def letter_sae(d=64, absorb=False):
    """Latent j < 26 reads and writes letter j's direction (exactly what a probe finds); latent 26 + g
    reads group g's direction. With ``absorb`` the group latents also write 's' and silence its latent."""
    m = build(ReLUConfig(n_latents=L + GROUPS), d_in=d)
    with torch.no_grad():
        m.W_enc.zero_(), m.W_dec.zero_(), m.b_dec.zero_(), m.b_enc.fill_(-1.5)
        for j in range(L + GROUPS):
            m.W_enc[j, j], m.W_dec[j, j] = 1.0, 2.0
        if absorb:
            m.W_enc[L:L + GROUPS, S] = -2.0
            m.W_dec[L:L + GROUPS, S] = 2.0
    return m


def test_absorption_is_zero_for_probe_direction_latents_and_counts_each_absorbed_word(one_thread):
    x, letter, train, group = first_letter_examples()
    clean = absorption_scores(letter_sae(), x, letter, train)
    assert clean["letters_evaluated"] == L and clean["mean_absorption_fraction"] == 0.0
    assert clean["mean_full_absorption"] == 0.0 and clean["mean_num_split_features"] == 1
    assert all(d["split_features"] == [LETTERS.index(d["first_letter"])] for d in clean["letters"])

    absorbed = absorption_scores(letter_sae(absorb=True), x, letter, train)
    s = next(d for d in absorbed["letters"] if d["first_letter"] == "s")
    test_s = ~train & (letter == S)
    expected = (test_s & (group >= 0)).sum().item() / test_s.sum().item()  # every group word is absorbed
    assert s["split_features"] == [S] and s["num_probe_true_positives"] == test_s.sum().item()
    assert s["mean_absorption_fraction"] == pytest.approx(expected) and expected > 0.05
    assert s["full_absorption_rate"] == pytest.approx(expected)
    others = [d["mean_absorption_fraction"] for d in absorbed["letters"] if d["first_letter"] != "s"]
    assert max(others) == 0.0
    assert absorbed["mean_absorption_fraction"] == pytest.approx(expected / L)


# --------------------------------------------------------------------------------------- probing
def test_probing_recovers_a_planted_feature_at_k1(one_thread):
    g = torch.Generator().manual_seed(1)
    n, n_lat, d = 800, 300, 32
    y = torch.rand(n, generator=g) < 0.5
    codes = torch.relu(torch.randn(n, n_lat, generator=g) - 1.0)  # sparse noise latents
    codes[:, 123] = y * (1 + torch.rand(n, generator=g))  # the planted feature
    acts = torch.randn(n, d, generator=g)  # carries nothing about y
    test = torch.arange(n) % 5 == 0
    basis, mean = torch.linalg.qr(torch.randn(d, 20, generator=g))[0], torch.zeros(d)
    r = probe_task(codes, acts, y, test, [1, 2, 5, 20], basis, mean)
    assert r["top_latents"][0] == 123
    assert r["sae_top_1_test_accuracy"] == 1.0
    assert r["llm_top_1_test_accuracy"] < 0.7 and r["pca_top_1_test_accuracy"] < 0.7


# ---------------------------------------------------------------------------------- autointerp
class DigitTokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split() if w.startswith("t") and w[1:].isdigit()]}


def token_rows(seed, n_seq=300, ctx=32, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return Rows(torch.randint(vocab, (n_seq * ctx,), generator=g), torch.arange(n_seq).repeat_interleave(ctx),
                torch.arange(ctx).repeat(n_seq))


def synthetic_latents(rows, seed):
    """Column 0 fires exactly on token 7; columns 1..20 fire on 1% of tokens at random."""
    g = torch.Generator().manual_seed(seed)
    one = (rows.token == 7).float() * (1 + torch.rand(len(rows), generator=g))
    rand = (torch.rand(len(rows), 20, generator=g) < 0.01).float() * torch.rand(len(rows), 20, generator=g)
    return torch.cat([one[:, None], rand], 1)


def test_detection_score_is_one_for_a_one_token_latent_and_chance_for_random_ones(one_thread):
    gen_rows, score_rows = token_rows(0), token_rows(1)
    res = interpret_latents(synthetic_latents(gen_rows, 2), gen_rows, synthetic_latents(score_rows, 3),
                            score_rows, TokenSetExplainer(DigitTokenizer()), width=4)
    assert res["latents"][0]["explanation"] == "'t7'" and res["latents"][0]["score"] == 1.0
    random_scores = [d["score"] for d in res["latents"][1:]]
    assert abs(sum(random_scores) / len(random_scores) - 0.5) < 0.08


class ChatHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: answers the most frequent <<marked>> token."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][-1]["content"]
        marked = [piece.split(">>")[0] for piece in text.split("<<")[1:]]
        answer = max(set(marked), key=marked.count) if marked else "nothing"
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_chat_explainer_against_a_local_openai_compatible_server(monkeypatch, one_thread):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("SAEKIT_TEST_KEY", "sk-local")
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        explainer = ChatExplainer(DigitTokenizer(), url, "local-model", "SAEKIT_TEST_KEY")
        gen_rows, score_rows = token_rows(0), token_rows(1)
        res = interpret_latents(synthetic_latents(gen_rows, 2)[:, :1], gen_rows,
                                synthetic_latents(score_rows, 3)[:, :1], score_rows, explainer, width=4)
    finally:
        server.shutdown()
        server.server_close()
    (req,) = ChatHandler.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-local"
    assert req["body"]["model"] == "local-model" and "<<t7>>" in req["body"]["messages"][-1]["content"]
    assert res["latents"][0]["explanation"] == "t7" and res["latents"][0]["score"] == 1.0
    assert res["explainer"] == "openai"


def test_bad_input_is_one_line_naming_the_value_and_the_fix(monkeypatch, tmp_path, capsys):
    import socket

    with pytest.raises(ConfigError, match="'absorbtion'; did you mean 'absorption'"):
        load_config(EvalConfig, None, {"suite": "core,absorbtion"})
    from saekit.cli import main

    assert main(["evaluate", str(tmp_path), "--suite", "core,probes"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'probes'" in err and "probing" in err
    monkeypatch.delenv("SAEKIT_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$SAEKIT_MISSING_KEY.*export SAEKIT_MISSING_KEY"):
        ChatExplainer(DigitTokenizer(), "http://127.0.0.1:9/v1", "m", "SAEKIT_MISSING_KEY")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SAEKIT_TEST_KEY", "k")
    explainer = ChatExplainer(DigitTokenizer(), f"http://127.0.0.1:{port}/v1", "m", "SAEKIT_TEST_KEY")
    with pytest.raises(UserError, match=rf"127.0.0.1:{port}/v1/chat/completions is unreachable.*interp_base_url"):
        explainer.complete([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------- the whole suite
SAEBENCH_KEYS = {"eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                 "eval_result_details", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id",
                 "sae_lens_version", "sae_cfg_dict", "eval_result_unstructured"}


def test_the_suite_on_minilm_writes_saekit_and_saebench_results(minilm_run, tmp_path):
    from saekit.compare import SUITE_PLOTS, plot_pareto, table_row
    from saekit.evaluation import evaluate_run

    out = tmp_path / "eval.json"
    cfg = EvalConfig(run=str(minilm_run), out=str(out), suite=["core", "absorption", "probing", "interp"],
                     absorption_words=300, absorption_templates=["{word}"], absorption_min_probe_f1=0.0,
                     absorption_max_k=3, probing_examples=200, interp_latents=8, downstream_sequences=2,
                     error_check=False, progress=False)
    result = evaluate_run(cfg)
    assert set(result["timings_s"]) == {"core", "absorption", "probing", "interp"}
    a, p, i = result["absorption"], result["probing"], result["interp"]
    assert a["words"] == 300 and a["letters_evaluated"] > 0 and 0 <= a["mean_absorption_fraction"] <= 1
    assert p["tasks"] and all(0 <= t["sae_top_1_test_accuracy"] <= 1 for t in p["tasks"])
    assert i["latents_scored"] > 0 and 0 <= i["autointerp_score"] <= 1
    files = {f: json.loads((tmp_path / f).read_text()) for f in
             ("eval_core.json", "eval_absorption_first_letter.json", "eval_sparse_probing.json", "eval_autointerp.json")}
    for name, doc in files.items():
        assert set(doc) == SAEBENCH_KEYS, name
        assert doc["sae_cfg_dict"]["d_sae"] == 256 and doc["sae_cfg_dict"]["hook_layer"] == 3
    assert files["eval_absorption_first_letter.json"]["eval_result_metrics"]["mean"][
        "mean_absorption_fraction_score"] == a["mean_absorption_fraction"]
    assert files["eval_sparse_probing.json"]["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] == \
        p["sae_top_1_test_accuracy"]
    assert files["eval_autointerp.json"]["eval_result_metrics"]["autointerp"]["autointerp_score"] == i["autointerp_score"]
    # a suite without core adds to the evaluation already there
    again = evaluate_run(EvalConfig(run=str(minilm_run), out=str(out), suite=["interp"], interp_latents=4,
                                    progress=False))
    assert "reconstruction" in again and again["interp"]["latents_sampled"] == 4 and "absorption" in again
    # compare's columns and plots
    row = table_row("topk", result)
    assert row["absorption"] == a["mean_absorption_fraction"] and row["detection"] == i["autointerp_score"]
    for key, name, label, higher in SUITE_PLOTS:
        assert plot_pareto([row, {**row, "l0": row["l0"] * 2, "method": "b"}], key, label, tmp_path / name,
                           higher_is_better=higher).stat().st_size > 1000
