"""The Ray adapter (pipeline/ray_adapter.py) as a unit: every exception class
of `ray.exceptions`, a timeout and a worker's failure record map to one
scheduler event (`outcome_event`), and a new exception class of a newer Ray
fails here until it is mapped; the local cluster a run starts is usable only
with its token. The adapter's loop itself runs under the seeded simulator of
tests/test_ray_driver_sim.py."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections import Counter

import pytest
import ray.exceptions as rex

from pipeline import ray_adapter as ra
from pipeline import scheduler as sch
from pipeline.executor import JobStopped, OutputTakenOver, failure_info
from pipeline.spec import load_spec

RAY_EXCEPTION_CLASSES = sorted(
    (c for _, c in inspect.getmembers(rex, inspect.isclass)
     if issubclass(c, BaseException) and c.__module__ == "ray.exceptions"), key=lambda c: c.__name__)


def ray_exception(cls: type) -> BaseException:
    """An instance of any class of ray.exceptions (their constructors differ)."""
    for args in ((), ("boom",), ("boom", b"\0" * 16), ("process", "Traceback: boom", ValueError("boom")),
                 ("ab" * 14, "", "call site")):
        try:
            exc = cls(*args)
            str(exc)
            return exc
        except Exception:
            pass
    exc = cls.__new__(cls)
    Exception.__init__(exc, "boom")
    return exc


def test_every_class_of_ray_exceptions_is_mapped():
    """Fails when a Ray upgrade adds an exception class: decide what it means
    to the scheduler and add it to RAY_EXCEPTIONS."""
    names = {c.__name__ for c in RAY_EXCEPTION_CLASSES}
    assert len(names) > 30  # the module was read, not an empty listing
    unmapped = names - set(ra.RAY_EXCEPTIONS)
    assert not unmapped, f"ray.exceptions classes with no scheduler event in RAY_EXCEPTIONS: {sorted(unmapped)}"
    assert set(ra.RAY_EXCEPTIONS.values()) <= set(ra.KINDS)
    assert not set(ra.RAY_EXCEPTIONS) - names, "RAY_EXCEPTIONS names classes Ray no longer has"


EXPECTED = {"actor": ra.Lost, "crash": ra.Lost, "node": ra.Lost, "start": ra.StartFailed, "task": ra.ShardFailed,
            "fatal": ra.Fatal}


@pytest.mark.parametrize("cls", RAY_EXCEPTION_CLASSES, ids=lambda c: c.__name__)
def test_each_exception_becomes_its_event_and_the_scheduler_takes_it(cls):
    """Whatever a call raises, the scheduler gets an event it handles (a
    stop is JobStopped, the one exception meant to leave the driver)."""
    exc = ray_exception(cls)
    kind = ra.exception_kind(exc)
    assert kind == ra.RAY_EXCEPTIONS[cls.__name__]
    event = ra.outcome_event("process", exc, shard="s0", running=True, death_cause=sch.CRASH)
    assert isinstance(event, EXPECTED[kind]), event
    if kind == "crash":
        assert event.cause == sch.CRASH
    if kind == "node":
        assert event.cause == sch.NODE
    assert isinstance(ra.outcome_event("live", exc), ra.Nothing)  # a failed counter read says nothing
    s = sch.Scheduler(["s0", "s1"], sch.Limits(), 2, 0.0)
    s.start(0.0)
    s.ready(0, "n0", 1.0)
    s.ready(1, "n1", 1.0)
    if kind == "fatal":
        with pytest.raises(JobStopped, match="lost its Ray cluster"):
            ra.scheduler_actions(s, 0, event, 2.0)
        return
    acts = ra.scheduler_actions(s, 0, event, 2.0)
    assert sch.Kill(0) in acts or kind == "task", acts  # the worker goes unless only its shard failed
    assert s.shards["s0"].state in ("queued", "assigned", "failed")


def test_the_issue_s_exceptions():
    """Issue 31 item 1: these were not RayActorErrors and escaped the driver."""
    oom = ra.outcome_event("process", ray_exception(rex.OutOfMemoryError), shard="s", running=True)
    assert isinstance(oom, ra.Lost) and oom.cause == sch.CRASH  # the memory monitor's kill: charged
    assert "OutOfMemoryError" == oom.failure["type"]
    assert isinstance(ra.outcome_event("ready", ray_exception(rex.RuntimeEnvSetupError)), ra.StartFailed)
    assert isinstance(ra.outcome_event("ready", ray_exception(rex.ActorUnschedulableError)), ra.StartFailed)
    died = ra.outcome_event("process", ray_exception(rex.NodeDiedError), shard="s", running=True)
    assert isinstance(died, ra.Lost) and died.cause == sch.NODE
    assert isinstance(ra.outcome_event("process", ray_exception(rex.LocalRayletDiedError), shard="s"), ra.Fatal)
    timeout = ra.outcome_event("process", rex.GetTimeoutError("get timed out"), shard="s", running=True)
    assert isinstance(timeout, ra.Lost) and timeout.cause == sch.NODE


def test_actor_errors_take_the_cause_from_ray():
    died = ray_exception(rex.ActorDiedError)
    for gcs, expected in ((sch.PREEMPTED, sch.PREEMPTED), (sch.NODE, sch.NODE), (sch.CRASH, sch.CRASH),
                          (None, sch.CRASH)):
        assert ra.outcome_event("process", died, shard="s", death_cause=gcs).cause == expected
    class Preempted(rex.ActorDiedError):
        preempted = True  # what Ray says of an actor whose node was preempted

    assert ra.outcome_event("process", Preempted(), shard="s", death_cause=sch.CRASH).cause == sch.PREEMPTED
    unreachable = rex.ActorUnavailableError("node unreachable", b"\0" * 16)
    assert ra.outcome_event("process", unreachable, shard="s", death_cause=sch.CRASH).cause == sch.NODE


def test_a_method_that_raised_is_a_failed_shard_with_its_cause():
    err = rex.RayTaskError("process", "Traceback: boom", ValueError("bad prompt"))
    event = ra.outcome_event("process", err, shard="s", running=True)
    assert isinstance(event, ra.ShardFailed) and event.failure["type"] == "ValueError" and event.deterministic
    assert isinstance(ra.outcome_event("ready", err), ra.StartFailed)
    cuda = rex.RayTaskError("process", "Traceback", RuntimeError("CUDA error: an illegal memory access"))
    assert ra.outcome_event("process", cuda, shard="s").broken


def test_results_and_failure_records():
    assert ra.outcome_event("ready", {"host": "h", "node_id": "n1", "error": None}) == ra.Ready("n1")
    start = ra.outcome_event("ready", {"host": "h", "node_id": "n1", "error": {"type": "OSError", "message": "m"}})
    assert isinstance(start, ra.StartFailed) and start.node == "n1" and start.failure["host"] == "h"
    assert ra.outcome_event("live", {"shard": "s", "samples": 3}) == ra.LiveRead({"shard": "s", "samples": 3})
    assert ra.outcome_event("process", {"summary": {"n": 1}}, shard="s") == ra.ShardDone("s", {"n": 1})
    try:
        raise RuntimeError("CUDA error: device-side assert triggered")
    except RuntimeError as exc:
        cuda = failure_info(exc)
    event = ra.outcome_event("process", {"failure": cuda}, shard="s")
    assert isinstance(event, ra.ShardFailed) and event.broken and not event.deterministic
    lost = ra.outcome_event("process", {"failure": {"type": "LeaseLost", "message": "now held by newrun"}}, shard="s")
    assert isinstance(lost, ra.Fatal) and lost.taken_over
    with pytest.raises(OutputTakenOver, match="newrun"):
        ra.scheduler_actions(sch.Scheduler(["s"], sch.Limits(), 1, 0), 0, lost, 1)


def test_a_newer_ray_s_unknown_subclass_takes_its_base_s_entry():
    class NewNodeError(rex.NodeDiedError):
        pass

    NewNodeError.__module__ = "ray.exceptions"
    assert ra.exception_kind(NewNodeError("x")) == "node"
    assert ra.exception_kind(KeyError("not Ray's")) == "crash"  # charged, so bounded by max_attempts


# -- the local cluster ------------------------------------------------------------


class InitOnly:
    """Records how ray.init was called; the adapter's loop is not run."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kw):
        self.calls.append((kw, os.environ.get("RAY_AUTH_MODE")))

    def shutdown(self):
        pass

    def kill(self, *a, **k):
        pass


class NoSignals:
    def install(self):
        pass


@pytest.mark.parametrize("user_mode", [None, "disabled", "token"])
def test_a_cluster_this_run_starts_always_has_token_auth(monkeypatch, tmp_path, user_mode):
    """Issue 31 item 7b: the GCS and raylet of a local cluster listen on the
    host's addresses, so it runs with token auth even where RAY_AUTH_MODE
    says otherwise; the caller's environment is as it was afterwards. A
    cluster that is joined keeps its own mode."""
    import sys

    fake = InitOnly()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(ra, "_token_auth", lambda: os.environ.__setitem__("RAY_AUTH_MODE", "token"))
    monkeypatch.setattr(ra, "_restore_auth", lambda mode: os.environ.__setitem__("RAY_AUTH_MODE", mode)
                        if mode is not None else os.environ.pop("RAY_AUTH_MODE", None))
    monkeypatch.setattr(ra, "_drive", lambda *a, **k: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if user_mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", user_mode)
    base = {"input": {"shards": ["x.tar"]}, "output": {"path": str(tmp_path / "o")}}
    ra._run_ray(load_spec(raw=base), None, [], None, None, None, NoSignals())
    kw, mode = fake.calls[-1]
    assert kw["address"] == "local" and mode == "token" and kw["include_dashboard"] is False
    assert os.environ.get("RAY_AUTH_MODE") == user_mode
    ra._run_ray(load_spec(raw={**base, "run": {"ray_address": "ray://head:10001"}}), None, [], None, None, None,
                NoSignals())
    kw, mode = fake.calls[-1]
    assert kw["address"] == "ray://head:10001" and mode == user_mode


def test_the_local_cluster_refuses_a_client_without_its_token(monkeypatch, tmp_path):
    """Issue 31 item 7b, on a real local cluster started by `_connect` with
    RAY_AUTH_MODE=disabled in the environment (as the test clusters and some
    shells set it): the GCS answers a call without the cluster's token with
    UNAUTHENTICATED (and the same call with it: proof the call is right),
    and no socket beyond loopback serves anything but metrics without it."""
    import http.client
    import urllib.error
    import urllib.request

    import grpc
    import psutil
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    short = tempfile.mkdtemp(prefix="imprint-ray-")  # Ray's socket paths must stay under 108 bytes
    monkeypatch.setenv("IMPRINT_RAY_TMPDIR", short)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    spec = load_spec(raw={"input": {"shards": ["x.tar"]}, "run": {"max_workers": 1}})
    assert not ray.is_initialized()
    try:
        assert ra._connect(ray, spec, NoSignals())
        gcs = ray.get_runtime_context().gcs_address
        channel = grpc.insecure_channel(gcs)
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        from ray._raylet import AuthenticationTokenLoader

        header = AuthenticationTokenLoader.instance().get_token_for_http_header()  # this driver's token
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                    metadata=[(k.lower(), v) for k, v in header.items()])
        assert len(reply.node_info_list) == 1
        # Every socket its processes listen on beyond loopback: Ray's gRPC servers (not HTTP/1; the GCS's
        # refusal is checked above), HTTP servers that want the token (401), or Prometheus metrics (read
        # only; Ray binds its metrics servers to loopback only on a node whose address is loopback, and
        # it replaces a loopback node address with the host's).
        ours = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        host = ray.util.get_node_ip_address()
        seen = Counter()
        for p in ours:
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            for c in conns:
                if c.status != psutil.CONN_LISTEN or c.laddr.ip in ("127.0.0.1", "::1"):
                    continue
                url = f"http://{host if c.laddr.ip in ('0.0.0.0', '::') else c.laddr.ip}:{c.laddr.port}/"
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        body = r.read()
                    assert body.startswith(b"# HELP"), f"{p.name()} serves {url} without a token: {body[:200]!r}"
                    seen["metrics"] += 1
                except urllib.error.HTTPError as exc:
                    assert exc.code == 401, f"{p.name()} answers {url} with {exc.code} without a token"
                    seen["401"] += 1
                except (http.client.HTTPException, ConnectionError):
                    seen["not http/1"] += 1  # a gRPC server
        assert seen["401"] and seen["not http/1"], seen  # the check reached both kinds of server
    finally:
        ray.shutdown()
        ra._restore_auth("disabled")  # this process's Ray config as it was (later tests join other clusters)
        shutil.rmtree(short, ignore_errors=True)
