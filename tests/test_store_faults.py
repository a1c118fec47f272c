"""The output store's commit protocol under injected file-system faults.

A small job (four shards, a few rows each, written by a fake worker through
the real ShardWriter, with one part per row so every shard has several
parts) runs against a FaultFS (tests/faultfs.py): any open, read, write,
close, list, stat, delete, move or mkdir may fail, transiently or
permanently, before or after the real operation. Some seeds also run a
"timed-out" attempt of a shard that keeps writing while its retry commits.
After a few faulty runs the faults stop and the job runs once more. Checked
for every seed: every row is present exactly once; a committed file of a
completed shard, and any file of another job's output beside it, is never
deleted; a finished output's globs (every part under results/ and sources/)
hold committed rows only. A failing seed is printed: replay it with
`IMPRINT_FAULT_SEED=N pytest tests/test_store_faults.py -k replay`."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipeline.store as store_mod
from faultfs import FaultFS
from pipeline.executor import _finish_output
from pipeline.store import STAGING, OutputError, OutputStore
from test_s3 import s3  # noqa: F401  (the moto server fixture)

SPEC, OTHER = "spec00000001", "spec00000002"
SHARDS = {"s0-00000000": 3, "s1-11111111": 5, "s2-22222222": 1, "s3-33333333": 4}
LOCAL_SEEDS = int(os.environ.get("IMPRINT_FAULT_SEEDS", "1000"))
# every call is an HTTP request to the moto server: about 6 s a seed on one shared core
S3_SEEDS = int(os.environ.get("IMPRINT_FAULT_SEEDS_S3", "4"))
S3_SEEDS_SLOW = 40


def rows(shard: str) -> list[dict]:
    return [{"key": f"{shard}/{i}", "shard": shard, "status": "ok"} for i in range(SHARDS[shard])]


def attempt(store: OutputStore, shard: str, spec: str = SPEC, stop_after: int | None = None):
    """A fake worker's attempt: one part per row, a sources part, the
    marker. Returns the writer (unfinished when `stop_after` rows were written)."""
    w = store.shard_writer(shard, ["results", "sources"], {"spec_hash": spec})
    w.part_bytes = 1  # every add() writes a part
    try:
        for i, row in enumerate(rows(shard)):
            if stop_after is not None and i == stop_after:
                return w
            w.add("results", [row])
        w.add("sources", [{"key": shard, "shard": shard, "status": "ok"}])
        w.commit({"images": SHARDS[shard], "errors": 0, "edits": SHARDS[shard], "kept": 0}, spec)
        return None
    except BaseException:
        w.abort()
        raise


def finish(w, store: OutputStore, spec: str = SPEC) -> None:
    """Let a paused attempt go on to its commit."""
    try:
        for row in rows(w.shard)[len(w.files):]:
            w.add("results", [row])
        w.add("sources", [{"key": w.shard, "shard": w.shard, "status": "ok"}])
        w.commit({"images": 0, "errors": 0, "edits": 0, "kept": 0}, spec)
    except OSError:
        w.abort()


def driver_run(fs, root: str, rng: random.Random) -> None:
    """One run of the job as the executor does it: prepare (lease, sweep),
    the pending shards with up to 3 attempts each, then the end-of-job
    cleanup. Any OutputError (a refused start) ends the run."""
    store = OutputStore(fs, root)
    try:
        store.prepare("spec = 1\n", SPEC)
    except OutputError:
        return
    try:
        try:
            done = store.done_shards(SPEC)
        except OutputError:
            return
        for shard in SHARDS:
            if shard in done:
                continue
            paused = None
            if rng.random() < 0.15:  # an attempt that times out but keeps running
                try:
                    paused = attempt(store, shard, stop_after=rng.randint(0, SHARDS[shard]))
                except OSError:
                    paused = None
            for _ in range(3):
                try:
                    attempt(store, shard)
                    break
                except OSError:
                    continue
            else:
                store.mark_failed(shard, {"error": "three attempts failed"})
            if paused is not None:
                if rng.random() < 0.5:
                    finish(paused, store)
                else:
                    paused.abort()
    finally:
        _finish_output(store, SPEC)


def snapshot(fs, root: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


def committed(fs, root: str) -> dict[str, dict[str, int]]:
    """shard -> {path: size} of its counting commit."""
    store = OutputStore(fs, root)
    return {shard: {store._p(rel): size for rel, size in files}
            for shard, files in store._committed_files(store._listing(), SPEC).items()}


def simulate(seed: int, base: pafs.FileSystem, root: str, rate: float = 0.05) -> None:
    rng = random.Random(seed)
    other_root = root + "-other"  # another job's output beside it (a shared key prefix on S3)
    other = OutputStore(base, other_root)
    other.write_json("job.json", {"spec_hash": OTHER})
    attempt(other, "s0-00000000", OTHER)
    other_files = snapshot(base, other_root)

    ffs = FaultFS(base, seed, rate=rate, permanent_rate=rate / 10)
    seen: dict[str, dict[str, int]] = {}
    for _ in range(rng.randint(1, 3)):
        driver_run(ffs, root, rng)
        ffs.active, was = False, ffs.active
        now = snapshot(base, root)
        for shard, files in seen.items():
            for path, size in files.items():
                assert now.get(path) == size, f"seed {seed}: committed file of done shard {shard} gone: {path}"
        for shard, files in committed(base, root).items():
            seen.setdefault(shard, files)
        assert snapshot(base, other_root) == other_files, f"seed {seed}: another job's output was touched"
        ffs.active = was
    ffs.heal()
    driver_run(ffs, root, rng)

    store = OutputStore(base, root)
    assert store.done_shards(SPEC) == set(SHARDS), f"seed {seed}: not every shard done after the clean rerun"
    keys = [k for f in store.table_files("results")
            for k in pq.ParquetFile(base.open_input_file(f)).read(columns=["key"]).column("key").to_pylist()]
    expected = [r["key"] for s in SHARDS for r in rows(s)]
    assert sorted(keys) == sorted(expected), f"seed {seed}: rows missing or duplicated"
    for table in ("results", "sources"):
        assert store.all_table_files(table) == store.table_files(table), \
            f"seed {seed}: {table}/ holds parts that are not committed"
    assert not [p for p in snapshot(base, root) if f"/{STAGING}/" in p], f"seed {seed}: staged files left"
    now = snapshot(base, root)
    for shard, files in seen.items():
        for path, size in files.items():
            assert now.get(path) == size, f"seed {seed}: committed file of done shard {shard} gone: {path}"
    assert snapshot(base, other_root) == other_files, f"seed {seed}: another job's output was touched"


@pytest.fixture(autouse=True)
def fast_protocol(monkeypatch):
    """No settle wait in the lease, and the fake worker's tables and Parquet
    bytes encoded once per distinct content (encoding is a pure function of
    the rows; the protocol under test is everything around it)."""
    monkeypatch.setattr(store_mod, "LEASE_SETTLE_S", 0.0)
    tables, parts = {}, {}
    real_rows, real_encode = store_mod.table_from_rows, store_mod.encode_part

    def rows_once(name, rows, metadata):
        key = (name, tuple(r["key"] for r in rows), tuple(sorted(metadata.items())))
        if key not in tables:
            tables[key] = real_rows(name, rows, metadata)
        return tables[key]

    def encode_once(name, batches, metadata):
        key = (name, tuple(id(b) for b in batches), tuple(sorted(metadata.items())))
        if key not in parts:
            parts[key] = real_encode(name, batches, metadata)
        return parts[key]

    monkeypatch.setattr(store_mod, "table_from_rows", rows_once)
    monkeypatch.setattr(store_mod, "encode_part", encode_once)


@pytest.fixture
def dead_drivers(monkeypatch):
    """Every simulated driver runs in this process: a lease whose driver is
    not running (crashed mid-run, as the faults make it) counts as a dead
    process's lease on this host."""
    monkeypatch.setattr(store_mod, "_gone", lambda rec: True)


def test_local_disk_under_faults(tmp_path, dead_drivers):
    base = pafs.LocalFileSystem()
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):  # the same protocol, without disk latency
        import tempfile

        tmp_path = Path(tempfile.mkdtemp(prefix="imprint-faults-", dir="/dev/shm"))
    failed = []
    for seed in range(LOCAL_SEEDS):
        try:
            simulate(seed, base, str(tmp_path / f"o{seed}" / "out"))
        except AssertionError as exc:
            failed.append(str(exc))
            if len(failed) >= 3:
                break
    if str(tmp_path).startswith("/dev/shm/"):
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert not failed, "failing seeds (replay with IMPRINT_FAULT_SEED=N pytest -k replay):\n" + "\n".join(failed)


@pytest.mark.skipif("IMPRINT_FAULT_SEED" not in os.environ, reason="set IMPRINT_FAULT_SEED=N to replay one seed")
def test_replay(tmp_path, dead_drivers):
    simulate(int(os.environ["IMPRINT_FAULT_SEED"]), pafs.LocalFileSystem(), str(tmp_path / "out"))


@pytest.mark.parametrize("seeds", [pytest.param(S3_SEEDS, id="quick"),
                                   pytest.param(S3_SEEDS_SLOW, id="many", marks=pytest.mark.slow)])
def test_s3_under_faults(s3, dead_drivers, seeds):
    from test_s3 import BUCKET

    base = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1",
                             allow_bucket_creation=False)
    failed = []
    for seed in range(seeds):
        try:
            simulate(seed, base, f"{BUCKET}/faults/{seeds}/o{seed}/out")
        except AssertionError as exc:
            failed.append(str(exc))
            break
    assert not failed, failed
