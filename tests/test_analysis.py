"""Feature analysis on a real (small) MiniLM store and TopK SAE, and the walkthrough notebook."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from saekit.analysis import FeatureReport, analyze_run
from saekit.config import AnalyzeConfig

NOTEBOOK = Path(__file__).resolve().parents[1] / "scripts" / "walkthrough.ipynb"


def test_report_examples_point_at_the_right_tokens(minilm_run):
    report = FeatureReport.build(minilm_run, progress=False)
    st = report.stats
    assert st.n_tokens == report.reader.n_rows
    latent = report.pick_features(1)[0]
    card = report.card(latent)
    assert card.top and card.top[0].activation == float(st.top_val[latent, 0])
    # The top example's center token is the stored token of its row, and its highlighted activation is
    # the latent's activation there, recomputed from the store.
    row = int(st.top_row[latent, 0])
    _, _, tok = report.reader.token_info(torch.tensor([row]))
    ex = card.top[0]
    assert ex.tokens[ex.center] == report.token_str([int(tok)])[0]
    assert abs(ex.acts[ex.center] - ex.activation) < 1e-4
    assert "embedding lens" in card.lens_title and len(card.lens_pos) == 8  # MiniLM has no unembedding
    assert "Feature" in card._repr_html_()


def test_search_finds_latents_that_fire_on_the_token(minilm_run):
    report = FeatureReport.build(minilm_run, progress=False)
    hits = report.search("the", k=3)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1] > 0


def test_analyze_run_writes_dashboard(minilm_run):
    path = analyze_run(AnalyzeConfig(run=str(minilm_run), max_features=10))
    page = Path(path).read_text()
    assert page.count('class="card"') == 10
    assert "Worst-reconstructed tokens" in page


# What the causal-LM cells computed, read back from the kernel (JSON, so the test sees plain values).
# The reference logit difference is the bare HF model's, with nothing attached: with the error term the
# attached run computes exactly the clean model.
PROBE = """
import json as _json
import torch
with torch.no_grad():
    _ids = gpt.tokenizer(prompt, return_tensors="pt")["input_ids"]
    _logits = gpt.model(input_ids=_ids).logits[0, -1]
_tid = lambda t: gpt.tokenizer.encode(t, add_special_tokens=False)[0]
with attach(gpt, gpt_sae, hook=gpt_hook) as _run, _run.steer(steer_feature, coefs[-1]):
    _steered_logits = _run.forward(prompt)[-1]
print("PROBE " + _json.dumps({
    "plain": plain, "steered": [[c, t] for c, t in steered.items()], "tl_steered": tl_steered,
    "before": ablation.before, "after": ablation.after, "n_latents": gpt_sae.n_latents,
    "top": {b: a.top(5) for b, a in attribution.items()}, "targets": {b: a.target for b, a in attribution.items()},
    "reference_target": float(_logits[_tid(first)] - _logits[_tid(second)]), "gap": gap,
    "steer_shift": float((_steered_logits - _logits).abs().max())}))
"""


def tiny_gpt2(tmp_path: Path) -> str:
    """SAEKIT_TINY_LM if set (a model scripts/train_tiny_lm.py trained), else a few steps of that script:
    a small real causal LM on the built-in corpus, fast enough for CI."""
    if os.environ.get("SAEKIT_TINY_LM"):
        return os.environ["SAEKIT_TINY_LM"]
    out = tmp_path / "tiny-gpt2"
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_lm.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--vocab", "512", "--layers", "2", "--d", "64",
                    "--heads", "2", "--ctx", "64", "--batch", "16", "--steps", "40", "--lr", "3e-3",
                    "--max-windows", "400"], check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return str(out)


def test_walkthrough_notebook_runs_end_to_end(minilm_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    env = {"SAEKIT_RUN": str(minilm_run), "SAEKIT_TINY_LM": tiny_gpt2(tmp_path),
           "SAEKIT_TINY_OUT": str(tmp_path / "tiny-sae"), "SAEKIT_TINY_TOKENS": "2000"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(minilm_run)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    html_outputs = [o for o in outputs if "text/html" in o.get("data", {})]
    cards = [o for o in html_outputs if 'class="card"' in o["data"]["text/html"]]
    assert len(cards) == 2 and all("Feature" in o["data"]["text/html"] for o in cards)
    printed = "".join(o.get("text", "") for o in outputs)
    assert "embedding cosine to the clean one: ablated" in printed and "attribution " in printed  # intervene
    assert len(html_outputs) == 3  # and the tokens coloured by one feature
    assert (Path(minilm_run) / "dashboard" / "notebook.html").exists()

    # The causal-LM section: steering, ablation and attribution on the tiny GPT-2, on both backends.
    probe = json.loads(printed.split("PROBE ", 1)[1].splitlines()[0])
    steered = dict((c, t) for c, t in probe["steered"])
    assert steered[0.0] == probe["plain"]  # coefficient 0 is the plain greedy continuation
    assert probe["steer_shift"] > 1e-2  # steering moves the next-token logits (a CI-sized LM may still
    assert all(isinstance(t, str) for t in steered.values())  # pick the same greedy tokens)
    assert probe["tl_steered"] == steered[max(steered)]  # the bridge steers the same
    assert probe["before"] != probe["after"]  # the ablation changed the next-token distribution
    assert sum(p for _, p in probe["before"]) <= 1 + 1e-6
    top = probe["top"]
    assert top["hf"] and all(math.isfinite(r["attribution"]) and r["attribution"] != 0 for r in top["hf"])
    assert all(0 <= r["feature"] < probe["n_latents"] and r["activation"] > 0 for r in top["hf"])
    key = [(r["position"], r["feature"]) for r in top["hf"]]
    assert key == [(r["position"], r["feature"]) for r in top["transformer_lens"]]  # both backends agree
    assert probe["gap"] < 1e-4 * max(abs(r["attribution"]) for r in top["hf"]) + 1e-6
    # The attributed target is the clean model's logit difference (error term: the run is the model).
    for value in probe["targets"].values():
        assert abs(value - probe["reference_target"]) < 1e-4 * max(1.0, abs(probe["reference_target"]))
    assert "feature" in printed and "x 0.0" in printed and "transformer_lens: same top features True" in printed
