"""How many Ray workers the driver keeps requested and what each asks for,
from the job spec and what the cluster reports (no cluster needed here; the
live checks are in tests/test_autoscale.py)."""

import pytest

from pipeline import executor, ray_adapter
from pipeline.ray_adapter import UNKNOWN_REACH_WORKERS, _placement, _worker_cap
from pipeline.spec import SpecError, load_spec


def spec(**run):
    device = run.pop("device", "auto")
    return load_spec(raw={"input": {"shards": ["x.tar"]}, "model": {"id": "tiny", "device": device}, "run": run})


class FakeRay:
    def __init__(self, gpus=0):
        self.gpus = gpus

    def cluster_resources(self):
        return {"CPU": 8.0, **({"GPU": float(self.gpus)} if self.gpus else {})}


@pytest.mark.parametrize("device,gpus,view,expected", [
    ("cuda", 0, (None, False), 1.0),  # CUDA asked for: a GPU each, whatever is there now
    ("cpu", 4, (None, False), 0.0),
    ("auto", 0, (None, False), 0.0),  # a CPU cluster that cannot grow: CPU workers
    ("auto", 2, (None, False), 1.0),
    ("auto", 0, (8, True), 1.0),  # no GPU yet, but the autoscaler can add 8
    ("auto", 0, (None, True), 1.0),  # an autoscaler whose limits are unknown
])
def test_gpus_per_worker_default(monkeypatch, device, gpus, view, expected):
    monkeypatch.setattr(ray_adapter, "_autoscaler_view", lambda ray: view)
    got, expect_cuda, _, _ = _placement(spec(device=device), FakeRay(gpus), started_local=False)
    assert got == expected
    assert expect_cuda == (expected > 0 and device != "cpu")


def test_explicit_gpus_per_worker_and_cpu_device_with_gpu_placement(monkeypatch):
    monkeypatch.setattr(ray_adapter, "_autoscaler_view", lambda ray: (None, False))
    # the tests' setting: placed as a GPU worker, computing on CPU, no CUDA check
    assert _placement(spec(device="cpu", gpus_per_worker=1), FakeRay(0), False)[:2] == (1.0, False)
    assert _placement(spec(gpus_per_worker=0.25), FakeRay(1), False)[:2] == (0.25, True)
    assert _placement(spec(gpus_per_worker=0), FakeRay(4), False)[:2] == (0.0, False)


def test_a_local_cluster_never_asks_the_autoscaler(monkeypatch):
    monkeypatch.setattr(ray_adapter, "_autoscaler_view", lambda ray: pytest.fail("asked"))
    assert _placement(spec(), FakeRay(0), started_local=True)[0] == 0.0


def test_worker_cap():
    s = spec()
    assert _worker_cap(spec(max_workers=3), 1.0, 0, None, True) == 3  # explicit wins
    assert _worker_cap(s, 0.0, 0, None, False) == 1  # CPU workers: one
    assert _worker_cap(s, 1.0, 2, None, False) == 2  # a fixed cluster: its GPUs
    assert _worker_cap(s, 1.0, 0, None, False) == 1  # ... at least one, pending until a GPU node joins
    assert _worker_cap(s, 0.5, 2, None, False) == 4  # fractions pack workers per GPU
    assert _worker_cap(s, 1.0, 1, 8, True) == 8  # reach from the autoscaler's published limits
    assert _worker_cap(s, 0.25, 0, 3, True) == 12
    assert _worker_cap(s, 1.0, 0, None, True) == UNKNOWN_REACH_WORKERS  # limits unknown: demand
    assert _worker_cap(s, 1.0, 40, None, True) == 40


@pytest.mark.parametrize("field,value,msg", [
    ("gpus_per_worker", -1, "run.gpus_per_worker"),
    ("gpus_per_worker", 1.5, "run.gpus_per_worker: above 1 must be a whole number"),
    ("cpus_per_worker", 0, "run.cpus_per_worker"),
    ("shard_timeout_s", 0, "run.shard_timeout_s"),
    ("placement_timeout_s", 0, "run.placement_timeout_s"),
    ("start_timeout_s", -5, "run.start_timeout_s"),
    ("max_workers", -1, "run.max_workers"),
])
def test_bad_run_fields_stop_with_one_message(field, value, msg):
    with pytest.raises(SpecError, match=f"^{msg}"):
        spec(**{field: value})


def test_placement_fields_do_not_change_the_spec_hash():
    assert spec().hash() == spec(max_workers=7, gpus_per_worker=0.5, cpus_per_worker=2, shard_timeout_s=60,
                               placement_timeout_s=60, start_timeout_s=60).hash()


def test_failure_records_and_cuda_errors():
    from pipeline.driving import _is_cuda_error, failure_info

    def boom():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    try:
        boom()
    except RuntimeError as exc:
        info = failure_info(exc)
    assert info["type"] == "RuntimeError" and info["message"].startswith("CUDA error")
    assert info["traceback"][-1] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert any("in boom" in line for line in info["traceback"])
    assert _is_cuda_error(info)  # its worker is replaced
    assert not _is_cuda_error({"type": "ValueError", "message": "cannot read shard"})
    assert _is_cuda_error({"type": "OutOfMemoryError", "message": "tried to allocate 2 GiB"})


def test_progress_counts_samples_inside_running_shards(capsys, monkeypatch):
    """A log gets plain lines (no carriage returns) that count the images of
    running shards, so the ETA moves within a shard; a late counter read of a
    finished shard is not counted twice."""
    from pipeline.executor import Progress

    clock = [100.0]
    monkeypatch.setattr(executor.time, "monotonic", lambda: clock[0])
    bar = Progress(total=3, skipped=0, enabled=True)
    assert not bar.tty  # pytest captures stderr
    summary = {"shard": "a", "images": 3, "errors": 1, "edits": 6}
    clock[0] += 10
    bar.shard_done(summary)
    bar.set_live({"shard": "a", "samples": 4, "edits": 6})  # stale read after it finished
    bar.set_live({"shard": "b", "samples": 2, "edits": 3})
    clock[0] += 20
    bar.refresh(line=True)
    first, second = capsys.readouterr().err.strip().splitlines()
    assert "\r" not in first + second
    assert " 4/12 " in first and "shards 1/3 done" in first  # 12 = 3 shards x 4 samples seen per shard
    assert " 6/12 " in second and "1 running" in second and "0.30 edits/s" in second  # 9 edits in 30 s
    clock[0] += 10  # two more images of b, at the same pace
    bar.set_live({"shard": "b", "samples": 4, "edits": 6})
    bar.refresh(line=True)
    third = capsys.readouterr().err.strip()
    eta = lambda line: line.split("<")[1].split(",")[0]  # noqa: E731
    assert " 8/12 " in third and eta(third) < eta(second)  # the ETA counts down within shard b


def test_progress_total_is_exact_for_local_shards_from_the_start(capsys, tmp_path):
    """Shards of 3, 2 and 1 samples: the total is 6 from the first line (it
    used to be estimated from the first shard: 9, then 7.5, then 6); a shard
    of unknown size is estimated from the unknown ones finished."""
    from helpers_data import good_samples, write

    from pipeline.data import count_samples
    from pipeline.executor import Progress, _known_sizes

    urls = [write(tmp_path / f"s{n}.tar", good_samples(prefix=f"p{n}", n=n)) for n in (3, 2, 1)]
    assert [count_samples(u) for u in urls] == [3, 2, 1]
    assert count_samples("s3://bucket/x.tar") is None and count_samples(str(tmp_path / "nope.tar")) is None
    bar = Progress(total=3, skipped=0, enabled=True, sizes=_known_sizes(urls))
    for u, n in zip(urls, (3, 2, 1)):
        bar.shard_done({"shard": u, "images": n, "errors": 0, "edits": n})
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split("%")[1].split()[0] for line in lines] == ["3/6", "5/6", "6/6"], lines
    mixed = Progress(total=3, skipped=0, enabled=True, sizes={urls[0]: 3})
    mixed.shard_done({"shard": "s3://b/u1.tar", "images": 4, "errors": 0, "edits": 4})
    assert " 4/11 " in capsys.readouterr().err  # 3 known + 2 unknown shards x 4
