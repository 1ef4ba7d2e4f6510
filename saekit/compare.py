"""`saekit compare CONFIG.yaml`: train several autoencoders on one store, evaluate each, tabulate, plot.

Orchestration, like demo.py: it calls the harvest, training and evaluation stages; no stage calls it.

The config (every section checked key by key, like every saekit config):

    out: runs/compare                 # report, plots, and runs/<name>/ for every model
    store: runs/store                 # harvested first (with `harvest:`) unless a complete store is there
    harvest: {...}                    # HarvestConfig keys; `out` is set to `store`
    train: {...}                      # TrainConfig keys shared by every model (merged under each entry, then
                                      # checked as that entry's kind); `out` and `data.store` are set
    eval: {...}                       # EvalConfig keys; `run` and `out` are set per model
    models:                           # one entry per model, or per point of a sweep
      - name: topk                    # run name (default: the kind); sweeps append e.g. "-k16"
        model: {kind: topk, n_latents: 1536}
        sweep: {model.k: [8, 16, 32]} # dotted TrainConfig keys -> values: one run per combination,
                                      # named topk-k8, ...; relu + model.l1_coefficient: relu-l1=5
        total_tokens: 200000          # any other TrainConfig key overrides `train:` for this entry

Outputs in ``out``: ``compare.md`` (returned), ``compare.csv``, ``compare.json`` (every metric),
``pareto_fvu_l0.png`` and ``pareto_downstream_l0.png``; with ``eval.suite`` naming absorption, probing or
interp, their columns and ``pareto_absorption_l0.png``, ``pareto_probing_l0.png``, ``pareto_interp_l0.png``. Transcoders (entries with ``data.target_hook``)
get their own table and ``pareto_transcoder_fvu_l0.png``: their FVU is of the hook they predict (an
MLP's output), not of the one the other rows reconstruct. Finished runs and evaluations are reused, so a
rerun after adding a model trains and evaluates only the new one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.config import EvalConfig, HarvestConfig, Section, TrainConfig, expand_models, load_config
from saekit.files import atomic_write, read_json, save_figure, write_json
from saekit.schema import to_dict

REPORT_MD, REPORT_CSV, REPORT_JSON = "compare.md", "compare.csv", "compare.json"
PLOT_FVU, PLOT_DOWNSTREAM = "pareto_fvu_l0.png", "pareto_downstream_l0.png"
PLOT_TRANSCODER = "pareto_transcoder_fvu_l0.png"
# The suite's columns (evaluate --suite absorption,probing,interp): key, plot, y label, higher is better.
SUITE_PLOTS = [("absorption", "pareto_absorption_l0.png", "mean absorption fraction (first letter)", False),
               ("probe_k1", "pareto_probing_l0.png", "k=1 sparse-probe accuracy (mean over tasks)", True),
               ("detection", "pareto_interp_l0.png", "detection score (token-set explanations)", True)]
_AXIS = {"ce_loss_recovered": "CE loss recovered (vs zero-ablation)",
         "cosine_spliced": "cosine(clean, spliced) sentence embedding"}


@dataclass
class CompareConfig(Section):
    out: str = "runs/compare"
    store: str = "runs/store"
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    # Kept as written: its model keys may suit only some kinds, so it is checked per entry, in plan().
    train: dict = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    models: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------- planning
def plan(cfg: CompareConfig) -> list[tuple[str, TrainConfig]]:
    """(run name, TrainConfig) for every model and sweep point, in config order; names are unique. The
    entries expand as in a train sweep file (config.expand_models), into ``<out>/runs/<name>``."""
    return expand_models(cfg.train, cfg.models, Path(cfg.out) / "runs", "compare",
                         fixed={"data.store": cfg.store, "progress": False})


# ------------------------------------------------------------------------------------------ running
def ensure_store(cfg: CompareConfig) -> Path | str:
    """The store at ``cfg.store`` (a path or an fsspec URL), harvested (or finished) first when it is
    not complete."""
    from saekit.data.store import store_complete, store_location

    store = store_location(cfg.store)
    if store_complete(store):
        return store
    from saekit.harvest import harvest

    harvest(dataclasses.replace(cfg.harvest, out=str(store)))
    return store


def compare(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Path:
    """Run the comparison described by the YAML at ``path`` (plus dotted overrides); returns the path of
    the Markdown report."""
    cfg = load_config(CompareConfig, path, overrides)
    return run_compare(cfg)


def run_compare(cfg: CompareConfig) -> Path:
    from saekit.config import resolve_device
    from saekit.data.store import StoreReader
    from saekit.evaluation.evaluate import EVAL_FILE, evaluate_run
    from saekit.lm import load_manifest_lm

    runs = plan(cfg)  # config errors surface before any harvesting or training
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    reader = StoreReader(ensure_store(cfg))
    train_in_passes([t for _, t in runs])
    lm = None
    rows = []
    for name, train_cfg in runs:
        run_dir = Path(train_cfg.out)
        eval_cfg = dataclasses.replace(cfg.eval, run=str(run_dir), out=None, store=None)
        result = _cached_eval(run_dir / EVAL_FILE, eval_cfg)
        if result is None:
            if lm is None and eval_cfg.downstream:
                lm = load_manifest_lm(reader.manifest, resolve_device(eval_cfg.device))
            result = evaluate_run(eval_cfg, lm=lm)
        rows.append(table_row(name, result))
    write_json(out / REPORT_JSON, rows)
    write_csv(rows, out / REPORT_CSV)
    report = write_markdown(rows, out / REPORT_MD, store=reader)
    saes, transcoders = split_transcoders(rows)
    if saes:
        plot_pareto(saes, "fvu", "FVU (held out)", out / PLOT_FVU)
    if transcoders:
        target = transcoders[0]["target_hook"]
        plot_pareto(transcoders, "fvu", f"FVU of {target} (held out)", out / PLOT_TRANSCODER)
    for key, plot, label, higher in SUITE_PLOTS:
        if any(r.get(key) is not None for r in saes):
            plot_pareto(saes, key, label, out / plot, higher_is_better=higher)
    if any(r.get("downstream") is not None for r in rows):  # every splice is of the same kind of number
        name = next(r["downstream_name"] for r in rows if r.get("downstream_name"))
        plot_pareto(rows, "downstream", _AXIS.get(name, name), out / PLOT_DOWNSTREAM, higher_is_better=True)
    return report


def train_in_passes(cfgs: list[TrainConfig]) -> None:
    """Train the runs in as few passes over the store as their data settings allow: one train_many per
    group of runs that read the same batches (they may differ in hook; closed-form ones are fitted
    apart by train_many itself)."""
    from saekit.training.trainer import OWN_DATA_KEYS, train_many

    groups: dict[str, list[TrainConfig]] = {}
    for t in cfgs:
        shared = {k: v for k, v in to_dict(t.data).items() if k not in OWN_DATA_KEYS}
        groups.setdefault(json.dumps([shared, t.device], sort_keys=True), []).append(t)
    for group in groups.values():
        train_many(group)


def split_transcoders(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows that reconstruct their hook, rows that predict another one: transcoders)."""
    return [r for r in rows if not r.get("target_hook")], [r for r in rows if r.get("target_hook")]


def _cached_eval(path: Path, cfg: EvalConfig) -> dict | None:
    """A previous eval.json made with the same evaluation settings, else None."""
    if not path.exists():
        return None
    old = read_json(path)
    return old if old.get("eval_config") == json.loads(json.dumps(to_dict(cfg))) else None


# ------------------------------------------------------------------------------------------- table
COLUMNS = [  # (csv key, markdown header)
    ("method", "method"), ("kind", "kind"), ("code_size", "code size"), ("l0", "L0"), ("fvu", "FVU"),
    ("downstream", "downstream"), ("loss_increase", "Δ loss (nats)"),
    ("embedding_recovered", "emb. recovered"), ("dead_pct", "dead %"),
    ("train_tokens_per_s", "train tok/s"), ("probe_accuracy", "probe acc"),
    ("rbm_mean_error", "RBM mean err"), ("rbm_cov_error", "RBM cov err"),
    ("absorption", "absorption"), ("split_features", "split feats"), ("probe_k1", "k=1 probe"),
    ("probe_k5", "k=5 probe"), ("detection", "detection"),
]


def table_row(name: str, result: dict) -> dict:
    """The comparison-table numbers of one evaluated run (None where a metric does not apply)."""
    from saekit.evaluation.downstream import headline

    rec = result["reconstruction"]
    down = result.get("downstream")
    probe = result.get("probe") or {}
    sampling = result.get("sampling") or {}
    row = {"method": name, "kind": result["kind"], "code_size": result["n_latents"], "l0": rec["l0"],
           "fvu": rec["fvu"], "downstream_name": None, "downstream": None, "loss_increase": None,
           "dead_pct": 100 * rec["dead_fraction"], "dead_window_tokens": rec["dead_window_tokens"],
           "train_tokens_per_s": (result.get("training") or {}).get("tokens_per_s"),
           "probe_accuracy": probe.get("accuracy"), "probe_accuracy_raw": probe.get("accuracy_raw"),
           "probe_chance": probe.get("chance"),
           "rbm_mean_error": sampling.get("mean_error"), "rbm_cov_error": sampling.get("cov_error"),
           "rbm_mean_error_start": sampling.get("mean_error_start"),
           "rbm_cov_error_start": sampling.get("cov_error_start"), "rbm_gibbs_steps": sampling.get("gibbs_steps"),
           "embedding_recovered": None, "run": result.get("run"),
           "hook": result.get("hook"), "target_hook": result.get("target_hook")}
    absorption, probing, interp = (result.get(k) or {} for k in ("absorption", "probing", "interp"))
    row.update(absorption=absorption.get("mean_absorption_fraction"),
               split_features=absorption.get("mean_num_split_features"),
               absorption_letters=absorption.get("letters_evaluated"),
               probe_k1=probing.get("sae_top_1_test_accuracy"), probe_k5=probing.get("sae_top_5_test_accuracy"),
               probe_k1_raw=probing.get("llm_top_1_test_accuracy"), probe_k1_pca=probing.get("pca_top_1_test_accuracy"),
               detection=interp.get("autointerp_score"))
    if down:
        row["downstream_name"], row["downstream"] = headline(down)
        row["loss_increase"] = down.get("loss_increase")
        if down.get("kind") == "encoder":
            row["embedding_recovered"] = down.get("embedding_recovered")
    return row


def write_csv(rows: list[dict], path: Path) -> Path:
    keys = [k for k, _ in COLUMNS] + ["downstream_name", "probe_accuracy_raw", "probe_chance",
                                      "rbm_mean_error_start", "rbm_cov_error_start", "rbm_gibbs_steps",
                                      "dead_window_tokens", "hook", "target_hook", "run", "absorption_letters",
                                      "probe_k1_raw", "probe_k1_pca"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in keys})
    atomic_write(path, text.getvalue())
    return path


def _fmt(value, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "train_tokens_per_s":
        return f"{value:,.0f}"
    if key in ("l0", "dead_pct"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    used = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in used) + " |", "|" + "|".join("---" for _ in used) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k), k) for k, _ in used) + " |" for r in rows]
    return lines + [""]


def write_markdown(rows: list[dict], path: Path, store=None) -> Path:
    lines = ["# Autoencoder comparison", ""]
    if store is not None:
        m = store.manifest
        lines += [f"Store `{store.directory}`: model `{m.get('model')}`, hook(s) {', '.join(m['hooks'])}, "
                  f"{store.n_rows:,} rows.", ""]
    down_name = next((r["downstream_name"] for r in rows if r.get("downstream_name")), None)
    notes = ["FVU, L0 and dead % on the store's held-out rows (dead: never active in the first "
             f"{rows[0]['dead_window_tokens']:,} of them)."]
    if down_name == "ce_loss_recovered":
        notes.append("downstream: CE loss recovered against zero-ablation, with the loss increase in nats "
                     "(spliced − clean) beside it.")
    elif down_name:
        notes.append("downstream: cosine similarity of the clean and spliced mean-pooled sentence embeddings; "
                     "emb. recovered = (cos_spliced − cos_zero-ablated) / (1 − cos_zero-ablated).")
    raw = next((r["probe_accuracy_raw"] for r in rows if r.get("probe_accuracy_raw") is not None), None)
    if raw is not None:
        chance = next(r["probe_chance"] for r in rows if r.get("probe_chance") is not None)
        notes.append(f"probe acc: held-out accuracy of a linear probe for \"token continues a word\" on the "
                     f"codes; on the raw activations it is {raw:.4f} (majority class {chance:.4f}).")
    if any(r.get("absorption") is not None for r in rows):
        notes.append("absorption: mean first-letter absorption fraction over the letters whose probe passes "
                     "the F1 threshold (SAEBench's definition; README), with the mean number of split latents.")
    k1 = next((r for r in rows if r.get("probe_k1") is not None), None)
    if k1 is not None:
        notes.append("k=1 / k=5 probe: held-out accuracy of a logistic probe on the top 1 / 5 latents by mean "
                     f"difference, averaged over the token- and sequence-level tasks; on the top raw dimension it is "
                     f"{k1['probe_k1_raw']:.4f}, on the first principal component {k1['probe_k1_pca']:.4f}.")
    if any(r.get("detection") is not None for r in rows):
        notes.append("detection: balanced accuracy of \"an explanation n-gram occurs\" for \"the latent fires\" "
                     "on held-out contexts (0.5 = chance), mean over the sampled latents.")
    for r in rows:
        if r.get("rbm_mean_error") is not None:
            notes.append(f"{r['method']}: moment errors of Gibbs samples after {r['rbm_gibbs_steps']} steps "
                         f"(mean {r['rbm_mean_error']:.3f}, covariance {r['rbm_cov_error']:.3f}); at the chains' "
                         f"start {r['rbm_mean_error_start']:.3f} and {r['rbm_cov_error_start']:.3f} "
                         "(definitions in saekit/evaluation/sampling.py).")
    lines += [f"- {n}" for n in notes] + [""]
    saes, transcoders = split_transcoders(rows)
    if saes:
        lines += _table(saes) + [f"![FVU against L0]({PLOT_FVU})", ""]
    if transcoders:
        t = transcoders[0]
        lines += ["## Transcoders", "",
                  f"Each predicts `{t['target_hook']}` from `{t['hook']}`: FVU is of that prediction (the MLP's "
                  "output), so it is not comparable with the table above; downstream splices the prediction "
                  "in place of the MLP's output.", ""]
        lines += _table(transcoders) + [f"![transcoder FVU against L0]({PLOT_TRANSCODER})", ""]
    if down_name:
        lines += [f"![downstream against L0]({PLOT_DOWNSTREAM})", ""]
    for key, plot, label, _ in SUITE_PLOTS:
        if any(r.get(key) is not None for r in saes):
            lines += [f"![{label} against L0]({plot})", ""]
    atomic_write(path, "\n".join(lines))
    return Path(path)


# -------------------------------------------------------------------------------------------- plots
def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x; lower y, or higher with
    ``higher_is_better``), sorted by x."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], math.inf
    for i in order:
        y = sign * points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def plot_pareto(rows: list[dict], key: str, ylabel: str, path: Path, higher_is_better: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pts = [(r["l0"], r[key], r) for r in rows
           if r.get(key) is not None and r.get("l0") is not None and math.isfinite(r[key]) and r["l0"] > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = list(dict.fromkeys(r["kind"] for _, _, r in pts))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, kind in enumerate(kinds):
        mine = sorted((x, y, r) for x, y, r in pts if r["kind"] == kind)
        ax.plot([p[0] for p in mine], [p[1] for p in mine], "o-" if len(mine) > 1 else "o",
                color=colors[j % len(colors)], label=kind, alpha=0.85)
        for x, y, r in mine:
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front([(x, y) for x, y, _ in pts], higher_is_better)
    if len(front) > 1:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="black",
                linestyle=":", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L0 (active latents per token, held out)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
