"""Harvesting end to end on the built-in MiniLM: the CLI, resume after kill -9, refusals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit.cli import main as cli_main
from saekit.config import ConfigError, HarvestConfig
from saekit.data.store import StoreMismatchError, StoreReader
from saekit.harvest import harvest
from saekit.lm import UnknownHookError, load_lm, make_capture

REPO = Path(__file__).resolve().parents[1]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
SMALL = ["--hooks", ",".join(HOOKS), "--max_tokens", "3000", "--batch_sequences", "4", "--shard_sequences", "4",
         "--context_size", "64", "--progress", "false"]


def _run_cli(out, extra=(), **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "saekit.cli", "harvest", "--out", str(out), *SMALL, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _files(store: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest["config"].pop("out", None)
    return {**files, "manifest": json.dumps(manifest, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    proc = _run_cli(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return out


def test_store_contents_match_a_direct_forward(reference_store):
    reader = StoreReader(reference_store)
    assert reader.n_rows == 3000 and reader.hooks == HOOKS and reader.d_model == 384
    seq, pos, tok = reader.token_info(torch.arange(reader.n_rows))
    lm = load_lm()
    special = set(lm.tokenizer.all_special_ids)
    assert not any(int(t) in special for t in tok[:500])  # special tokens excluded by default
    # Recompute the first stored sequence with the model and compare every stored row of it.
    ids = reader.sequence(0).long()[None]
    with make_capture(lm, HOOKS) as capture:
        ref = capture(ids, torch.ones_like(ids))
    rows = (seq == 0).nonzero().flatten()
    for hook in HOOKS:
        stored = reader.activations(hook, rows=rows)
        torch.testing.assert_close(stored, ref[hook][0, pos[rows].long()], atol=1e-4, rtol=1e-4)
        assert torch.equal(tok[rows], ids[0, pos[rows].long()].int())


def test_kill_9_and_resume_gives_the_uninterrupted_store(reference_store, tmp_path):
    out = tmp_path / "store"
    for wait_shards in (1, 4):  # kill twice, at different depths into the run
        proc = _run_cli(out)
        deadline = time.time() + 120
        while time.time() < deadline:
            done = len(list(out.glob("shard_*.safetensors"))) if out.exists() else 0
            if done >= wait_shards or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not StoreReader(out, verify=False).complete  # really interrupted
    proc = _run_cli(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert _files(out) == _files(reference_store)


def test_changed_config_refuses_and_names_the_difference(reference_store, tmp_path):
    cfg = HarvestConfig(out=str(reference_store), hooks=HOOKS, max_tokens=3000, batch_sequences=4,
                        shard_sequences=4, context_size=32, progress=False)
    with pytest.raises(StoreMismatchError, match="context_size"):
        harvest(cfg)


def test_unknown_hook_lists_valid_names(tmp_path):
    with pytest.raises(UnknownHookError, match="blocks.5.hook_resid_post"):
        harvest(HarvestConfig(out=str(tmp_path / "s"), hooks=["blocks.3.resid_post"], progress=False))
    assert not (tmp_path / "s").exists()  # nothing written before the hooks are validated


def test_cli_rejects_unknown_key_with_nearest(capsys, tmp_path):
    assert cli_main(["harvest", "--out", str(tmp_path / "s"), "--max_token", "10"]) == 2
    assert "did you mean 'max_tokens'" in capsys.readouterr().err


def test_shard_size_must_align_with_batches(tmp_path):
    with pytest.raises(ConfigError, match="multiple of batch_sequences"):
        HarvestConfig(out=str(tmp_path / "s"), batch_sequences=3, shard_sequences=4)


def test_store_of_another_corpus_version_is_not_resumed(reference_store, tmp_path):
    """A store harvested from an older built-in corpus (another text for the same name, e.g. before
    the docstrings were shuffled) is refused on resume, not silently extended with other text."""
    import shutil

    old = tmp_path / "store"
    shutil.copytree(reference_store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["corpus"].startswith("builtin:stdlib-docstrings v2, Python ")
    manifest.pop("corpus")  # as an older saekit wrote it
    manifest["complete"] = False
    (old / "manifest.json").write_text(json.dumps(manifest))
    cfg = HarvestConfig(out=str(old), hooks=HOOKS, max_tokens=3000, batch_sequences=4, shard_sequences=4,
                        context_size=64, progress=False)
    with pytest.raises(StoreMismatchError, match="corpus"):
        harvest(cfg)
