"""Live cluster checks: a real Ray head on 127.0.0.1, started here, runs the
demo job submitted through deploy/submit.sh (`ray job submit`), once plainly
and once with its shard worker killed by PID mid-run; the output must hold
every row exactly once. Only the processes this module started are stopped:
the head's process group, plus whatever the head spawned (Ray's workers and
the job's driver take their own process groups or sessions), found by a
random tag in their environment."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv: its ray CLI and imprint command
SUBMIT = REPO / "deploy" / "submit.sh"
DEMO_JOB = REPO / "jobs" / "demo.toml"
TAG_VAR = "IMPRINT_TEST_CLUSTER"
# The demo job, kept small: the tiny model on the photo sample, the offline
# random scorers.
QUICK = ["model.id=tiny", 'input.shards=["demo"]', "inversion.steps=8", "inversion.skip=2", "edit.seeds=2",
         "score.clip_model=imprint-tiny-clip", "score.clip_pretrained=none",
         "score.lpips_net=squeeze", "score.lpips_pretrained=false", "score.recon_psnr=false"]


@dataclass
class Head:
    url: str
    env: dict  # for every command run against this head
    tmp: Path
    token: str
    log: Path

    def get(self, path: str, **query) -> object:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged(tag: str, sid: int) -> dict[int, str]:
    """pid -> start time of every live process in the head's session or
    carrying its tag (inherited by everything the head spawns)."""
    mark = f"{TAG_VAR}={tag}".encode()
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":  # exited, waiting to be reaped
                continue
            if int(fields[3]) == sid or mark in (d / "environ").read_bytes().split(b"\0"):
                found[int(d.name)] = fields[19]
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _wait_gone(tag: str, sid: int, seconds: float) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    while (left := _tagged(tag, sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _stop_head(proc: subprocess.Popen, tag: str) -> None:
    """SIGTERM the head's process group, then SIGKILL, by PID, whatever the
    head started that is still alive; fails if anything survives."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    left = _wait_gone(tag, proc.pid, 10)
    for pid, start in left.items():
        if _start_time(pid) == start:  # the same process, not a reused PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)
    left = _wait_gone(tag, proc.pid, 10)
    assert not left, f"processes of the test's Ray head survived SIGTERM and SIGKILL: {sorted(left)}"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    # Ray puts socket paths under its temp dir; they must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="imprint-rt-", dir="/tmp"))
    token, tag = secrets.token_hex(32), secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(tmp / "home"),  # nothing lands in the real ~/.ray or ~/.config
        RAY_AUTH_MODE="token",  # as a production head; the token only in the environment
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops at once, no 30 s drain
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        IMPRINT_CACHE=str(tmp / "cache"),  # the demo shards are built here
        **{TAG_VAR: tag},
    )
    (tmp / "home").mkdir()
    gcs, dash, agent, client = (_free_port() for _ in range(4))
    log = tmp / "head.log"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
           "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 << 20),
           "--temp-dir", str(ray_tmp), "--include-dashboard", "true", "--disable-usage-stats"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    h = Head(url=f"http://127.0.0.1:{dash}", env=env, tmp=tmp, token=token, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if h.get("/api/version").get("ray_version") and isinstance(h.get("/api/jobs/"), list):
                    break
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"the dashboard never answered:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield h
    finally:
        try:
            _stop_head(proc, tag)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def submit(head: Head, out: Path, *options: str, timeout: float = 300) -> subprocess.CompletedProcess:
    sets = [a for s in [*QUICK, f"output.path={out}"] for a in ("--set", s)]
    cmd = [str(SUBMIT), "--address", head.url, "--working-dir", str(REPO), *options, str(DEMO_JOB), *sets]
    return subprocess.run(cmd, env=head.env, cwd=head.tmp, capture_output=True, text=True, timeout=timeout)


def explain(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-3000:]}"


def submission_id(out: Path) -> str:
    sets = [a for s in [*QUICK, f"output.path={out}"] for a in ("--set", s)]
    r = subprocess.run([str(SUBMIT), str(DEMO_JOB), *sets, "--print-id"], capture_output=True, text=True, check=True)
    return r.stdout.strip()


def check_output(head: Head, out: Path) -> list[dict]:
    """Every demo image has one ok sources row, images x targets x seeds results
    rows and images x seeds noise rows, each exactly once, and both shards a
    done marker with the job's spec hash. Returns the markers."""
    import pyarrow.parquet as pq

    from pipeline.spec import load_spec

    spec = load_spec(DEMO_JOB, [*QUICK, f"output.path={out}"])
    seeds = spec.edit.seeds
    tars = sorted(str(p) for p in (head.tmp / "cache").rglob("*.tar"))
    assert len(tars) == 2, tars  # the demo's two shards, built by the job's driver
    images, results = [], []
    for tar in tars:
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tf.extractfile(m))
                    key = m.name[: -len(".json")]
                    targets = list(dict.fromkeys(
                        [*meta["target_prompts"], *(t.format(source=meta["source_prompt"]) for t in spec.input.templates)]))
                    images.append((tar, key))
                    results += [(tar, key, ti, si, tp) for ti, tp in enumerate(targets) for si in range(seeds)]
    assert len(images) >= 4 and len(results) >= len(images) * seeds  # the photo sample: one target prompt each

    src = pq.read_table(out / "sources").to_pylist()
    assert sorted((r["shard"], r["key"]) for r in src) == sorted(images)
    assert {r["status"] for r in src} == {"ok"}, [r["error"] for r in src]
    res = pq.read_table(out / "results").to_pylist()
    assert sorted((r["shard"], r["key"], r["target_index"], r["seed_index"], r["target_prompt"]) for r in res) \
        == sorted(results)
    assert all(r["status"] in ("ok", "rejected") for r in res)
    assert all(r["image"] for r in res if r["status"] == "ok")
    if spec.output.noise:
        noise = pq.read_table(out / "noise").to_pylist()
        assert sorted((r["shard"], r["key"], r["seed_index"]) for r in noise) \
            == sorted((t, k, s) for t, k in images for s in range(seeds))

    markers = [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]
    assert sorted(m["shard"] for m in markers) == tars
    job_hash = json.loads((out / "job.json").read_text())["spec_hash"]
    assert {m["spec_hash"] for m in markers} == {job_hash}
    return markers


def jobs_of(head: Head, sid: str) -> list[dict]:
    return [j for j in head.get("/api/jobs/") if (j.get("submission_id") or "").startswith(sid)]


def test_demo_job_through_submit_script(head):
    out = head.tmp / "demo"
    r = submit(head, out)
    assert r.returncode == 0, explain(r)
    sid = submission_id(out)
    assert f"job {sid}: SUCCEEDED" in r.stdout, explain(r)
    markers = check_output(head, out)

    # The same command again is recognised as done: nothing is resubmitted.
    again = submit(head, out)
    assert again.returncode == 0 and f"job {sid} already SUCCEEDED" in again.stdout, explain(again)
    assert [j["status"] for j in jobs_of(head, sid)] == ["SUCCEEDED"]
    assert [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))] == markers


def shard_actors(head: Head) -> list[dict]:
    return head.get("/api/v0/actors", filter_keys="class_name", filter_predicates="=",
                    filter_values="_ShardActor", limit=1000, detail="false")["data"]["result"]["result"]


def test_job_survives_its_worker_killed_mid_run(head):
    out = head.tmp / "killed"
    before = {a["actor_id"] for a in shard_actors(head)}
    r = submit(head, out, "--no-wait")
    assert r.returncode == 0, explain(r)
    sid = submission_id(out)

    # The job's shard worker, killed by PID as soon as it is ALIVE: the
    # executor hands an actor its shards the moment it is created, so from
    # then on it is working on them (a demo shard takes it a second or two).
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        alive = [a for a in shard_actors(head) if a["actor_id"] not in before and a["state"] == "ALIVE"]
        if alive:
            victim = alive[0]
            break
        assert not _done_markers(out), "the job finished before its worker could be killed"
        assert time.monotonic() < deadline, f"no shard worker came up: {jobs_of(head, sid)}"
        time.sleep(0.1)
    pid = victim["pid"]
    assert f"{TAG_VAR}={head.env[TAG_VAR]}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    os.kill(pid, signal.SIGKILL)

    # Submitting the same command again follows the running job to its end.
    r = submit(head, out)
    assert r.returncode == 0, explain(r)
    assert [j["status"] for j in jobs_of(head, sid)] == ["SUCCEEDED"]
    markers = check_output(head, out)
    # The killed worker had work left: a replacement committed at least one
    # shard, and check_output found no row twice.
    assert any(m["pid"] != pid for m in markers), "the worker was killed after it had finished every shard"
    dead = {a["actor_id"]: a for a in shard_actors(head)}[victim["actor_id"]]
    assert dead["state"] == "DEAD"


def test_plain_ray_job_submit_needs_no_flags(head):
    """`ray job submit -- imprint run JOB` with nothing else: the driver finds
    the cluster through the RAY_ADDRESS Ray sets for a submitted job's
    entrypoint (no --ray-address, no --executor), joins it, and its worker
    runs there (the marker's node is the head's node)."""
    out = head.tmp / "plain"
    sets = [a for s in [*QUICK, f"output.path={out}"] for a in ("--set", s)]
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}
    runtime_env = json.dumps({"working_dir": str(REPO), "excludes": [".git", ".venv", ".cache"]})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.url, "--runtime-env-json", runtime_env,
           "--", "imprint", "run", "jobs/demo.toml", *sets]
    r = subprocess.run(cmd, env=env, cwd=head.tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "succeeded" in r.stdout, explain(r)
    markers = check_output(head, out)
    actors = {a["actor_id"]: a for a in shard_actors(head)}
    assert all(m["actor_id"] in actors for m in markers), "the shards ran in actors of another cluster"
    assert all(m["node_id"] == actors[m["actor_id"]]["node_id"] and m["host"] for m in markers)


def _done_markers(out: Path) -> list[Path]:
    return sorted((out / "_done").glob("*.json")) if (out / "_done").is_dir() else []
