"""Feature analysis on a real (small) MiniLM store and TopK SAE, and the walkthrough notebook."""
import os
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


def test_walkthrough_notebook_runs_end_to_end(minilm_run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["SAEKIT_RUN"] = str(minilm_run)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(minilm_run)}}).execute()
    finally:
        os.environ.pop("SAEKIT_RUN")
    html_outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if "text/html" in o.get("data", {})]
    cards = [o for o in html_outputs if 'class="card"' in o["data"]["text/html"]]
    assert len(cards) == 2 and all("Feature" in o["data"]["text/html"] for o in cards)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "embedding cosine to the clean one: ablated" in printed and "attribution " in printed  # intervene
    assert len(html_outputs) == 3  # and the tokens coloured by one feature
    assert (Path(minilm_run) / "dashboard" / "notebook.html").exists()
