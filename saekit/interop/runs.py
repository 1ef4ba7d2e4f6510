"""`saekit import SOURCE RUN_DIR`: a foreign SAE as a saekit run directory, so that `saekit evaluate` and
`saekit analyze` treat it like one trained here; `saekit export RUN_DIR OUT --format saelens|sparsify`:
a run's model for the other libraries, with the metadata its store records. SOURCE is a directory in any
format ``load_foreign`` reads (SAELens, sparsify, Gemma Scope, dictionary_learning, saekit) or a Hub
folder, ``hf://ORG/REPO/PATH[@REVISION]``.

    RUN_DIR/model/        the converted model (saekit's own format; loads with Autoencoder.load)
    RUN_DIR/import.json   where it came from: format, source path, architecture, metadata, conversion notes
    RUN_DIR/config.json   a TrainConfig naming the store and hook to evaluate on (when a store is given)

Nothing is trained: the run has no checkpoint and no metrics.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from saekit.autoencoders import Autoencoder
from saekit.config import DataConfig, TrainConfig
from saekit.errors import UserError
from saekit.files import read_json, write_json
from saekit.interop import load_foreign
from saekit.interop.export import export_saelens, export_sparsify
from saekit.schema import check_choice, to_dict

EXPORTERS = {"saelens": export_saelens, "sparsify": export_sparsify}
DENSITY_TOKENS = 100_000  # rows measured for SAELens's sparsity.safetensors (a few seconds on a CPU)

IMPORT_FILE = "import.json"


def import_run(source: str | Path, run_dir: str | Path, store: str | None = None, hook: str | None = None) -> Path:
    """Convert the SAE in ``source`` into ``run_dir``; ``store`` (an activation store of the model it was
    trained on) and ``hook`` (default: the hook its files name) make the run evaluable and analyzable."""
    run_dir = Path(run_dir)
    if (run_dir / "model").exists() or (run_dir / "checkpoint").exists():
        raise UserError(f"{run_dir} already holds a run; import into a new directory")
    model, info = load_foreign(source)
    hook = hook or info.get("hook_name")
    if store is not None:
        from saekit.data.store import StoreReader

        reader = StoreReader(store, verify=False)
        hook = hook or reader.hooks[0]
        if hook not in reader.hooks:
            raise UserError(f"{store}: has no hook {hook!r} (it has {', '.join(reader.hooks)}); pass --hook")
        if reader.d_model != model.d_in:
            raise UserError(f"{store}: activations of width {reader.d_model}, but the SAE in {source} reads "
                            f"{model.d_in}; name the store of the model and hook it was trained on")
    model.save(run_dir / "model")
    write_json(run_dir / IMPORT_FILE, {**info, "source": str(source)})
    if store is not None:
        cfg = TrainConfig(out=str(run_dir), model=model.cfg, data=DataConfig(store=str(store), hook=hook))
        write_json(run_dir / "config.json", to_dict(cfg))
    return run_dir


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "saelens",
               density_tokens: int = DENSITY_TOKENS) -> dict:
    """Write ``run_dir``'s model to ``out`` in format ``fmt`` (saelens or sparsify); the metadata (model,
    hook, context size, prepend_bos = the store kept its special tokens) comes from the run's store.
    For SAELens, each latent's firing density over the first ``density_tokens`` training rows of that
    store (0: none) is written as ``sparsity.safetensors``. Returns the exporter's report."""
    check_choice(fmt, EXPORTERS, "export format")
    if isinstance(density_tokens, bool) or not isinstance(density_tokens, int) or density_tokens < 0:
        raise UserError(f"density tokens must be a whole number >= 0 (0 writes no density), not {density_tokens!r}")
    run_dir = Path(run_dir)
    if not (run_dir / "model" / "config.json").exists():
        raise UserError(f"{run_dir}: no trained model (model/config.json); train it first")
    model = Autoencoder.load(run_dir / "model")
    metadata, density = {}, None
    if (run_dir / "config.json").exists():
        data = read_json(run_dir / "config.json").get("data") or {}
        store = Path(data.get("store", ""))
        metadata["hook_name"] = data.get("hook")
        if (store / "manifest.json").exists():
            from saekit.data.store import StoreReader

            reader = StoreReader(store, verify=False)
            manifest = reader.manifest
            metadata.update(model_name=manifest.get("model"), context_size=manifest.get("context_size"),
                            prepend_bos=bool(manifest.get("keep_special_tokens")))
            if fmt == "saelens" and density_tokens and data.get("hook") in reader.hooks:
                heldout = int(data.get("heldout_tokens") or 0)
                density = firing_density(model, reader, data["hook"], density_tokens, heldout)
    if fmt == "saelens":
        return export_saelens(model, out, metadata=metadata, density=density)
    return export_sparsify(model, out, metadata=metadata)


@torch.no_grad()
def firing_density(model: Autoencoder, reader, hook: str, tokens: int, heldout_tokens: int = 0,
                   batch_size: int = 4096) -> torch.Tensor:
    """[n] fraction of the store's first ``tokens`` training rows (those before the last
    ``heldout_tokens``) on which each latent of ``model`` fires: the feature sparsity SAELens records."""
    from saekit.data.store import split_rows

    (start, stop), _ = split_rows(reader.n_rows, heldout_tokens)
    stop = min(stop, start + tokens)
    if stop <= start:
        raise UserError(f"{reader.directory}: no training rows to measure the firing density on")
    model.eval()
    counts = torch.zeros(model.n_latents, dtype=torch.int64)
    for a in range(start, stop, batch_size):
        x = reader.activations(hook, (a, min(stop, a + batch_size)), dtype=torch.float32)
        counts += model(x).fire_counts(model.n_latents).long().cpu()
    return counts.double() / (stop - start)
