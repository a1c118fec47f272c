"""The output store fails closed, one test per measured defect: a folder or
a truncated file in place of job.json, an unreadable marker, a second
driver, a stale lease, a timed-out attempt beside its retry, parts of a
failed shard after the job, `imprint verify` on a bit flip and a
truncation, `imprint status` from listings, and a read refused mid-shard
(retried, never committed as tar damage). Store-level tests drive the
commit protocol with a fake worker (milliseconds); two end-to-end runs use
the tiny model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline.store as store_mod
from pipeline.cli import app
from pipeline.data import ShardReadError, read_raw_samples
from pipeline.executor import JobError, _finish_output, run_job
from pipeline.store import (DONE, FAILED, LEASE_FILE, META_FILE, LeaseHeld, LeaseLost, OutputStore,
                            OutputUnreadable, parse_marker_name)
from test_outputs import edits_of, job, samples
from helpers_data import write

SPEC, OTHER = "spec00000001", "spec00000002"


@pytest.fixture(autouse=True)
def fast_lease(monkeypatch):
    monkeypatch.setattr(store_mod, "LEASE_SETTLE_S", 0.0)


def commit(store: OutputStore, shard: str, n: int = 2, spec: str = SPEC):
    w = store.shard_writer(shard, ["results", "sources"], {"spec_hash": spec})
    w.part_bytes = 1
    for i in range(n):
        w.add("results", [{"key": f"{shard}/{i}", "shard": shard}])
    w.add("sources", [{"key": shard, "shard": shard}])
    w.commit({"images": n, "errors": 0, "edits": n, "kept": n}, spec)
    return w


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.startswith("write-test-")}


def tables_and_markers(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(root).items() if k.split("/")[0] in ("results", "sources", DONE)}


@pytest.fixture
def committed_output(tmp_path):
    """An output of spec OTHER with two committed shards, lease released."""
    out = tmp_path / "out"
    store = OutputStore.open(str(out))
    store.prepare("x = 1\n", OTHER)
    commit(store, "a-00000001")
    commit(store, "b-00000002", spec=OTHER)
    _finish_output(store, OTHER)
    # (a-00000001 was committed under SPEC by a fake worker: its marker is kept
    # as another spec's, untouched by OTHER's sweep)
    return out


@pytest.mark.parametrize("damage", ["folder", "truncated", "not-an-object", "no-hash"])
def test_unreadable_job_json_refuses_and_deletes_nothing(committed_output, damage):
    meta = committed_output / META_FILE
    if damage == "folder":
        meta.unlink()
        meta.mkdir()
    elif damage == "truncated":
        meta.write_text(meta.read_text()[:10])
    elif damage == "not-an-object":
        meta.write_text("[1, 2]")
    else:
        meta.write_text('{"updated": 1}')
    before = tables_and_markers(committed_output)
    with pytest.raises(OutputUnreadable, match="job.json"):
        OutputStore.open(str(committed_output)).prepare("y = 2\n", SPEC)  # a changed spec
    assert tables_and_markers(committed_output) == before
    assert not (committed_output / LEASE_FILE).exists()


def test_missing_job_json_with_another_specs_markers_is_refused(committed_output):
    (committed_output / META_FILE).unlink()
    before = tables_and_markers(committed_output)
    with pytest.raises(store_mod.OutputError, match="another job spec"):
        OutputStore.open(str(committed_output)).prepare("y = 2\n", "spec00000009")
    assert tables_and_markers(committed_output) == before


def test_unreadable_marker_the_sweep_would_delete_stops_it(committed_output):
    store = OutputStore.open(str(committed_output))
    # a marker of OTHER whose parts are gone: the sweep would delete it, but cannot read it
    marker = next((committed_output / DONE).glob("b-00000002.*.json"))
    for p in (committed_output / "results").glob("b-00000002.*"):
        p.unlink()
    marker.write_text(marker.read_text()[:20])
    before = tables_and_markers(committed_output)
    with pytest.raises(OutputUnreadable, match="b-00000002"):
        store.prepare("x = 1\n", OTHER)
    assert tables_and_markers(committed_output) == before


def test_something_else_in_done_refuses(committed_output):
    (committed_output / DONE / "notes").mkdir()
    with pytest.raises(OutputUnreadable, match="not a done marker"):
        OutputStore.open(str(committed_output)).prepare("x = 1\n", OTHER)


def test_second_driver_is_refused_naming_the_holder(committed_output):
    first = OutputStore.open(str(committed_output))
    first.prepare("x = 1\n", OTHER)
    holder = json.loads((committed_output / LEASE_FILE).read_text())
    before = tables_and_markers(committed_output)
    with pytest.raises(LeaseHeld) as err:
        OutputStore.open(str(committed_output)).prepare("x = 1\n", OTHER)
    assert f"pid {holder['pid']}" in str(err.value) and holder["host"] in str(err.value)
    assert holder["id"] in str(err.value)
    assert tables_and_markers(committed_output) == before
    first.release()
    assert not (committed_output / LEASE_FILE).exists()
    OutputStore.open(str(committed_output)).prepare("x = 1\n", OTHER)  # free again


def test_stale_lease_is_taken_over_only_after_it_expires(committed_output, monkeypatch):
    lease = {"id": "f" * 32, "host": "another-host", "pid": 1, "started": time.time() - 500,
             "heartbeat": time.time() - 30, "ttl_s": 60}
    (committed_output / LEASE_FILE).write_text(json.dumps(lease))
    with pytest.raises(LeaseHeld, match="another-host"):
        OutputStore.open(str(committed_output)).prepare("x = 1\n", OTHER)
    lease["heartbeat"] = time.time() - 61
    (committed_output / LEASE_FILE).write_text(json.dumps(lease))
    store = OutputStore.open(str(committed_output))
    store.prepare("x = 1\n", OTHER)
    assert json.loads((committed_output / LEASE_FILE).read_text())["id"] == store.lease.id
    store.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over(committed_output):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = {"id": "e" * 32, "host": socket.gethostname(), "pid": int(dead.stdout), "started": time.time(),
             "heartbeat": time.time(), "ttl_s": 600}
    (committed_output / LEASE_FILE).write_text(json.dumps(lease))
    store = OutputStore.open(str(committed_output))
    store.prepare("x = 1\n", OTHER)
    on_disk = json.loads((committed_output / LEASE_FILE).read_text())
    assert on_disk["id"] == store.lease.id != lease["id"]  # the dead driver's lease is replaced by ours
    assert (on_disk["host"], on_disk["pid"]) == (socket.gethostname(), os.getpid())
    store.release()
    assert not (committed_output / LEASE_FILE).exists()  # given up at the end


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "LEASE_TTL_S", 0.4)
    store = OutputStore.open(str(tmp_path / "out"))
    store.prepare("x = 1\n", SPEC)
    first = json.loads((tmp_path / "out" / LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.35)
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["heartbeat"] > first
    other = dict(json.loads((tmp_path / "out" / LEASE_FILE).read_text()), id="0" * 32, host="elsewhere")
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps(other))
    time.sleep(0.35)
    assert "elsewhere" in store.lease.lost
    # A driver that lost its lease (stopped past its TTL, then resumed) commits nothing more.
    with pytest.raises(LeaseLost, match="elsewhere"):
        commit(store, "a-00000001")
    assert not list((tmp_path / "out" / DONE).iterdir())
    (tmp_path / "out" / "results" / "a-00000001.0123456789ab.00000.parquet").write_bytes(b"stray")
    assert _finish_output(store, SPEC) is None
    # a lost lease deletes nothing at the end of the job
    assert (tmp_path / "out" / "results" / "a-00000001.0123456789ab.00000.parquet").exists()
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["id"] == "0" * 32


def test_a_timed_out_attempt_cannot_touch_its_retry(tmp_path):
    store = OutputStore.open(str(tmp_path / "out"))
    store.prepare("x = 1\n", SPEC)
    slow = store.shard_writer("a-00000001", ["results", "sources"], {})
    slow.part_bytes = 1
    slow.add("results", [{"key": "a/0", "shard": "a"}])  # then "times out", still running
    retry = commit(store, "a-00000001")
    assert store.done_shards(SPEC) == {"a-00000001"}
    slow.abort()  # the old attempt ends: it removes only its own files
    assert store.done_shards(SPEC) == {"a-00000001"}
    assert sorted(store.read_table("results").column("key").to_pylist()) == ["a-00000001/0", "a-00000001/1"]
    assert all((tmp_path / "out" / f["path"]).exists() for f in retry.files)
    # the old attempt commits after all: the first commit keeps counting, once
    slow2 = store.shard_writer("a-00000001", ["results", "sources"], {})
    slow2.add("results", [{"key": "late", "shard": "a"}])
    slow2.commit({}, SPEC)
    assert sorted(store.read_table("results").column("key").to_pylist()) == ["a-00000001/0", "a-00000001/1"]
    _finish_output(store, SPEC)  # the end of the job removes the second commit
    assert len(list((tmp_path / "out" / DONE).iterdir())) == 1
    assert store.all_table_files("results") == store.table_files("results")


def test_parts_of_a_failed_shard_are_gone_when_the_job_ends(tmp_path, monkeypatch):
    store = OutputStore.open(str(tmp_path / "out"))
    store.prepare("x = 1\n", SPEC)
    commit(store, "a-00000001")
    w = store.shard_writer("b-00000002", ["results", "sources"], {})
    w.part_bytes = 1
    w.add("results", [{"key": "b/0", "shard": "b"}])
    monkeypatch.setattr(OutputStore, "delete", lambda self, rel: None)  # abort cannot delete (permission lost)
    w.abort()
    monkeypatch.undo()
    monkeypatch.setattr(store_mod, "LEASE_SETTLE_S", 0.0)
    assert store.all_table_files("results") != store.table_files("results")
    _finish_output(store, SPEC)
    assert store.all_table_files("results") == store.table_files("results")
    assert store.done_shards(SPEC) == {"a-00000001"}
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_parts_named_by_earlier_versions_stay_committed(tmp_path):
    """`<shard>.<part>.parquet` parts and a marker listing them (no attempt id)."""
    store = OutputStore.open(str(tmp_path / "out"))
    store.prepare("x = 1\n", SPEC)
    w = store.shard_writer("a-00000001", ["results", "sources"], {})
    w.attempt = ""
    w.add("results", [{"key": "k", "shard": "a"}])
    w.commit({}, SPEC)
    assert (tmp_path / "out" / "results" / "a-00000001.00000.parquet").exists()
    store.release()
    store = OutputStore.open(str(tmp_path / "out"))
    store.prepare("x = 1\n", SPEC)
    assert store.done_shards(SPEC) == {"a-00000001"}
    assert store.read_table("results").column("key").to_pylist() == ["k"]
    store.release()


def _verify(out: Path):
    return CliRunner().invoke(app, ["verify", str(out)])


def test_verify_catches_a_bit_flip_and_a_truncation(tmp_path):
    out = tmp_path / "out"
    store = OutputStore.open(str(out))
    store.prepare("x = 1\n", SPEC)
    for s in ("a-00000001", "b-00000002", "c-00000003"):
        commit(store, s)
    _finish_output(store, SPEC)
    res = _verify(out)
    assert res.exit_code == 0 and "3 committed shard(s)" in res.output and ": 0 bad" in res.output
    flip = next((out / "results").glob("a-00000001.*.00000.parquet"))
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0x01
    flip.write_bytes(bytes(data))  # same size: the listing still says "done"
    cut = next((out / "sources").glob("b-00000002.*.parquet"))
    cut.write_bytes(cut.read_bytes()[:-7])
    assert OutputStore.open(str(out)).done_shards(SPEC) == {"a-00000001", "c-00000003"}
    res = _verify(out)
    assert res.exit_code == 1, res.output
    assert "bad shard a-00000001" in res.output and "bit flip" in res.output
    assert "bad shard b-00000002" in res.output and "truncated" in res.output
    assert "c-00000003" not in res.output.split("imprint: verified")[0]
    # marked for rerun: no longer done, a _failed record says why
    store = OutputStore.open(str(out))
    assert store.done_shards(SPEC) == {"c-00000003"}
    assert "imprint verify" in json.loads((out / FAILED / "a-00000001.json").read_text())["error"]
    store.prepare("x = 1\n", SPEC)  # the next run's sweep removes the bad parts
    assert not list((out / "results").glob("a-00000001.*"))
    store.release()
    assert _verify(out).exit_code == 0


def test_verify_reports_an_unreadable_marker(tmp_path):
    out = tmp_path / "out"
    store = OutputStore.open(str(out))
    store.prepare("x = 1\n", SPEC)
    commit(store, "a-00000001")
    _finish_output(store, SPEC)
    marker = next((out / DONE).iterdir())
    marker.write_text(marker.read_text()[:30])
    res = _verify(out)
    assert res.exit_code == 1 and "marker unreadable" in res.output


def test_verify_refuses_to_mark_while_a_job_holds_the_lease(tmp_path):
    out = tmp_path / "out"
    store = OutputStore.open(str(out))
    store.prepare("x = 1\n", SPEC)
    commit(store, "a-00000001")
    part = next((out / "results").glob("*.parquet"))
    data = bytearray(part.read_bytes())
    data[40] ^= 0x10
    part.write_bytes(bytes(data))
    res = _verify(out)
    assert res.exit_code == 2 and "another driver" in res.output
    assert store.done_shards(SPEC) == {"a-00000001"}  # nothing marked
    store.release()


def test_status_reads_listings_and_the_index_not_every_marker(tmp_path, monkeypatch):
    from pipeline.status import job_status

    out = tmp_path / "out"
    store = OutputStore.open(str(out))
    store.prepare("[input]\nshards = []\n", SPEC)
    for i in range(20):
        commit(store, f"s{i}-{i:08d}", n=1 + i % 3)
    _finish_output(store, SPEC)  # writes the index
    store = OutputStore.open(str(out))
    store.prepare("[input]\nshards = []\n", SPEC)
    commit(store, "late-99999999", n=2)  # committed after the index: opened once
    opened = []
    real = OutputStore.read_text

    def counting(self, rel):
        opened.append(rel)
        return real(self, rel)

    monkeypatch.setattr(OutputStore, "read_text", counting)
    st = job_status(str(out))
    assert len(st["done"]) == 21 and st["images"] == sum(1 + i % 3 for i in range(20)) + 2
    assert [r for r in opened if r.startswith(DONE)] == [f"{DONE}/" + next(
        n for n in os.listdir(out / DONE) if n.startswith("late-"))]
    store.release()


# -- input read errors -----------------------------------------------------------


class _Refused:
    """A shard stream whose reads are refused after `after` bytes, as pyarrow's
    S3 stream raises when a GET is refused (credentials expired mid-job)."""

    def __init__(self, path: str, after: int):
        self.fh, self.left = open(path, "rb"), after

    def read(self, n=-1):
        if self.left <= 0:
            raise OSError("When reading information for key 'a.tar' in bucket 'b': AWS Error ACCESS_DENIED "
                          "during GetObject operation: Access Denied (HTTP status code 403)")
        data = self.fh.read(min(n, self.left) if n >= 0 else self.left)
        self.left -= len(data)
        return data

    def close(self):
        self.fh.close()


def test_a_read_refused_mid_shard_is_a_retry_not_damage(tmp_path, monkeypatch):
    import pipeline.data as data

    shard = write(tmp_path / "a.tar", samples("a", 4))
    monkeypatch.setattr(data, "open_shard", lambda url, **kw: _Refused(url, 3000))
    got = []
    with pytest.raises(ShardReadError, match="403"):
        for raw in read_raw_samples(str(shard)):
            got.append(raw)
    assert all("__error__" not in r for r in got)  # nothing became a tar_damaged row
    # the first read refused: the same, not "not a readable tar"
    monkeypatch.setattr(data, "open_shard", lambda url, **kw: _Refused(url, 0))
    with pytest.raises(ShardReadError):
        list(read_raw_samples(str(shard)))
    # real damage is still damage: bytes that were read and are not a tar
    monkeypatch.undo()
    (tmp_path / "cut.tar").write_bytes(Path(shard).read_bytes()[:3000])
    rows = list(read_raw_samples(str(tmp_path / "cut.tar")))
    assert rows[-1]["__error_type__"] == "tar_damaged"


def test_job_retries_a_shard_whose_read_was_refused(tmp_path, monkeypatch):
    """End to end, tiny model: the first attempt's read is refused mid-shard;
    the shard is retried and committed whole, with no tar_damaged row."""
    import pipeline.data as data

    a = write(tmp_path / "a-000.tar", samples("a", 3))
    b = write(tmp_path / "b-001.tar", samples("b", 2))
    real, opened, refused = data.open_shard, [], []

    def flaky(url, **kw):
        # the first open of a is the preflight's (it reads a's first sample);
        # the second is the worker's, and that one is refused mid-shard
        opened.append(url)
        if url == str(a) and opened.count(url) == 2:
            refused.append(url)
            return _Refused(url, 5000)
        return real(url, **kw)

    monkeypatch.setattr(data, "open_shard", flaky)
    spec = job(tmp_path / "out", [a, b])
    report = run_job(spec, progress=False)
    assert refused and report.attempts[str(a)] == 1 and not report.failed
    assert report.done == 2 and report.errors == 0 and "tar_damaged" not in report.error_types
    src = OutputStore.open(str(tmp_path / "out")).read_table("sources").to_pylist()
    assert sorted(r["key"] for r in src) == ["a000", "a001", "a002", "b000", "b001"]
    assert all(r["status"] == "ok" for r in src)
    store = OutputStore.open(str(tmp_path / "out"))
    assert store.all_table_files("results") == store.table_files("results")
    assert len(store.read_table("results")) == edits_of(3) + edits_of(2)
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_run_with_a_folder_for_job_json_exits_2_and_keeps_the_output(tmp_path):
    """End to end through `imprint run`: the defect as measured (a changed
    spec swept the previous spec's files, then exited 2)."""
    a = write(tmp_path / "a-000.tar", samples("a", 2))
    out = tmp_path / "out"
    run_job(job(out, [a]), progress=False)
    before = tables_and_markers(out)
    (out / META_FILE).unlink()
    (out / META_FILE).mkdir()
    with pytest.raises(JobError, match="job.json exists but cannot be read"):
        run_job(job(out, [a], edit={"seeds": 3}), progress=False)
    assert tables_and_markers(out) == before
    assert parse_marker_name(next(iter((out / DONE).iterdir())).name)


def test_a_writer_fenced_by_a_lost_lease_makes_no_part_and_no_marker_visible(tmp_path):
    """Issue 31 items 7a/9a: a worker of a driver whose lease was taken over
    (the driver stopped past the TTL, a new run took the output) neither
    writes a part nor commits; `fence` is what the driver hands its workers."""
    store = OutputStore.open(str(tmp_path / "out"))
    store.prepare("x = 1\n", SPEC)
    worker_side = OutputStore.open(str(tmp_path / "out"))
    worker_side.fence = store.lease.id
    commit(worker_side, "a-00000001")  # under the lease: committed
    slow = worker_side.shard_writer("b-00000001", ["results", "sources"], {})
    slow.add("results", [{"key": "b/0", "shard": "b"}])
    taker = dict(json.loads((tmp_path / "out" / LEASE_FILE).read_text()), id="1" * 32, host="newrun")
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps(taker))
    with pytest.raises(LeaseLost, match="newrun"):
        slow.commit({"images": 1}, SPEC)
    with pytest.raises(LeaseLost):
        commit(worker_side, "c-00000001")
    assert store.done_shards(SPEC) == {"a-00000001"}
    assert not [p for p in (tmp_path / "out" / "results").iterdir() if not p.name.startswith("a-")]
    (tmp_path / "out" / LEASE_FILE).write_text("{not json")  # unreadable: no proof, the attempt fails as an I/O error
    with pytest.raises(OSError, match="cannot check the output's lease"):
        commit(worker_side, "d-00000001")
