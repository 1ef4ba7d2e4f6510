"""Every error a user can cause is one clear line on stderr and exit status 2, with no traceback; a bug
keeps its traceback. Real `python -m saekit.cli` subprocesses, on a real MiniLM store."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPK = str(ROOT / "configs" / "train_topk.yaml")


def saekit(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def assert_user_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and the last stderr line is saekit's one-line message holding every fragment."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("saekit ") and ": error: " in line, p.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture(scope="module")
def store(minilm_run):
    return Path(minilm_run).parent / "store"


def train_args(store, out, *extra):
    return ["train", TOPK, "--out", out, "--data.store", store, "--data.heldout_tokens", 1000,
            "--model.n_latents", 64, "--total_tokens", 512, "--data.batch_tokens", 256, "--progress", "false",
            "--device", "cpu", *extra]


# Config errors: caught when the config is read, before any data is touched.
CONFIG_CASES = {
    "unknown key": (["--totl_tokens", "5"], ["unknown config key 'totl_tokens'", "did you mean 'total_tokens'"]),
    "key of another family": (["--model.l1_coefficient", "5"],
                              ["'model.l1_coefficient' does not apply to kind 'topk'", "ReLUConfig",
                               "kinds that accept it: gated, relu"]),
    "bad choice": (["--model.decoder_init", "rand"], ["'model.decoder_init' is 'rand'", "did you mean 'random'"]),
    "out of range": (["--model.k", "0"], ["'model.k' must be >= 1, got 0"]),
    "k above the width": (["--model.k", "100000"], ["'model.k' is 100000, more than n_latents (6144)"]),
    "not an integer": (["--total_tokens", "lots"], ["'total_tokens' must be an integer, got 'lots'"]),
    "unknown kind": (["--model.kind", "topkk"], ["unknown autoencoder kind 'topkk'", "did you mean 'topk'"]),
    "renamed key": (["--data.batch_size", "512"], ["'data.batch_size' was renamed to 'data.batch_tokens'"]),
    "moved key": (["--model.fast_path", "false"], ["moved to the training config's 'kernels.fast_path'"]),
    "bad device": (["--device", "gpu"], ["'device' is 'gpu', not a device"]),
    "bad kernel backend": (["--kernels.backend", "cuda"], ["'kernels.backend' is 'cuda'", "valid: torch, triton"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_training_config_is_one_line(case):
    extra, fragments = CONFIG_CASES[case]
    assert_user_error(saekit("train", TOPK, *extra), *fragments)


def test_bad_harvest_values_are_one_line(tmp_path):
    assert_user_error(saekit("harvest", "--max_tokens", "0", "--out", tmp_path / "s"), "'max_tokens' must be >= 1")
    assert_user_error(saekit("harvest", "--batch_sequences", "3", "--out", tmp_path / "s"),
                      "'shard_sequences' (256) must be a multiple of batch_sequences (3)")
    assert_user_error(saekit("harvest", "--dtype", "fp8", "--out", tmp_path / "s"), "'dtype' is 'fp8'")
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_missing_and_broken_config_files(tmp_path):
    assert_user_error(saekit("train", tmp_path / "nope.yaml"), "nope.yaml: no such config file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [topk\n")
    assert_user_error(saekit("train", broken), "broken.yaml: not valid YAML")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert_user_error(saekit("train", binary), "binary.yaml: not a text file")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    assert_user_error(saekit("train", scalar), "expected a mapping of config keys")


def test_missing_model_and_unknown_hook_at_harvest(tmp_path):
    assert_user_error(saekit("harvest", "--model", "./no-such-model", "--out", tmp_path / "s"),
                      "model './no-such-model': no such directory")
    assert_user_error(saekit("harvest", "--hooks", "blocks.9.hook_resid_post", "--out", tmp_path / "s"),
                      "unknown hook 'blocks.9.hook_resid_post'", "the model has 6 layers")


def test_missing_corrupted_and_wrong_hook_store(store, tmp_path):
    assert_user_error(saekit(*train_args(tmp_path / "none", tmp_path / "r1")), "no manifest.json")
    assert_user_error(saekit(*train_args(store, tmp_path / "r2", "--data.hook", "blocks.3.hook_mlp_out")),
                      "hook 'blocks.3.hook_mlp_out' is not in this store", "blocks.3.hook_resid_post")
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    shard = sorted(damaged.glob("shard_*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the activations
    shard.write_bytes(bytes(data))
    assert_user_error(saekit(*train_args(damaged, tmp_path / "r3")), f"shard {shard.name} does not match its sha256")
    assert_user_error(saekit(*train_args(store, tmp_path / "r4", "--data.heldout_tokens", 10**7)),
                      "'data.heldout_tokens' (10000000) leaves no training rows")


def test_run_dir_with_another_config_and_missing_runs(store, tmp_path):
    run = tmp_path / "run"
    ok = saekit(*train_args(store, run))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert_user_error(saekit(*train_args(store, run, "--total_tokens", 1024)),
                      "already holds a run with a different config", "total_tokens (512 -> 1024)")
    # A run written before a key was added to TrainConfig (here: data.source) is still the same run.
    saved = json.loads((run / "config.json").read_text())
    del saved["data"]["source"]
    (run / "config.json").write_text(json.dumps(saved))
    again = saekit(*train_args(store, run))
    assert again.returncode == 0 and "already trained" in again.stdout, again.stderr[-3000:]
    assert_user_error(saekit("evaluate", tmp_path / "no-run"), "no trained model")
    assert_user_error(saekit("analyze", tmp_path / "no-run"), "not a training run directory")
    assert_user_error(saekit("evaluate", run, "--positions", "some"), "'positions' is 'some'")


def test_failed_start_does_not_block_the_corrected_rerun(store, tmp_path):
    run = tmp_path / "run"
    assert_user_error(saekit(*train_args(store, run, "--data.hook", "blocks.3.hook_mlp_out")), "not in this store")
    ok = saekit(*train_args(store, run))  # same directory, the value fixed: no "different config"
    assert ok.returncode == 0, ok.stderr[-3000:]


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path):
    p = saekit("--debug", "train", TOPK, "--model.k", "0")
    assert p.returncode != 0 and "Traceback" in p.stderr and "FieldError" in p.stderr
    # A bug (here: an exception that is not a UserError) is never dressed up as a user error.
    code = ("import saekit.cli, saekit.harvest as h\n"
            "def boom(cfg): raise RuntimeError('a bug')\n"
            "h.harvest = boom\n"
            "raise SystemExit(saekit.cli.main(['harvest', '--out', %r]))" % str(tmp_path / "s"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" in p.stderr and "RuntimeError: a bug" in p.stderr
