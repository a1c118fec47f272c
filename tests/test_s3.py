"""A real S3 API on 127.0.0.1 (moto's server, started and stopped here by
PID): input shards and outputs on s3://, a crash mid-commit and a rerun with
every row exactly once, and no temporary or partial object under a table
prefix at any time (listings polled during the run)."""

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data import shard_name
from pipeline.executor import run_job
from pipeline.spec import load_spec, to_toml
from pipeline.store import OutputStore, committed_files, read_table
from test_outputs import HERE, edits_of, raw_job, samples
from helpers_data import write

BUCKET = "imprint-test"
MOTO_LOG = None  # the server's log: one line per request (counted by the read-ahead test)
TABLES = ("results", "sources", "noise")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = _free_port()
    global MOTO_LOG
    MOTO_LOG = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(MOTO_LOG, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def _bad_table_objects(client, out_prefix: str, checked: set) -> list[str]:
    """Keys under a table prefix that are not complete Parquet parts."""
    bad = []
    for table in TABLES:
        for key in _keys(client, f"{out_prefix}/{table}/"):
            if key.endswith("/"):
                continue  # an empty "directory" marker pyarrow may keep; no glob returns it
            name = key.rsplit("/", 1)[1]
            parts = name.split(".")
            if len(parts) < 3 or parts[-1] != "parquet" or not (parts[-2].isdigit() and len(parts[-2]) == 5):
                bad.append(key)
                continue
            if key in checked:
                continue
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            try:
                pq.read_metadata(io.BytesIO(body))
                checked.add(key)
            except Exception:
                bad.append(key)
    return bad


def test_s3_inputs_and_outputs_crash_mid_commit_then_rerun(s3, tmp_path):
    local = [write(tmp_path / "a-000.tar", samples("a", 3)), write(tmp_path / "b-001.tar", samples("b", 4))]
    urls = []
    for p in local:
        key = f"in/{Path(p).name}"
        s3.upload_file(p, BUCKET, key)
        urls.append(f"s3://{BUCKET}/{key}")
    out_prefix = "runs/one"
    out = f"s3://{BUCKET}/{out_prefix}"
    spec = load_spec(raw=raw_job(out, urls))
    spec_path = tmp_path / "job.toml"
    spec_path.write_text(to_toml(spec))

    # a crash while the second shard's first part is being uploaded
    res = subprocess.run([sys.executable, str(HERE / "crash_commit.py"), str(spec_path), "part-partial"],
                         capture_output=True, text=True, env=os.environ.copy())
    assert res.returncode == 17, res.stderr[-3000:]
    checked: set = set()
    assert _bad_table_objects(s3, out_prefix, checked) == []
    store = OutputStore.open(out)
    assert store.done_shards(spec.hash()) == {shard_name(urls[0])}
    assert len(read_table(out, "results")) == edits_of(3)
    # each upload is staged under _tmp/ and moved into place (objects.write_whole: pyarrow cannot abort an S3
    # upload), so none is left there; pyarrow may keep the empty "_tmp/" folder marker
    assert not [k for k in _objects(s3, f"{out_prefix}/") if "_tmp" in k]

    # rerun, polling the listings the whole time
    seen_bad: list = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen_bad.extend(_bad_table_objects(s3, out_prefix, checked))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        report = run_job(spec, progress=False)
    finally:
        stop.set()
        poller.join()
    assert report.skipped == 1 and report.done == 1 and not report.failed
    assert seen_bad == [] and _bad_table_objects(s3, out_prefix, checked) == []
    rows = read_table(out, "results").to_pylist()
    keys = [(r["shard"], r["key"], r["target_index"], r["seed_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == edits_of(3) + edits_of(4)
    # every object under results/ (what a glob sees) gives exactly those rows
    import pyarrow.dataset as ds

    t = ds.dataset(f"{BUCKET}/{out_prefix}/results", filesystem=store.fs, format="parquet").to_table(columns=["key"])
    assert t.num_rows == edits_of(3) + edits_of(4)
    assert all(f.startswith(f"s3://{BUCKET}/") for f in committed_files(out))
    assert run_job(spec, progress=False).skipped == 2  # resume from listings


def _gets(key: str) -> int:
    """GET requests the moto server has logged for one object."""
    return sum(1 for line in MOTO_LOG.read_text().splitlines() if f"GET /{BUCKET}/{key} HTTP" in line)  # (206 lines are coloured)


def test_object_store_shards_are_read_through_a_large_read_ahead(s3, tmp_path):
    """A 1.6 MB shard in at most 8 GET requests (unbuffered, the tar reader's
    512 B-10 KiB reads were one ranged GET each: 157 for this shard)."""
    import pyarrow.fs as pafs

    from pipeline.data import object_store, read_raw_samples

    rng = __import__("random").Random(0)
    big = [{"__key__": f"k{i:03d}", "bin": bytes(rng.getrandbits(8) for _ in range(100_000)), "txt": f"c {i}"}
           for i in range(16)]
    path = write(tmp_path / "big.tar", big)
    size = Path(path).stat().st_size
    assert 1_500_000 < size < 1_800_000
    s3.upload_file(str(path), BUCKET, "readahead/big.tar")
    url = f"s3://{BUCKET}/readahead/big.tar"
    time.sleep(0.2)  # the server's log lines are written after each response
    before = _gets("readahead/big.tar")
    t0 = time.perf_counter()
    got = list(read_raw_samples(url))
    seconds = time.perf_counter() - t0
    time.sleep(0.2)
    requests = _gets("readahead/big.tar") - before
    assert [g["__key__"] for g in got] == [b["__key__"] for b in big] and all("__error__" not in g for g in got)
    assert 1 <= requests <= 8, requests
    # the counter counts: the same shard unbuffered takes one GET per small read
    fs, key = object_store(url)
    before = _gets("readahead/big.tar")
    t1 = time.perf_counter()
    with fs.open_input_stream(key) as fh:
        import tarfile

        for m in tarfile.open(fileobj=fh, mode="r|*"):
            pass
    unbuffered_s = time.perf_counter() - t1
    time.sleep(0.2)
    unbuffered = _gets("readahead/big.tar") - before
    assert unbuffered > 50, unbuffered
    print(f"\n[read-ahead] {size / 1e6:.2f} MB shard: {requests} GET(s), {size / 1e6 / seconds:.1f} MB/s "
          f"(unbuffered: {unbuffered} GETs, {size / 1e6 / unbuffered_s:.1f} MB/s)")


class _InterruptedStream:
    """An S3 upload stream that takes half of what it is given, then is
    interrupted (Ctrl-C, or a SIGTERM turned into an exception)."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        self.real.write(bytes(data)[: max(1, len(data) // 2)])
        raise KeyboardInterrupt

    def close(self):
        self.real.close()  # what leaving `with fs.open_output_stream(...)` does: it completes the upload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _InterruptingFS:
    """A pyarrow filesystem whose uploads are interrupted mid-way (`_InterruptedStream`)."""

    def __init__(self, real):
        self.real = real

    def open_output_stream(self, path, *a, **k):
        return _InterruptedStream(self.real.open_output_stream(path, *a, **k))

    def __getattr__(self, name):
        return getattr(self.real, name)


def _objects(client, prefix: str) -> list[str]:
    return [k for k in _keys(client, prefix) if not k.endswith("/")]  # "folder/" markers pyarrow may leave are no data


def test_an_interrupted_upload_leaves_no_object_store_write_bytes(s3):
    """Issue 31, item 9 (the output store): no truncated object under its final name, nothing staged left."""
    store = OutputStore.open(f"s3://{BUCKET}/interrupted")
    store.fs = _InterruptingFS(store.fs)
    with pytest.raises(KeyboardInterrupt):
        store.write_bytes("_done/shard.json", b"x" * 100_000)
    assert _objects(s3, "interrupted/") == []


def test_an_interrupted_upload_leaves_no_object_imprint_shards(s3, tmp_path, monkeypatch):
    """Issue 31, item 9 (`imprint shards` to s3://): no truncated shard under its final name."""
    from helpers_data import image_bytes
    from pipeline import ingest

    src = tmp_path / "f"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(image_bytes(seed=i))
    real_object_store = ingest.object_store

    def interrupting_store(url):
        fs, path = real_object_store(url)
        return _InterruptingFS(fs), path

    monkeypatch.setattr(ingest, "object_store", interrupting_store)
    with pytest.raises(KeyboardInterrupt):
        ingest.make_shards(str(src), f"s3://{BUCKET}/ingested/", progress=False)
    assert _objects(s3, "ingested/") == []
