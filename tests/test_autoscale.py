"""The Ray executor on an autoscaling GPU cluster, stood in for by Ray's fake
multi-node autoscaler (tests/fake_cluster.py): a head with 0 GPUs whose
autoscaler adds nodes of 1 CPU + 1 GPU, 0 to 2 of them, as real raylets on
this machine. The tiny model computes on CPU (`model.device = "cpu"`) while
Ray places each worker as a GPU worker (`run.gpus_per_worker = 1`). One
cluster serves the whole module; jobs join it through RAY_ADDRESS alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import fake_cluster
from helpers_data import good_samples, write
from pipeline.spec import load_spec, to_toml

pytestmark = pytest.mark.ray

QUICK = {"inversion": {"steps": 8, "skip": 2}, "edit": {"seeds": 1},
         "score": {"clip_model": "imprint-tiny-clip", "clip_pretrained": "none", "lpips_net": "squeeze",
                   "lpips_pretrained": False}}
GPU_ON_CPU = {"model": {"id": "tiny", "device": "cpu"}, "run": {"executor": "ray", "gpus_per_worker": 1, "threads": 1}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = fake_cluster.start(tmp_path_factory.mktemp("fake-cluster"))
    try:
        yield c
    finally:
        fake_cluster.stop(c)


def _two_gpu_nodes(cluster):
    if len(cluster.node_raylets()) < 2:
        code = ("import ray; ray.init(logging_level='error'); A = ray.remote(num_gpus=1, num_cpus=0.5)(type('A', (), {'f': lambda self: 1}));"
                " a = [A.remote() for _ in range(2)]; ray.get([x.f.remote() for x in a], timeout=120)")
        r = subprocess.run([sys.executable, "-c", code], env=cluster.env, timeout=180, capture_output=True, text=True)
        assert r.returncode == 0, f"the autoscaler did not bring up two GPU nodes:\n{r.stderr[-3000:]}"
    assert len(cluster.node_raylets()) == 2
    return cluster


@pytest.fixture
def gpu_nodes(cluster):
    """Both GPU nodes up (added by the autoscaler for two placeholder GPU
    actors, unless an earlier test's job already made it add them), so that
    timings measure the job, not the launch of nodes."""
    return _two_gpu_nodes(cluster)


@pytest.fixture
def own_gpu_nodes(tmp_path_factory):
    """A cluster of its own with both GPU nodes up: for a test that must not
    depend on whether an earlier test's lost node has been replaced yet."""
    c = fake_cluster.start(tmp_path_factory.mktemp("own-cluster"))
    try:
        yield _two_gpu_nodes(c)
    finally:
        fake_cluster.stop(c)


def make_shards(d: Path, n_shards: int, per_shard: int) -> list[str]:
    samples = good_samples("s", n_shards * per_shard)
    return [write(d / f"part-{i:03d}.tar", samples[i * per_shard:(i + 1) * per_shard]) for i in range(n_shards)]


def job_file(tmp: Path, shards: list[str], **sections) -> Path:
    raw = {"input": {"shards": shards, "templates": ["{source}, oil painting"]},
           "output": {"path": str(tmp / "out"), "image_format": "png"}, "batch": {"images": 1}}
    for part in (QUICK, GPU_ON_CPU, sections):
        for sec, vals in part.items():
            raw.setdefault(sec, {}).update(vals)
    path = tmp / "job.toml"
    path.write_text(to_toml(load_spec(raw=raw)))
    return path


def imprint(cluster, *args, **popen) -> subprocess.Popen:
    """`imprint run ...` as a user on the cluster would start it: no address
    flag, only RAY_ADDRESS in the environment."""
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           **{k: os.environ[k] for k in ("HF_HOME", "TORCH_HOME", "IMPRINT_CACHE") if k in os.environ}}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err = "\n".join(line for line in err.splitlines() if "[state-dump]" not in line)  # Ray's debug dumps
        pytest.fail(f"imprint run did not finish in {timeout} s\n{out[-3000:]}\n{err[-8000:]}")
    return proc.returncode, out, err


def check_every_row_once(out: Path, shards: list[str], per_shard: int) -> list[dict]:
    src = pq.read_table(out / "sources").to_pylist()
    assert sorted((r["shard"], r["key"]) for r in src) == sorted(
        (s, f"s{i * per_shard + j:03d}") for i, s in enumerate(shards) for j in range(per_shard))
    res = pq.read_table(out / "results").to_pylist()
    keys = [(r["shard"], r["key"], r["target_index"], r["seed_index"]) for r in res]
    assert len(keys) == len(set(keys)) and {(k[0], k[1]) for k in keys} == {(r["shard"], r["key"]) for r in src}
    markers = [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]
    assert sorted(m["shard"] for m in markers) == sorted(shards)
    return markers


def test_job_scales_from_zero_to_two_gpu_nodes(cluster, tmp_path):
    shards = make_shards(tmp_path, 4, 3)
    code, out, err = finish(imprint(cluster, str(job_file(tmp_path, shards)), "--no-progress"))
    assert code == 0, err[-5000:]
    markers = check_every_row_once(tmp_path / "out", shards, 3)
    nodes = {m["node_id"] for m in markers}
    # Two distinct GPU nodes the autoscaler added for this job's demand (the
    # head has no GPU and no CPU, so nothing could run before they came).
    assert len(nodes) == 2 and None not in nodes, (markers, err[-3000:])
    assert set(fake_cluster_nodes := cluster.node_raylets()) >= nodes, (nodes, fake_cluster_nodes)
    assert all(m["actor_id"] and m["host"] for m in markers)
    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "_stats").glob("*.json"))]
    assert sorted(s["shard"] for s in stats) == sorted(shards)
    assert all(s["samples"] == 3 and s["error_types"] == {} for s in stats)


def test_model_that_cannot_load_stops_the_job_with_its_message(gpu_nodes, tmp_path):
    cluster = gpu_nodes
    shards = make_shards(tmp_path, 2, 1)
    # A model folder whose configs are fine and whose weight files are there
    # (the driver's preflight checks no more) but are un-pulled LFS pointers:
    # only the worker's loader finds out.
    model_dir = tmp_path / "no-weights-model"
    _lfs_pointer_model(model_dir)
    t0 = time.monotonic()
    proc = imprint(cluster, str(job_file(tmp_path, shards, model={"id": str(model_dir)})), "--no-progress")
    code, out, err = finish(proc, timeout=120)
    took = time.monotonic() - t0
    assert code == 1, err[-5000:]
    assert took < 30, f"took {took:.1f} s"
    assert "a worker could not start" in err and "could not load model" in err and "no-weights-model" in err, err[-5000:]
    # No shard was charged: no failure records, nothing done.
    assert not list((tmp_path / "out" / "_failed").glob("*.json"))
    st = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "out")],
                        capture_output=True, text=True, env=cluster.env)
    assert st.returncode == 0 and "last run stopped" in st.stdout and "no-weights-model" in st.stdout, st.stdout


def _lfs_pointer_model(path) -> None:
    """A diffusers-format folder of the tiny model (text encoder included)
    whose UNet and VAE weight files are git-lfs pointers (a clone without
    `git lfs pull`)."""
    from pipeline.models import build_tiny

    m = build_tiny()
    m.unet.save_config(path / "unet")
    m.vae.save_config(path / "vae")
    m.scheduler.save_config(path / "scheduler")
    m.text_encoder.save_pretrained(path / "text_encoder")
    m.tokenizer.save_pretrained(path / "tokenizer")
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n"
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        (path / part / name).write_text(pointer)


def test_cuda_expected_but_absent_stops_the_job_with_the_workers_message(gpu_nodes, tmp_path):
    """model.device = "auto" on a GPU worker expects CUDA; the fake GPU nodes
    have none, so the first worker says so and the job stops."""
    cluster = gpu_nodes
    shards = make_shards(tmp_path, 2, 1)
    proc = imprint(cluster, str(job_file(tmp_path, shards, model={"device": "auto"})), "--no-progress")
    code, out, err = finish(proc, timeout=120)
    assert code == 1, err[-5000:]
    assert "a worker could not start" in err and "expects CUDA" in err and "sees no CUDA device" in err, err[-5000:]
    assert not list((tmp_path / "out" / "_failed").glob("*.json"))


class HangOnShard:
    """A ShardWorker that never finishes a shard named hang-* (a stuck read,
    a CUDA hang)."""

    def __new__(cls, spec):
        from pipeline.worker import ShardWorker

        class Hanging(ShardWorker):
            def process(self, url):
                if "hang" in os.path.basename(url):
                    time.sleep(3600)
                return super().process(url)

        return Hanging(spec)


def test_shard_deadline_kills_the_worker_and_charges_the_shard(gpu_nodes, tmp_path, monkeypatch):
    from ray import cloudpickle
    import ray  # noqa: I001

    from pipeline.executor import run_job

    hang = write(tmp_path / "hang-000.tar", good_samples("s", 1))
    raw = {"input": {"shards": [hang], "templates": ["{source}, oil painting"]},
           "output": {"path": str(tmp_path / "out"), "image_format": "png"}}
    for part in (QUICK, GPU_ON_CPU, {"run": {"max_workers": 1, "max_attempts": 1, "shard_timeout_s": 4}}):
        for sec, vals in part.items():
            raw.setdefault(sec, {}).update(vals)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=gpu_nodes.address, logging_level="warning", log_to_driver=False)
    try:
        report = run_job(load_spec(raw=raw), progress=False, worker_cls=HangOnShard)
        record = report.failures[hang]
        assert record["type"] == "TimeoutError" and "run.shard_timeout_s = 4 s" in record["message"]
        # the job came back; its worker is gone, not left holding a GPU on the hung shard
        deadline = time.monotonic() + 20
        while fake_cluster.children_titled(set(gpu_nodes.node_raylets().values()), b"ray::_ShardActor"):
            assert time.monotonic() < deadline, "the hung worker is still alive"
            time.sleep(0.2)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class CrashOnShard:
    """A ShardWorker whose process exits when given a shard named crash-*:
    a worker killed by its shard (a segfault, an OOM kill)."""

    def __new__(cls, spec):
        from pipeline.worker import ShardWorker

        class Crashing(ShardWorker):
            def process(self, url):
                if "crash" in os.path.basename(url):
                    os._exit(3)
                return super().process(url)

        return Crashing(spec)


def test_only_the_running_shard_is_charged_when_its_worker_dies(cluster, tmp_path, monkeypatch):
    from ray import cloudpickle
    import ray  # noqa: I001

    from pipeline.executor import run_job

    samples = good_samples("s", 2)
    crash = write(tmp_path / "crash-000.tar", samples[:1])
    healthy = write(tmp_path / "part-000.tar", samples[1:])
    raw = {"input": {"shards": [crash, healthy], "templates": ["{source}, oil painting"]},
           "output": {"path": str(tmp_path / "out"), "image_format": "png"}}
    for part in (QUICK, GPU_ON_CPU, {"run": {"max_workers": 1, "max_attempts": 2}}):
        for sec, vals in part.items():
            raw.setdefault(sec, {}).update(vals)
    spec = load_spec(raw=raw)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    try:
        # One worker at a time: the crashing shard runs first; its crash (the
        # worker's process died, not its node) charges it, never the healthy one.
        report = run_job(spec, progress=False, worker_cls=CrashOnShard)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert report.done == 1 and list(report.failed) == [crash]
    assert report.attempts == {crash: 2}, report.attempts  # the healthy shard was never charged
    record = report.failures[crash]
    assert record["attempts"] == 2 and "worker lost" in record["message"] and record["type"]
    failed = json.loads(next((tmp_path / "out" / "_failed").glob("*.json")).read_text())
    assert failed["shard"] == crash and failed["traceback"] is not None
    assert [json.loads(p.read_text())["shard"] for p in (tmp_path / "out" / "_done").glob("*.json")] == [healthy]


# The last two tests on the shared cluster lose a node each.
def test_node_lost_mid_shard_every_row_once(gpu_nodes, tmp_path):
    cluster = gpu_nodes
    per_shard = 4
    shards = make_shards(tmp_path, 4, per_shard)
    proc = imprint(cluster, str(job_file(tmp_path, shards)), "--no-progress")
    # Wait until both GPU nodes run a worker, then kill one node (its raylet
    # and every process under it), with the shard its worker was running.
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, "no worker node came up"
        busy = _nodes_running_shards(cluster)
        done = list((tmp_path / "out" / "_done").glob("*.json")) if (tmp_path / "out" / "_done").is_dir() else []
        assert len(done) < 4, "the job finished before a node could be lost"
        if busy:
            victim = busy[0]
        time.sleep(0.2)
    cluster.kill_node(victim)
    code, out, err = finish(proc)
    assert code == 0, err[-5000:]
    check_every_row_once(tmp_path / "out", shards, per_shard)
    # The shard the lost node was running was charged and redone elsewhere.
    assert "worker lost" in err or list((tmp_path / "out" / "_failed").glob("*.json")) == [], err[-3000:]


@pytest.mark.slow  # several minutes on a loaded machine: two workers start, then one redoes the big shard
def test_a_lost_shard_goes_to_the_idle_worker(own_gpu_nodes, tmp_path):
    """The measured hang: two GPU nodes, run.max_workers = 2; one worker runs
    a big shard while the other has finished the small ones and idles; the
    big shard's node is lost. The idle worker must take the shard (a new
    worker may never be placed), and the loss charges no attempt."""
    cluster = own_gpu_nodes
    # The big shard must outlast the second worker's start plus the three
    # small shards by a wide margin on any machine: a shard's fixed cost
    # (open, write, commit) is seconds, a tiny-model sample at 100 steps a
    # fraction of one, so 48 samples at 100 steps (16 at 8 finished first in
    # CI, 24 at 40 here).
    samples = good_samples("s", 51)
    big = write(tmp_path / "big-000.tar", samples[:48])
    small = [write(tmp_path / f"small-{i:03d}.tar", samples[48 + i:49 + i]) for i in range(3)]
    spec = job_file(tmp_path, [big, *small], run={"max_workers": 2, "max_attempts": 1},
                    inversion={"steps": 100, "skip": 2})
    proc = imprint(cluster, str(spec), "--no-progress")
    done_dir = tmp_path / "out" / "_done"
    deadline = time.monotonic() + 300
    while True:  # until the small shards are done and the big one still runs
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        done = [json.loads(p.read_text()) for p in done_dir.glob("*.json")] if done_dir.is_dir() else []
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the small shards did not finish while the big one ran: done {[m['shard'] for m in done]}"
                        f"\n{proc.communicate()[1][-5000:]}")
        assert big not in {m["shard"] for m in done}, "the big shard finished before its node could be lost"
        if len(done) == 3:
            break
        time.sleep(0.2)
    # The queue hands out the big shard first, so the first worker ready took
    # it and the other ran the three small ones: the big one runs on the
    # worker node that ran no small shard. (Ray's process titles cannot
    # tell: they showed the busy worker as idle for most of its shard.)
    idle_actor, idle_node = {m["actor_id"] for m in done}, {m["node_id"] for m in done}
    assert len(idle_actor) == 1 and len(idle_node) == 1, done
    nodes = cluster.node_raylets()
    busy = sorted(set(nodes) - idle_node)
    assert len(nodes) == 2 and len(busy) == 1, (nodes, done)
    killed = cluster.kill_node(busy[0])
    assert len(killed) > 1, killed  # the raylet and at least the worker running the big shard
    code, out, err = finish(proc, timeout=600)
    assert code == 0, err[-5000:]
    markers = [json.loads(p.read_text()) for p in done_dir.glob("*.json")]
    marker = next(m for m in markers if m["shard"] == big)
    assert {marker["actor_id"]} == idle_actor, (marker, idle_actor, err[-3000:])  # the idle worker took it over
    assert not list((tmp_path / "out" / "_failed").glob("*.json"))  # max_attempts = 1: a charge would fail it
    src = pq.read_table(tmp_path / "out" / "sources").to_pylist()
    assert sorted(r["key"] for r in src) == [f"s{i:03d}" for i in range(51)]


def _nodes_running_shards(cluster) -> list[str]:
    """Worker nodes where a shard worker runs a shard (Ray titles the
    process with the method it runs)."""
    raylets = cluster.node_raylets()
    by_pid = {pid: node for node, pid in raylets.items()}
    busy = fake_cluster.children_titled(set(by_pid), b"ray::_ShardActor.process")
    return sorted({by_pid[ppid] for ppid in busy.values()})


@pytest.mark.slow
def test_sigterm_stops_the_job_and_its_local_cluster(tmp_path):
    """A local cluster started by `imprint run` (no address anywhere): SIGTERM
    prints what is done, exits 143 and leaves no Ray process behind."""
    shards = make_shards(tmp_path, 2, 3)
    ray_tmp = tempfile.mkdtemp(prefix="imprint-st-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", IMPRINT_RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1")
    spec = job_file(tmp_path, shards, run={"gpus_per_worker": 0})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--no-progress"], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in _live(fake_cluster.pids_under(ray_tmp))
                   if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::_ShardActor.process")]:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no shard started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err[-3000:]
        assert "interrupted (SIGTERM)" in err and "of 2 shards done" in err and "run the same command again" in err
        left = _wait_none(ray_tmp, 20)
        assert not left, f"Ray processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        fake_cluster.stop_pids_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _live(pids):
    out = []
    for p in pids:
        try:
            Path(f"/proc/{p}/cmdline").read_bytes()
            out.append(p)
        except OSError:
            pass
    return out


def _wait_none(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := fake_cluster.pids_under(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
