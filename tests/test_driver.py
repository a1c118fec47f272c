"""The job's driver (executor.run_job, inline) with workers that need no
model: they write real parts and markers through the output store, so the
commit protocol, the lease and the driver's own writes are the real ones.
Each test is one measured defect of issue 31 (milliseconds each)."""

from __future__ import annotations

import json
import os
import time

import pyarrow.fs as pafs
import pytest

import pipeline.driving as driving
import pipeline.executor as executor
import pipeline.store as store_mod
from faultfs import FaultFS
from pipeline.data import shard_name
from pipeline.executor import JOB_ERROR_FILE, OutputTakenOver, run_job
from pipeline.spec import load_spec, to_toml
from pipeline.store import LEASE_FILE, STATS, OutputStore

SHARDS = [f"/data/s-{i:03d}.tar" for i in range(3)]


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(store_mod, "LEASE_SETTLE_S", 0.0)
    monkeypatch.setattr(driving, "DRIVER_WRITE_WAIT_S", 0.0)


class Worker:
    """Commits one row per shard through its own store, as ShardWorker does."""

    made: list = []

    def __init__(self, spec):
        self.spec = spec
        self.store = OutputStore.open(spec.output.path)
        self.placement = {"host": "here", "pid": os.getpid(), "node_id": None}
        self.live = {}
        type(self).made.append(self)

    def process(self, url: str) -> dict:
        name = shard_name(url)
        w = self.store.shard_writer(name, ["results"], {"spec_hash": self.spec.hash()})
        w.add("results", [{"key": f"{name}/0", "shard": name}])
        w.commit({"images": 1}, self.spec.hash())
        return {"shard": url, "name": name, "images": 1, "errors": 0, "edits": 1, "kept": 1, "unet_calls": 0,
                "seconds": 0.0}


def job(tmp_path, monkeypatch, fs=None, **run):
    """A spec, and executor.plan replaced by the real output store prepared
    on `fs` (preflight needs real shards and a model; not what is tested)."""
    spec = load_spec(raw={"input": {"shards": SHARDS}, "model": {"id": "tiny"}, "output": {"path": str(tmp_path / "o")},
                          "run": {"executor": "inline", **run}})
    store = OutputStore(fs or pafs.LocalFileSystem(), str(tmp_path / "o"))

    def plan(spec, force=False):
        store.prepare(to_toml(spec), spec.hash())
        return executor.Plan(store, spec.hash(), list(SHARDS), list(SHARDS))

    monkeypatch.setattr(executor, "plan", plan)
    return spec, store


def test_inline_replaces_a_worker_after_a_cuda_error(tmp_path, monkeypatch):
    """Issue 31 item 9b: inline, a CUDA error left the same (maybe unusable)
    worker to retry the shard; it is replaced, as on Ray."""

    class CudaOnce(Worker):
        made = []

        def process(self, url):
            if self is CudaOnce.made[0]:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().process(url)

    spec, store = job(tmp_path, monkeypatch, max_attempts=2)
    report = run_job(spec, progress=False, worker_cls=CudaOnce)
    assert len(CudaOnce.made) == 2 and report.done == 3 and not report.failed, report
    assert report.attempts[SHARDS[0]] == 1
    assert OutputStore.open(str(tmp_path / "o")).done_shards(spec.hash()) == {shard_name(s) for s in SHARDS}


class FailsStatsWrites(FaultFS):
    """Fails the driver's _stats/ writes: the first `times` of each shard's,
    or every one (times=None)."""

    def __init__(self, times: int | None):
        super().__init__(pafs.LocalFileSystem(), seed=0, rate=0.0, permanent_rate=0.0)
        self.times, self.failed = times, {}

    def _fault(self, op, path):
        self.calls += 1
        if f"/{STATS}/" in path and op == "move":  # the staged file renamed into place
            n = self.failed.get(path, 0)
            if self.times is None or n < self.times:
                self.failed[path] = n + 1
                self.faults += 1
                return "before"
        return None


@pytest.mark.parametrize("times", [2, None])
def test_failed_stats_writes_do_not_stop_a_job_whose_shards_are_committed(tmp_path, monkeypatch, capsys, times):
    """Issue 31 item 5: one failed write of a driver-side _stats/ file (a
    transient object-store error) stopped the job after its shard was
    committed. Now it is retried (two failures: written at the third try),
    and when it keeps failing it is logged and the job goes on."""
    ffs = FailsStatsWrites(times)
    spec, store = job(tmp_path, monkeypatch, fs=ffs)
    report = run_job(spec, progress=False, worker_cls=Worker)
    assert report.done == 3 and not report.failed
    assert ffs.faults == (3 * 2 if times else 3 * driving.DRIVER_WRITE_TRIES)
    stats = sorted(p.name for p in (tmp_path / "o" / STATS).iterdir())
    err = capsys.readouterr().err
    if times:
        assert stats == sorted(f"{shard_name(s)}.json" for s in SHARDS) and "could not write" not in err
    else:
        assert stats == [] and err.count(f"could not write {STATS}/") == 3 and "the job goes on" in err
    assert OutputStore.open(str(tmp_path / "o")).done_shards(spec.hash()) == {shard_name(s) for s in SHARDS}


def take_over(out) -> None:
    """Another run takes the output over (this driver was stopped past the TTL)."""
    lease = json.loads((out / LEASE_FILE).read_text())
    (out / LEASE_FILE).write_text(json.dumps({**lease, "id": "f" * 32, "host": "newrun", "pid": 1}))


def test_a_driver_that_lost_its_lease_hands_out_no_more_shards(tmp_path, monkeypatch):
    """Issue 31 items 7a/9a: a driver resumed after another run took its
    output over committed its remaining shards (duplicated rows). It stops at
    its next shard, writes nothing (not even job.error.json), and leaves the
    new run's lease alone."""

    class TakenOverAfterOne(Worker):
        made = []

        def process(self, url):
            out = super().process(url)
            take_over(tmp_path / "o")
            return out

    spec, store = job(tmp_path, monkeypatch)
    with pytest.raises(OutputTakenOver, match="newrun"):
        run_job(spec, progress=False, worker_cls=TakenOverAfterOne)
    assert OutputStore.open(str(tmp_path / "o")).done_shards(spec.hash()) == {shard_name(SHARDS[0])}
    assert not (tmp_path / "o" / JOB_ERROR_FILE).exists()
    assert json.loads((tmp_path / "o" / LEASE_FILE).read_text())["host"] == "newrun"


def test_a_worker_whose_driver_lost_the_lease_commits_nothing(tmp_path, monkeypatch):
    """The takeover lands while a shard runs: the worker's fence refuses its
    commit (LeaseLost in the worker's failure record), and the driver stops."""

    class TakenOverMidShard(Worker):
        made = []

        def process(self, url):
            if url == SHARDS[1]:
                take_over(tmp_path / "o")
            return super().process(url)

    spec, store = job(tmp_path, monkeypatch)
    with pytest.raises(OutputTakenOver, match="newrun"):
        run_job(spec, progress=False, worker_cls=TakenOverMidShard)
    assert OutputStore.open(str(tmp_path / "o")).done_shards(spec.hash()) == {shard_name(SHARDS[0])}
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "o" / "results").iterdir()) == [shard_name(SHARDS[0])]


def test_a_failed_heartbeat_is_logged_and_retried(tmp_path, monkeypatch, capsys):
    """Issue 31 item 5 (the lease heartbeat, a driver write): a failed
    refresh is logged and retried at the next beat; the lease stays ours."""
    monkeypatch.setattr(store_mod, "LEASE_TTL_S", 0.4)

    class FailsTwoBeats(FaultFS):
        def __init__(self):
            super().__init__(pafs.LocalFileSystem(), seed=0, rate=0.0, permanent_rate=0.0)
            self.lease_writes = 0

        def _fault(self, op, path):
            if path.endswith(LEASE_FILE) and op == "move":
                self.lease_writes += 1
                if self.lease_writes in (2, 3):  # the first is acquire's; then two heartbeats fail
                    self.faults += 1
                    return "before"
            return None

    ffs = FailsTwoBeats()
    store = OutputStore(ffs, str(tmp_path / "o"))
    store.prepare("x = 1\n", "spec00000001")
    deadline = time.monotonic() + 5
    while ffs.lease_writes < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ffs.faults == 2 and ffs.lease_writes >= 5, ffs.lease_writes  # beats went on after the failures
    assert store.lease.still_ours() and not store.lease.lost
    assert capsys.readouterr().err.count("could not refresh the output's lease") == 2
    store.release()
