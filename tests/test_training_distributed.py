"""torchrun data parallelism: two gloo CPU processes equal one process fed the concatenated batches."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_check.py"
# No input dropout: the ranks would draw different noise than the single process.
ARGS = ["--batch", "64", "--total-tokens", "1024", "--checkpoint-every", "512", "--noise", "0"]


def test_two_process_ddp_matches_single_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run([*torchrun, str(SCRIPT), "--out", str(tmp_path / "ddp"), *ARGS],
                         capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "single"), *ARGS],
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]

    a = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # same up to float summation order (gradient all-reduce, gathered init sample)
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    # the dead tracker was all-reduced: identical; each rank's data position is in the checkpoint
    sa = load_file(str(tmp_path / "single" / "checkpoint" / "trainer.safetensors"))
    sb = load_file(str(tmp_path / "ddp" / "checkpoint" / "trainer.safetensors"))
    assert torch.equal(sa["dead_idle"], sb["dead_idle"])
    assert torch.allclose(sa["history"], sb["history"], rtol=1e-5)
    meta = json.loads((tmp_path / "ddp" / "checkpoint" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["data_state"] == [{"i": 16}, {"i": 16}]
    assert {"rng_cpu.0", "rng_cpu.1"} <= sb.keys()
    # rank 0 alone wrote the outputs: one metrics file with the global token count
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["tokens"] == 1024
    shutil.rmtree(tmp_path)
