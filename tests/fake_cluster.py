"""A local stand-in for an autoscaling GPU cluster: a Ray head (0 CPUs, 0
GPUs) whose autoscaler uses Ray's `fake_multinode` provider, which "launches"
a node by starting another raylet on this machine with the resources its node
type declares (here 1 CPU + 1 GPU, 0 to 2 of them). Everything it starts lives
under a private temp dir, and teardown stops exactly the processes whose
command line names that dir, by PID (never `ray stop`, which would kill every
Ray cluster on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_port: int, max_gpu_nodes: int = 2) -> dict:
    empty_lists = ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                   "setup_commands", "head_setup_commands", "worker_setup_commands",
                   "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "imprint-fake",
        "max_workers": max_gpu_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200_000_000},
                    "node_config": {}, "min_workers": 0, "max_workers": max_gpu_nodes},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        **{k: [] for k in empty_lists},
    }


def pids_under(marker: str) -> list[int]:
    """Live processes whose command line or environment contains `marker`
    (our temp dir): Ray's workers replace their command line with a title
    (ray::_ShardActor.process) but inherit the environment of their raylet."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            stat = (d / "stat").read_text()
            env = (d / "environ").read_bytes() if marker.encode() not in cmd else b""
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            continue
        if marker.encode() in cmd or marker.encode() in env:
            found.append(int(d.name))
    return found


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                out[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def children_titled(parents: set[int], title: bytes) -> dict[int, int]:
    """pid -> parent of the live children of `parents` whose title starts with `title`."""
    out = {}
    for pid, ppid in parent_pids().items():
        if ppid in parents:
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                    out[pid] = ppid
            except OSError:
                continue
    return out


def stop_pids_under(marker: str, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process naming `marker`; returns survivors."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in pids_under(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids_under(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return pids_under(marker)


@dataclass
class FakeCluster:
    address: str  # GCS address, what RAY_ADDRESS holds
    tmp: Path  # the private Ray temp dir: every process started names it
    env: dict  # environment for drivers joining this cluster

    def node_raylets(self) -> dict[str, int]:
        """node id -> raylet PID of the worker nodes the autoscaler started
        (the head's raylet has --head)."""
        out = {}
        for pid in pids_under(str(self.tmp)):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"/raylet") and b"--head" not in args:
                opts = dict(a.decode().split("=", 1) for a in args if a.startswith(b"--node_id="))
                out[opts["--node_id"]] = pid
        return out

    def kill_node(self, node_id: str) -> list[int]:
        """Lose a worker node as a real cluster does: SIGKILL its raylet and
        every process under it (its workers, its agents) at once. Killing
        the raylet alone is not a node loss: its workers went on running
        and one committed the shard the job had already handed elsewhere."""
        raylet = self.node_raylets()[node_id]
        parents = parent_pids()
        tree, grew = {raylet}, True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
            tree |= more
            grew = bool(more)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return sorted(tree)


def start(tmp_root: Path, env: dict | None = None, max_gpu_nodes: int = 2) -> FakeCluster:
    ray_tmp = Path(tempfile.mkdtemp(prefix="imprint-fk-", dir="/tmp"))  # socket paths must stay short
    port = free_port()
    cfg = tmp_root / "autoscaling.json"
    cfg.write_text(json.dumps(autoscaling_config(port, max_gpu_nodes)))
    base = {k: v for k, v in (env or os.environ).items() if not k.startswith("RAY_")}
    base.update(PATH=f"{BIN}{os.pathsep}{base.get('PATH', '')}", RAY_AUTH_MODE="disabled",
                RAY_USAGE_STATS_ENABLED="0")
    head_env = {**base, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "IMPRINT_TEST_RAY_TMP": str(ray_tmp),  # inherited by every process of the cluster
                # a lost node is noticed in seconds, not the default ~30 s
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                "RAY_health_check_timeout_ms": "1000"}
    cmd = [str(BIN / "ray"), "start", "--head", f"--autoscaling-config={cfg}", "--num-cpus=0", "--num-gpus=0",
           f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={ray_tmp}",
           "--include-dashboard=false", "--disable-usage-stats"]
    r = subprocess.run(cmd, env=head_env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        stop(FakeCluster(f"127.0.0.1:{port}", ray_tmp, base))
        raise RuntimeError(f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return FakeCluster(address=f"127.0.0.1:{port}", tmp=ray_tmp, env={**base, "RAY_ADDRESS": f"127.0.0.1:{port}"})


def stop(cluster: FakeCluster) -> None:
    left = stop_pids_under(str(cluster.tmp))
    shutil.rmtree(cluster.tmp, ignore_errors=True)
    assert not left, f"processes of the fake cluster survived SIGTERM and SIGKILL: {left}"
