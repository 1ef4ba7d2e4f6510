"""`saekit evaluate RUN_DIR`: every metric of a trained run, written to ``RUN_DIR/eval.json``.

What is evaluated where:

* Transcoders (trained with ``data.target_hook``) are measured against the target: FVU etc. of their
  prediction of the target hook's rows from the input hook's, and downstream by splicing that prediction
  in place of the target (downstream.py), so every number means what it means for an SAE at the target.
* Matryoshka SAEs add ``reconstruction.prefixes``: FVU, cosine and L0 of each group's prefix of the
  dictionary alone (prefixes.py).
* Reconstruction and sparsity (FVU, MSE, cosine, L0, dead/dense fractions, the feature-density
  histogram; definitions in metrics.py) on the LAST ``heldout_tokens`` rows of the store: exactly the rows
  the trainer kept out of training when the run set ``data.heldout_tokens`` (the default here is that
  same number, so the two agree unless overridden). Dead and dense fractions are over the first
  ``dead_window_tokens`` of those rows (all of them by default); the window used is reported.
* Downstream (see downstream.py) on whole token windows from the store's token table, taken from the
  first window whose rows are all held out onward, so the language model sees text the autoencoder
  was not trained on. The splice covers the positions the store kept rows for: the real (non-special)
  tokens by default, every token when the store kept special tokens (``positions`` overrides).
  Mean-ablation uses the mean of the held-out rows.
* Optionally a linear probe (probe.py) and, for generative models (RBMs), the moments of Gibbs samples
  (sampling.py).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch

from saekit.config import EvalConfig, resolve_device
from saekit.evaluation.prefixes import prefix_metrics
from saekit.evaluation.suite import run_extra, write_saebench
from saekit.errors import UserError
from saekit.files import plain, read_json, save_figure, write_json
from saekit.metrics import FiringStats, Metrics
from saekit.schema import to_dict

EVAL_FILE = "eval.json"
DENSITY_PLOT = "density.png"
DEFAULT_HELDOUT = 50_000


# ---------------------------------------------------------------------------------------- runs
def load_run(run_dir: str | os.PathLike, device="cpu"):
    """(model, TrainConfig dict or None, training metrics dict or None) of a trained run directory."""
    from saekit.autoencoders import Autoencoder

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "config.json").exists():
        raise UserError(f"{run_dir}: no trained model (model/config.json); train it first")
    model = Autoencoder.load(run_dir / "model", device).eval()
    cfg = _read_json(run_dir / "config.json")
    metrics = _read_json(run_dir / "metrics.json")
    return model, cfg, metrics


def _read_json(path: Path):
    return read_json(path) if path.exists() else None


# ---------------------------------------------------------------------------------- held-out rows
def heldout_sequences(reader, first_row: int, n: int) -> tuple[torch.Tensor, bool]:
    """Up to ``n`` whole windows [n, ctx] starting at the first sequence whose rows are all at or after
    ``first_row``; and whether they are all held out (False: fell back to the store's last windows)."""
    start = 0
    if first_row > 0:
        seqs, _, _ = reader.token_info((first_row - 1, first_row + 1))
        start = int(seqs[1]) + (1 if int(seqs[0]) == int(seqs[1]) else 0)
    held_out = start < reader.n_sequences
    if not held_out:
        warnings.warn("no whole token window lies inside the held-out rows; downstream metrics use the "
                      "store's last windows, which the autoencoder may have been trained on", stacklevel=3)
        start = max(0, reader.n_sequences - n)
    stop = min(reader.n_sequences, start + n)
    return torch.stack([reader.sequence(s) for s in range(start, stop)]), held_out


def _row_batches(reader, hook, start, stop, batch_size, device, target_hook=None):
    """Batches of ``hook``'s rows, or with ``target_hook`` (input, target) pairs of the same rows."""
    for a in range(start, stop, batch_size):
        span = (a, min(stop, a + batch_size))
        x = reader.activations(hook, span, dtype=torch.float32).to(device)
        if target_hook is None:
            yield x
        else:
            yield x, reader.activations(target_hook, span, dtype=torch.float32).to(device)


def check_target(model, target_hook: str | None) -> None:
    """A transcoder is measured against a target hook, and only a transcoder is."""
    if model.predicts_target and target_hook is None:
        raise UserError(f"a {model.kind} predicts a target activation: evaluate it with the run's "
                        "data.target_hook (its config.json names none)")
    if target_hook is not None and not model.predicts_target:
        raise UserError(f"target hook {target_hook!r} given, but a {model.kind} reconstructs its input")


# -------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def reconstruction_metrics(model, reader, hook: str, rows: tuple[int, int], batch_size: int = 4096,
                           device="cpu", dead_window_tokens: int | None = None,
                           target_hook: str | None = None) -> tuple[dict, Metrics]:
    """Every metrics.py number over store rows [start, stop), plus the feature-density histogram.

    Dead and dense fractions (and the histogram) count the first ``dead_window_tokens`` rows only,
    when given; ``dead_window_tokens`` in the result says which window they cover. With
    ``target_hook`` (transcoders) the model's output is measured against that hook's rows."""
    check_target(model, target_hook)
    model.eval()
    metrics = Metrics(model.n_latents)
    window = FiringStats(model.n_latents)
    limit = rows[1] - rows[0] if dead_window_tokens is None else min(dead_window_tokens, rows[1] - rows[0])
    for batch in _row_batches(reader, hook, *rows, batch_size, device, target_hook):
        x, y = batch if target_hook is not None else (batch, batch)
        out = model(x)
        metrics.update(y, out)
        take = min(x.shape[0], limit - window.n)
        if take > 0:
            window.update(_first(out, take, model.n_latents), out.nonzero_per_token()[:take])
    if metrics.n_tokens == 0:
        raise UserError(f"{reader.directory}: no rows to evaluate in {rows}")
    result = metrics.compute()
    firing = window.compute()
    result.update(dead_fraction=firing["dead_fraction"], dense_fraction=firing["dense_fraction"],
                  dead_window_tokens=window.n)
    counts, edges, n_dead = window.histogram()
    result["density_histogram"] = {"log10_density_edges": edges.tolist(), "counts": counts.tolist(),
                                   "dead": n_dead}
    return result, metrics


def _first(out, take: int, n_latents: int) -> torch.Tensor:
    """Fire counts of the first ``take`` tokens of a batch's output."""
    if out.code is not None:
        return (out.code[:take] != 0).sum(0)
    idx = out.indices[:take][out.values[:take] != 0]
    return torch.bincount(idx.flatten(), minlength=n_latents)


def _positions(cfg: EvalConfig, manifest: dict) -> str:
    if cfg.positions != "auto":
        return cfg.positions
    return "all" if manifest.get("keep_special_tokens") else "real"


def evaluate_model(model, reader, hook: str, cfg: EvalConfig, heldout_tokens: int, lm=None,
                   training_heldout: int | None = None, target_hook: str | None = None) -> dict:
    """All metrics of one autoencoder against one store (``lm`` is loaded from the store if needed);
    a transcoder's against ``target_hook``, from ``hook``'s activations."""
    from saekit.data.store import split_rows
    from saekit.evaluation.downstream import downstream_metrics

    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    _, rows = split_rows(reader.n_rows, heldout_tokens)
    check_target(model, target_hook)
    result = {"kind": model.kind, "n_latents": model.n_latents, "d_in": model.d_in, "hook": hook,
              "store": str(reader.directory), "heldout_rows": list(rows)}
    if target_hook is not None:
        result["target_hook"] = target_hook
    if training_heldout is not None:
        overlap = max(0, heldout_tokens - training_heldout)
        result["heldout_rows_seen_in_training"] = overlap
        if overlap:
            warnings.warn(f"{overlap} of the {heldout_tokens} evaluation rows were not held out of training "
                          f"(the run held out {training_heldout}); reconstruction metrics are optimistic",
                          stacklevel=2)
    core, timings = "core" in cfg.suite, {}
    start = time.perf_counter()
    if core:
        recon, metrics = reconstruction_metrics(model, reader, hook, rows, cfg.batch_tokens, device,
                                                cfg.dead_window_tokens, target_hook)
        result["reconstruction"] = recon
        if model.kind == "matryoshka":  # each group's prefix alone, as its loss trains it (prefixes.py)
            recon["prefixes"] = prefix_metrics(model, reader, hook, rows, model.group_ends, cfg.batch_tokens, device)
    if core and cfg.downstream and cfg.downstream_sequences > 0:
        tokens, held_out = heldout_sequences(reader, rows[0], cfg.downstream_sequences)
        if lm is None:
            from saekit.lm import load_manifest_lm

            lm = load_manifest_lm(reader.manifest, device)
        # A transcoder's prediction replaces its target, computed from its input in the same pass.
        spliced_at, source = (hook, None) if target_hook is None else (target_hook, hook)
        down = downstream_metrics(lm, spliced_at, model, tokens, backend=cfg.backend,
                                  positions=_positions(cfg, reader.manifest), mean=metrics.recon.mean,
                                  batch_size=cfg.downstream_batch_sequences, error_check=cfg.error_check,
                                  source_hook=source)
        down["windows_held_out"] = held_out
        result["downstream"] = down
    if core and cfg.probe:
        from saekit.evaluation.probe import probe_run

        result["probe"] = probe_run(model, reader, hook, rows, cfg.probe_tokens, device=device,
                                    tokenizer=lm.tokenizer if lm is not None else None)
    if core and model.generative and cfg.rbm_samples > 0:
        from saekit.evaluation.sampling import rbm_moment_check

        data = reader.activations(hook, (rows[0], min(rows[1], rows[0] + max(cfg.rbm_samples, 10_000))),
                                  dtype=torch.float32).to(device)
        result["sampling"] = rbm_moment_check(model, data, cfg.rbm_samples, cfg.gibbs_steps)
    if core:
        timings["core"] = time.perf_counter() - start
    extra, extra_timings, _ = run_extra(model, reader, hook, rows, cfg, lm=lm, target_hook=target_hook)
    result.update(extra)
    result["timings_s"] = {**timings, **extra_timings}
    return result


def evaluate_run(cfg: EvalConfig, lm=None) -> dict:
    """Evaluate the run in ``cfg.run`` and write the results to ``RUN_DIR/eval.json`` (or ``cfg.out``).

    ``lm``: the store's language model, already loaded (saves reloading it for many runs)."""
    from saekit.data.store import StoreReader

    run_dir = Path(cfg.run)
    device = resolve_device(cfg.device)
    model, train_cfg, train_metrics = load_run(run_dir, device)
    data_cfg = (train_cfg or {}).get("data", {})
    store = cfg.store or data_cfg.get("store")
    if store is None:
        raise UserError(f"{run_dir}: no config.json naming the store; pass --store STORE_DIR")
    reader = StoreReader(store)
    hook = data_cfg.get("hook") or reader.hooks[0]
    target_hook = data_cfg.get("target_hook")
    trained_heldout = int(data_cfg.get("heldout_tokens", 0) or 0)
    heldout = cfg.heldout_tokens or trained_heldout or DEFAULT_HELDOUT
    # A run trained on another store has no held-out rows in this one.
    same_store = cfg.store is None or Path(cfg.store).resolve() == Path(data_cfg.get("store", "")).resolve()
    result = evaluate_model(model, reader, hook, cfg, heldout, lm=lm,
                            training_heldout=trained_heldout if same_store and train_cfg else None,
                            target_hook=target_hook)
    result["run"] = str(run_dir)
    result["eval_config"] = to_dict(cfg)
    if train_metrics:
        result["training"] = {k: train_metrics.get(k) for k in ("tokens", "tokens_per_s", "elapsed_s")}
    out = Path(cfg.out) if cfg.out else run_dir / EVAL_FILE
    if "core" not in cfg.suite and out.exists():
        # A suite without core adds its sections to the evaluation already there.
        old = read_json(out)
        if (old.get("kind"), old.get("n_latents")) == (result["kind"], result["n_latents"]):
            result = {**old, **result, "timings_s": {**old.get("timings_s", {}), **result["timings_s"]},
                      "eval_config": result["eval_config"]}
    write_json(out, result)
    write_saebench(result, cfg, reader.manifest, model, hook, out.parent)
    if "reconstruction" in result:
        plot_density(result["reconstruction"]["density_histogram"], out.with_name(DENSITY_PLOT),
                     title=f"{model.kind}, {model.n_latents} latents")
    return json.loads(json.dumps(plain(result)))


def plot_density(hist: dict, path: Path, title: str = "") -> Path:
    """The feature-density histogram (log10 fraction of tokens each live latent fires on) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, counts = hist["log10_density_edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({hist['dead']} dead)" if title else f"{hist['dead']} dead")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
