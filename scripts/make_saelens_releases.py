"""Write saekit/interop/saelens_releases.json.gz: SAELens's table of pretrained releases, read by SAELens itself.

    python scripts/make_saelens_releases.py     # builds /tmp/peers-venv if needed (make_interop_fixtures.py)

SAELens resolves ``SAE.from_pretrained(release, sae_id)`` through ``pretrained_saes.yaml``, which ships
only inside the sae-lens package (and sae-lens cannot be installed beside saekit: it pins TransformerLens
< 4). This script runs in the peers venv, asks SAELens's own ``get_pretrained_saes_directory()`` for
every release, and keeps what saekit needs to find and load an SAE (saekit/interop/releases.py):

    {"sae_lens_version": "6.54.12",
     "releases": {RELEASE: {"repo_id", "model", "conversion" (SAELens's conversion_func, null = its own
                            format), "config_overrides" (when any),
                            "saes": {SAE_ID: {"path" (omitted when equal to SAE_ID), "neuronpedia",
                                              "norm_scaling_factor" (each only when set)}}}}}

gzip without a timestamp, keys sorted: the same SAELens version writes the same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "saekit" / "interop" / "saelens_releases.json.gz"


def table() -> dict:
    from importlib.metadata import version

    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    releases = {}
    for name, lookup in sorted(get_pretrained_saes_directory().items()):
        saes = {}
        for sae_id, path in lookup.saes_map.items():
            entry = {} if path == sae_id else {"path": path}
            if lookup.neuronpedia_id.get(sae_id):
                entry["neuronpedia"] = lookup.neuronpedia_id[sae_id]
            if sae_id in lookup.norm_scaling_factor:
                entry["norm_scaling_factor"] = float(lookup.norm_scaling_factor[sae_id])
            saes[sae_id] = entry
        release = {"repo_id": lookup.repo_id, "model": lookup.model, "conversion": lookup.conversion_func,
                   "saes": saes}
        if lookup.config_overrides:
            release["config_overrides"] = lookup.config_overrides
        releases[name] = release
    return {"sae_lens_version": version("sae-lens"), "releases": releases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help="(internal) run inside the peers venv")
    args = parser.parse_args()
    if not args.inside:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_interop_fixtures import setup_venv, venv_python

        setup_venv()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([str(venv_python()), __file__, "--inside"], check=True, env=env)
        return
    data = table()
    text = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    OUT.write_bytes(gzip.compress(text, compresslevel=9, mtime=0))
    n = sum(len(r["saes"]) for r in data["releases"].values())
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB): {len(data['releases'])} releases, {n} SAEs, "
          f"sae-lens {data['sae_lens_version']}")


if __name__ == "__main__":
    main()
