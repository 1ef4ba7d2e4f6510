"""Exact resume: a run SIGKILLed after a checkpoint and resumed ends with bit-identical parameters.

Each run is a real subprocess (scripts/train_check.py, one torch thread for determinism). The kill lands
inside a forward pass, after some steps past the last checkpoint, so those steps are redone on resume.
"""
import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_check.py"
# 80 steps of 256 tokens; checkpoints every 10 steps; the first 64 batches are the init sample, so the
# first checkpoints record data positions of pulled-ahead batches and the later ones the source's own.
ARGS = ["--batch", "256", "--total-tokens", "20480", "--checkpoint-every", "2560"]


def run(out: Path, *extra: str) -> int:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def checkpoint_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(full) == 0

    assert run(resumed, "--kill-at-step", "15") == -signal.SIGKILL  # dies in step 15
    assert checkpoint_step(resumed) == 10 and not (resumed / "model").exists()
    assert run(resumed, "--kill-at-step", "65") == -signal.SIGKILL  # resumes at 10, dies in step 75
    assert checkpoint_step(resumed) == 70
    assert run(resumed) == 0

    for name in ("model/model.safetensors", "checkpoint/optimizer.safetensors",
                 "checkpoint/trainer.safetensors"):  # weights; Adam moments; dead tracker, RNG, loss history
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    fa = json.loads((full / "metrics.json").read_text())
    fb = json.loads((resumed / "metrics.json").read_text())
    assert fa["tokens"] == fb["tokens"] == 20480 and fa["loss"] == fb["loss"] and fa["fvu"] == fb["fvu"]
