"""The evaluations beyond reconstruction, by name: ``saekit evaluate RUN_DIR --suite core,absorption,
probing,interp``. ``core`` is reconstruction and downstream (evaluate.py); the others are defined in
absorption.py, probing.py and autointerp.py, one metric each. Every result lands in ``eval.json`` under
its name and, in SAEBench's schema (saebench.py), in ``eval_<eval_type_id>.json`` beside it; the seconds
each took are in ``eval.json``'s ``timings_s``.
"""
from __future__ import annotations

import time

from saekit.config import SUITES

__all__ = ["SUITES", "run_extra"]


def run_extra(model, reader, hook: str, rows: tuple[int, int], cfg, lm=None, tokenizer=None,
              target_hook: str | None = None) -> tuple[dict, dict, object]:
    """The suite's evaluations other than core: ({name: result}, {name: seconds}, the LM if loaded)."""
    results, timings = {}, {}
    for name in [s for s in cfg.suite if s != "core"]:
        start = time.perf_counter()
        if target_hook is not None and name == "absorption":
            # Its probe lives where the latents read (the input hook), its decoder writes the target.
            results[name] = {"skipped": f"a {model.kind} writes {target_hook}, not the hook it reads; "
                                        "absorption compares the two"}
            continue
        if name == "absorption":
            if lm is None:
                from saekit.lm import load_manifest_lm

                lm = load_manifest_lm(reader.manifest, model.device)
            from saekit.evaluation.absorption import absorption_eval

            results[name] = absorption_eval(model, lm, hook, cfg, progress=cfg.progress)
        else:
            if tokenizer is None:
                from saekit.lm import load_manifest_tokenizer

                tokenizer = lm.tokenizer if lm is not None else load_manifest_tokenizer(reader.manifest)
            if name == "probing":
                from saekit.evaluation.probing import probing_eval

                results[name] = probing_eval(model, reader, hook, rows, cfg, tokenizer, progress=cfg.progress)
            else:
                from saekit.evaluation.autointerp import interp_eval

                results[name] = interp_eval(model, reader, hook, rows, cfg, tokenizer, progress=cfg.progress)
        timings[name] = time.perf_counter() - start
    return results, timings, lm


def write_saebench(result: dict, cfg, manifest: dict, model, hook: str, directory) -> list:
    """One SAEBench-schema JSON per evaluation of ``result`` in ``directory``; returns their paths."""
    from pathlib import Path

    from saekit.evaluation import saebench
    from saekit.files import write_json

    sae_cfg = saebench.sae_cfg_dict(model, manifest, hook)
    paths = []
    for name in cfg.suite:
        section = result if name == "core" else result.get(name)
        if section is None or (name == "core" and "reconstruction" not in result) or "skipped" in section:
            continue
        path = Path(directory) / saebench.file_name(name)
        write_json(path, saebench.WRITERS[name](section, cfg, manifest, sae_cfg))
        paths.append(path)
    return paths
