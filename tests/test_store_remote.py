"""Activation stores on object storage, each against a real server on 127.0.0.1 and the real fsspec client:
S3 (moto's standalone server, s3fs) and Google Cloud Storage (gcp-storage-emulator, gcsfs). On each, a
harvest killed with SIGKILL and resumed equals a local harvest byte for byte, a damaged object is named,
and training from the bucket gives the weights training from disk does."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saekit.config import DataConfig, HarvestConfig
from saekit.data.store import CorruptShardError, StoreError, StoreReader, StoreWriter, store_location
from saekit.errors import UserError
from saekit.harvest import harvest
from support import HOOK, save_tiny, write_corpus
from test_data_store import CONFIG, D, HOOKS, META, make_batch

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "saekit-test"
# Small shards, so the killed harvest has written some and not all of them.
HARVEST = dict(hooks=[HOOK], context_size=32, max_tokens=3000, batch_sequences=2, shard_sequences=2,
               device="cpu", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the standard AWS variables point every client (this
    process, its subprocesses) at it. Yields an s3fs filesystem."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:  # the variables are restored after the module
        for k, v in env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def gcs():
    """gcp-storage-emulator's GCS server on 127.0.0.1 with one bucket; STORAGE_EMULATOR_HOST points every
    gcsfs client (this process, its subprocesses) at it. Yields a gcsfs filesystem."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    with pytest.MonkeyPatch.context() as mp:
        # gcsfs's default class first asks the gRPC storage-control API for the bucket's type, which the
        # emulator does not serve (each call would wait out a 60 s timeout): the plain JSON-API class.
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported
        gcsfs = pytest.importorskip("gcsfs")
        port = _free_port()
        server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        gcsfs.GCSFileSystem.clear_instance_cache()
        yield gcsfs.GCSFileSystem()
        gcsfs.GCSFileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module", params=["s3", "gs"])
def bucket(request):
    """(filesystem, the test bucket's URL) on each object store."""
    fs = request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return fs, f"{request.param}://{BUCKET}"


def _key(url: str) -> str:
    """An object URL as its filesystem's path (the bucket and key)."""
    return url.split("://", 1)[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny("gpt2", root / "gpt2"), write_corpus(root / "corpus.txt")


def _harvest_cfg(out, tiny) -> HarvestConfig:
    model, corpus = tiny
    return HarvestConfig(out=str(out), model=str(model), dataset=str(corpus), **HARVEST)


def _cli_harvest(out: str, tiny) -> subprocess.Popen:
    model, corpus = tiny
    args = ["--out", out, "--model", model, "--dataset", corpus, "--hooks", HOOK]
    args += [x for k, v in HARVEST.items() if k != "hooks" for x in (f"--{k}", str(v).lower())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "saekit.cli", "harvest", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _listed(fs, url: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(f"{_key(url)}/manifest.json"))
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def stores(bucket, tiny, tmp_path_factory):
    """(local store, the bucket's URL of the same harvest, killed once mid-way with SIGKILL and resumed)."""
    fs, root = bucket
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the OMP_NUM_THREADS=1 subprocess
    try:
        local = harvest(_harvest_cfg(tmp_path_factory.mktemp("local") / "store", tiny))
        url = f"{root}/store"
        proc = _cli_harvest(url, tiny)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            manifest = _listed(fs, url)
            if manifest and len(manifest["shards"]) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        killed = _listed(fs, url)
        assert killed is not None and not killed["complete"] and len(killed["shards"]) >= 3  # really mid-way
        assert harvest(_harvest_cfg(url, tiny)) == url  # the resume, in this process
    finally:
        torch.set_num_threads(threads)
    return local, url


def test_killed_and_resumed_remote_harvest_equals_the_local_one(bucket, stores):
    (fs, _), (local, url) = bucket, stores
    files = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))  # not the lock file
    objects = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(_key(url), refresh=True))
    assert objects == files and len(files) > 10
    for name in files:
        assert fs.cat_file(f"{_key(url)}/{name}") == (local / name).read_bytes(), name
    remote, disk = StoreReader(url), StoreReader(local)
    assert remote.complete and remote.n_rows == disk.n_rows == 3000
    rows = torch.randperm(remote.n_rows, generator=torch.Generator().manual_seed(0))[:500]
    assert torch.equal(remote.activations(HOOK, rows=rows), disk.activations(HOOK, rows=rows))
    assert all(torch.equal(a, b) for a, b in zip(remote.token_info(rows), disk.token_info(rows)))


def test_training_from_a_bucket_gives_the_weights_of_training_from_disk(stores, tmp_path, one_thread):
    from saekit.autoencoders import TopKConfig
    from saekit.config import TrainConfig
    from saekit.training import train

    def weights(store, name):
        # buffer_tokens well under a shard's worth of the store: many fills, each prefetching the next
        cfg = TrainConfig(out=str(tmp_path / name), total_tokens=2048, progress=False, lr=2e-3,
                          data=DataConfig(store=str(store), hook=HOOK, batch_tokens=128, buffer_tokens=256,
                                          heldout_tokens=500), model=TopKConfig(n_latents=64, k=4))
        run = Path(train(cfg))
        return run, {f.name: load_file(f) for f in sorted((run / "model").glob("*.safetensors"))}

    local, url = stores
    (_, on_disk), (run, remote) = weights(local, "local"), weights(url, "remote")
    assert on_disk and on_disk.keys() == remote.keys()
    for name, tensors in on_disk.items():
        assert tensors.keys() == remote[name].keys()
        assert all(torch.equal(t, remote[name][k]) for k, t in tensors.items()), name
    # Analysis reads the run's store setting through pathlib (s3:/...): still the bucket.
    from saekit.analysis import FeatureReport

    report = FeatureReport.build(run, max_tokens=600, batch_tokens=256, progress=False, device="cpu")
    assert str(report.reader.directory) == url and report.stats.n_tokens == 600


def test_compare_on_a_bucket_store_trains_from_it_without_harvesting(bucket, stores, tiny, tmp_path,
                                                                      one_thread):
    from saekit.compare import compare

    fs, _ = bucket
    _, url = stores
    manifest = fs.cat_file(f"{_key(url)}/manifest.json")
    model, corpus = tiny
    cfg = {"out": str(tmp_path / "out"), "store": url,
           "harvest": {"model": str(model), "dataset": str(corpus), **HARVEST},
           "train": {"total_tokens": 512, "device": "cpu", "log_every_steps": 2, "model": {"n_latents": 32},
                     "data": {"hook": HOOK, "batch_tokens": 128, "buffer_tokens": 512, "heldout_tokens": 500}},
           "eval": {"downstream_sequences": 2, "device": "cpu"},
           "models": [{"name": "topk", "model": {"kind": "topk", "k": 4}}, {"model": {"kind": "pca", "n_latents": 8}}]}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(cfg))
    report = compare(tmp_path / "compare.yaml")
    assert fs.cat_file(f"{_key(url)}/manifest.json") == manifest  # the complete store was not harvested again
    md = report.read_text()
    assert f"Store `{url}`" in md and "| topk |" in md and "| pca |" in md
    rows = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["topk", "pca"] and all(r["fvu"] >= 0 for r in rows)
    assert all(r["downstream_name"] == "ce_loss_recovered" for r in rows)


def _small_store(url: str) -> str:
    w = StoreWriter(url, META, CONFIG, HOOKS, D, shard_sequences=5)
    w.add(*make_batch(0, 15))
    w.finish()
    return url


def test_a_damaged_object_is_a_corrupt_shard_error_naming_it(bucket):
    fs, root = bucket
    url = _small_store(f"{root}/damaged")
    key = f"{BUCKET}/damaged/shard_00001.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-10] ^= 0xFF  # same size: only the checksum can tell
    fs.pipe_file(key, bytes(data))
    reader = StoreReader(url)
    reader.activations(HOOKS[0], rows=(0, 5))  # shard 0 is intact
    with pytest.raises(CorruptShardError, match=f"shard_00001.safetensors does not match its sha256 checksum "
                                                f"\\({url}/shard_00001.safetensors\\)"):
        reader.activations(HOOKS[0])
    with pytest.raises(CorruptShardError, match=f"{url}/shard_00001.safetensors: does not match its sha256"):
        StoreWriter(url, META, CONFIG, HOOKS, D, shard_sequences=5)  # nor is it resumed
    fs.rm_file(key)
    with pytest.raises(CorruptShardError, match="shard shard_00001.safetensors is missing"):
        StoreReader(url).activations(HOOKS[0])


def test_prefetch_fetches_ahead_within_the_cache_bound(bucket):
    url = _small_store(f"{bucket[1]}/prefetch")
    reader = StoreReader(url, cache_shards=2)
    reader.prefetch([2, 0, 1])
    for job in list(reader._cache.values()):
        job.result()
    assert list(reader._cache) == [2, 0]  # the first two announced, fetched before any read
    expect = StoreReader(url).activations(HOOKS[0])
    lo, hi = reader.row_starts[2], reader.row_starts[3]
    assert torch.equal(reader.activations(HOOKS[0], rows=(int(lo), int(hi))), expect[lo:hi])
    # Shard 2 is read, so it makes room for shard 1, the next announced one.
    assert set(reader._cache) == {0, 1} and reader._upcoming == [0, 1]
    assert torch.equal(reader.activations(HOOKS[0]), expect)
    assert len(reader._cache) <= 2


def test_backend_errors_are_one_line_and_name_the_url(s3):
    missing = f"s3://no-such-bucket-{os.getpid()}/store"
    with pytest.raises(StoreError, match=f"^{missing}: cannot use this store .*bucket does not exist"):
        StoreWriter(missing, META, CONFIG, HOOKS, D)
    closed = {"endpoint_url": f"http://127.0.0.1:{_free_port()}",
              "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    url = f"s3://{BUCKET}/store"
    with pytest.raises(StoreError, match=f"^{url}: cannot use this store \\(EndpointConnectionError") as err:
        StoreReader(url, storage_options=closed)
    assert "\n" not in str(err.value)


def test_a_missing_gcs_bucket_is_one_line_naming_the_url(gcs):
    # (A closed endpoint is the s3 test's case: gcsfs retries it with backoff for about 30 s.)
    missing = f"gs://no-such-bucket-{os.getpid()}/store"
    with pytest.raises(StoreError, match=f"^{missing}: cannot use this store .*STORAGE_EMULATOR_HOST") as err:
        StoreWriter(missing, META, CONFIG, HOOKS, D)
    assert "\n" not in str(err.value)


def test_without_s3fs_the_error_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['s3fs'] = None\n"  # as if s3fs were not installed
            "from saekit.data.store import StoreReader\n"
            "from saekit.errors import UserError\n"
            "try:\n    StoreReader('s3://bucket/store')\n"
            "except UserError as err:\n    print(err)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("s3://bucket/store: s3:// stores need") and "pip install saekit[s3]" in lines[0]


def test_locations():
    assert store_location("runs/store") == Path("runs/store")
    assert store_location("file:///tmp/store") == Path("/tmp/store")
    assert store_location("s3://bucket/store/") == "s3://bucket/store"
    assert store_location(Path("s3://bucket/store")) == "s3://bucket/store"  # pathlib folded the //
    assert store_location(Path("gs://b/x")) == "gs://b/x" and store_location("hf://datasets/o/r") == "hf://datasets/o/r"
    with pytest.raises(UserError, match="^nosuchproto://x: Protocol not known: nosuchproto; a store is a local"):
        StoreReader("nosuchproto://x")
