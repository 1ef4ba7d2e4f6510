"""The edges of the data plane: damaged stores on resume, empty and undecodable input, damaged manifests,
full disks, concurrent writers, hostile tokens in HTML. Each case failed before its fix."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit.analysis.dashboard import Example, FeatureCard, anomaly_html, index_html
from saekit.config import HarvestConfig
from saekit.data.store import CorruptShardError, StoreError, StoreReader, StoreWriter
from saekit.errors import UserError
from saekit.files import atomic_write, directory_lock, sha256_file, write_json
from saekit.harvest import harvest
from test_data_store import CONFIG, D, HOOKS, META, make_batch

ROOT = Path(__file__).resolve().parents[1]


def saekit(*args):
    return subprocess.run([sys.executable, "-m", "saekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_line_error(p, *fragments):
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert all(f in line for f in fragments), line
    return line


def flip_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ resume integrity
def test_resume_refuses_a_store_with_a_damaged_listed_shard(tmp_path):
    """A killed harvest (here: closed unfinished) whose first shard was altered on disk is not extended."""
    store = tmp_path / "st"
    w = StoreWriter(store, META, CONFIG, HOOKS, D, shard_sequences=5)
    w.add(*make_batch(0, 10))  # two whole shards
    w.close()
    assert not json.loads((store / "manifest.json").read_text())["complete"]
    flip_byte(store / "shard_00000.safetensors")  # same size: only the checksum can tell
    with pytest.raises(CorruptShardError, match="shard_00000.safetensors: does not match its sha256"):
        StoreWriter(store, META, CONFIG, HOOKS, D, shard_sequences=5)
    assert not json.loads((store / "manifest.json").read_text())["complete"]


def test_sha256_file_streams_the_same_digest(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=1 << 20) == hashlib.sha256(data).hexdigest()


def test_cli_harvest_resume_names_the_damaged_shard(tmp_path):
    store = tmp_path / "store"
    args = ["harvest", "--out", store, "--max_tokens", 800, "--batch_sequences", 8, "--shard_sequences", 8,
            "--context_size", 32, "--progress", "false", "--device", "cpu"]
    assert saekit(*args).returncode == 0
    flip_byte(store / "shard_00000.safetensors")
    one_line_error(saekit(*args), "shard_00000.safetensors: does not match its sha256")


# -------------------------------------------------------------------------------- empty input
def test_empty_text_file_is_refused_before_any_store_exists(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    out = tmp_path / "store"
    one_line_error(saekit("harvest", "--dataset", empty, "--out", out, "--device", "cpu"),
                   f"dataset '{empty}' holds no text")
    assert not out.exists()
    one_line_error(saekit("harvest", "--max_tokens", -5, "--out", out), "'max_tokens' must be >= 1, got -5")


def test_text_of_only_special_tokens_never_makes_a_complete_store(tmp_path):
    specials = tmp_path / "specials.txt"
    specials.write_text("[CLS] [SEP]\n\n[SEP]\n")
    with pytest.raises(UserError, match="the text gave no activation rows"):
        harvest(HarvestConfig(out=str(tmp_path / "store"), dataset=str(specials), max_tokens=100,
                              context_size=8, batch_sequences=1, shard_sequences=1, progress=False, device="cpu"))
    assert not StoreReader(tmp_path / "store", verify=False).complete


# -------------------------------------------------------------------------- undecodable input
def test_undecodable_text_names_the_file_and_byte_and_replace_reads_it(tmp_path):
    bad = tmp_path / "latin1.txt"
    text = "plain ascii words come first here\n\n" * 3 + "caf\u00e9 cr\u00e8me\n"
    bad.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    out = tmp_path / "store"
    common = ["--dataset", bad, "--out", out, "--device", "cpu", "--progress", "false", "--context_size", 16,
              "--batch_sequences", 1, "--shard_sequences", 1, "--max_tokens", 20]
    one_line_error(saekit("harvest", *common), f"{bad}: byte {offset} is not valid utf-8 text", "text_errors")
    assert saekit("harvest", *common, "--text_encoding", "latin-1").returncode == 0


@pytest.mark.parametrize("content,fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not valid JSON"),
    (b"[1, 2, 3]", "not a saekit activation store"),
    (b'{"format": "saekit.activation_store", "format_version": 1, "hooks": ["h"], "d_model": 8}',
     "'dtype' should be a str, got missing"),
])
def test_damaged_manifests_are_named_errors(tmp_path, content, fragment):
    store = tmp_path / "st"
    w = StoreWriter(store, META, CONFIG, HOOKS, D, shard_sequences=5)
    w.add(*make_batch(0, 5))
    w.finish()
    (store / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match=fragment) as err:
        StoreReader(store)
    assert str(store / "manifest.json") in str(err.value)


def test_shard_entry_of_the_wrong_shape(tmp_path):
    store = tmp_path / "st"
    w = StoreWriter(store, META, CONFIG, HOOKS, D, shard_sequences=5)
    w.add(*make_batch(0, 5))
    w.finish()
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["bytes"] = "many"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"'shards\[0\].bytes' should be a int, got str 'many'"):
        StoreReader(store)


# ---------------------------------------------------------------------- messages at the edges
def test_missing_text_file_is_not_looked_up_on_the_hub(tmp_path):
    one_line_error(saekit("harvest", "--dataset", tmp_path / "nope.txt", "--out", tmp_path / "s"),
                   "nope.txt': no such file or directory")


def test_full_disk_names_the_path(tmp_path):
    """The kernel's own ENOSPC: the temporary file atomic writes go through is /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    target = tmp_path / "eval.json"
    (tmp_path / "eval.tmp.json").symlink_to("/dev/full")
    with pytest.raises(UserError, match=f"no space left on the device writing {target}"):
        write_json(target, {"fvu": 0.1})
    assert not target.exists()
    (tmp_path / "shard.tmp.safetensors").symlink_to("/dev/full")
    with pytest.raises(UserError, match="no space left"):
        atomic_write(tmp_path / "shard.safetensors", b"x" * 10_000)


# ------------------------------------------------------------------------------------- the lock
HOLD = """
import sys, time
from saekit.files import directory_lock
with directory_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A real second process holding the lock on tmp_path/out; yields (directory, process)."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield out, p
    p.kill()
    p.wait()


def test_second_writer_is_refused_with_the_holders_pid(held):
    out, p = held
    with pytest.raises(UserError, match=f"being written by another .* process \\(PID {p.pid}\\)"):
        with directory_lock(out):
            pass
    one_line_error(saekit("harvest", "--out", out, "--max_tokens", 100, "--device", "cpu"), f"PID {p.pid}")
    one_line_error(saekit("train", "--out", out, "--data.store", out), f"PID {p.pid}")


def test_the_kernel_releases_the_lock_of_a_killed_writer(held):
    out, p = held
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while True:  # the lock is gone as soon as the process is
        try:
            with directory_lock(out):
                break
        except UserError:
            assert time.time() < deadline
            time.sleep(0.05)


# --------------------------------------------------------------------------- hostile tokens
def test_control_characters_render_visibly_and_escaped():
    tokens = ["a\x00b", "<script>", "\x1b[31m", "tab\tnew\nline", "\x7f"]
    ex = Example(tokens=tokens, acts=[1.0] * 5, center=0, activation=1.0)
    card = FeatureCard(latent=3, density=0.1, max_act=1.0, mean_act=0.5, top=[ex],
                       lens_pos=[("\x00", 1.0)], lens_neg=[("\x01x", -1.0)])
    pages = [card.html(), card._repr_html_(), index_html([card]),
             anomaly_html([{"context": tokens, "index": 1, "score": 2.0}])]
    for page in pages:
        assert not any(ord(ch) < 0x20 and ch not in "\t\n" or ord(ch) == 0x7F for ch in page), page
        assert "<script>" not in page
    assert "a\u2400b" in pages[0] and "\u241b[31m" in pages[0] and "\u2421" in pages[0]
    assert "tab\tnew\nline" in pages[0]  # layout characters stay layout
    assert "\u2400" in pages[2] and "&lt;script&gt;" in pages[3]


def test_worst_reconstructed_tokens_read_as_running_text(minilm_run, tmp_path):
    """WordPiece continuations lose their '##' in the worst-token list, as they do in the cards."""
    from saekit.analysis import FeatureReport

    report = FeatureReport.build(minilm_run, max_tokens=2000, progress=False)
    page = report.write_html(tmp_path / "index.html", report.pick_features(3), worst=40).read_text()
    section = page.split("Worst-reconstructed tokens")[1].split("<h2>")[0]
    assert section.count('class="ex"') == 40
    assert "##" not in section
