"""The Ray adapter: runs a job's shards on Ray actors, with every decision
left to the scheduler (scheduler.py). What Ray says (an actor placed, a
call's result or exception, a timeout, the cluster's GPU count) becomes one
scheduler event through a pure function, `outcome_event`; the scheduler's
actions become Ray calls (request, submit, kill). The job's flow (planning,
bookkeeping, inline runs) stays in executor.py.

Also here: how many workers to keep requested (`_worker_cap`: one per GPU
slot the cluster has or its autoscaler can add; actors that cannot be placed
yet stay pending, which is the demand that makes the autoscaler add GPU
nodes), what each asks for (`_placement`), and the local cluster a run
starts when it joins none (`_connect`: token authentication always on).

Ray is passed in (`ray`, `gcs`, `clock`), so tests/test_ray_driver_sim.py
drives this very loop with a fake Ray that raises every exception of
`ray.exceptions`, loses nodes and changes the GPU count at any moment."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

from . import scheduler as sch
from .driving import (TRACEBACK_LINES, Fatal, LiveRead, Lost, Nothing, Ready,
                      ShardDone, ShardFailed, StartFailed, _check_lease, _is_cuda_error, _Ledger, _limits, failure_info,
                      record_event, run_shard, scheduler_actions)
from .spec import JobSpec

# Without the autoscaler's limits (an autoscaler that does not publish its
# cluster config), request this many GPU workers at most: the ones that cannot
# be placed are the demand that makes it add nodes. run.max_workers overrides.
UNKNOWN_REACH_WORKERS = 16
CAP_EVERY_S = 2.0  # how often the cluster's GPU count is read again
PLACED_EVERY_S = 2.0  # how often an unplaced actor's placement is asked of the GCS
LIVE_EVERY_S = 1.0  # how often a busy worker's live counters are read
WAIT_S = 0.5  # one ray.wait
GET_TIMEOUT_S = 10.0


# -- what a Ray call's outcome means to the scheduler ----------------------------


# How each exception of ray.exceptions reaches the scheduler. Every class of
# the module is listed (tests/test_ray_adapter.py fails on a new one); at run
# time a class not listed (a newer Ray) takes its nearest listed base's entry.
#   actor: the actor died or cannot be reached; why (crash, lost or preempted
#          node) from the error and the GCS's death cause
#   crash: its process died (OOM kill by Ray's memory monitor, a segfault):
#          the shard it ran is charged (a start that dies counts as a start failure)
#   node:  the node, the object store or the connection failed: the worker is
#          dropped and its shard requeued uncharged (at most max_losses times)
#   start: the actor cannot start or never can be placed: a start failure
#   task:  the called method raised: a failed shard (or start)
#   fatal: the driver's own connection to the cluster is gone: the job stops
RAY_EXCEPTIONS = {
    "RayError": "crash",
    "RayActorError": "actor",
    "ActorDiedError": "actor",
    "ActorUnavailableError": "actor",
    "OutOfMemoryError": "crash",
    "WorkerCrashedError": "crash",
    "AsyncioActorExit": "crash",
    "NodeDiedError": "node",
    "GetTimeoutError": "node",
    "RaySystemError": "node",
    "RpcError": "node",
    "ObjectLostError": "node",
    "ObjectFetchTimedOutError": "node",
    "ObjectFreedError": "node",
    "ObjectReconstructionFailedError": "node",
    "OwnerDiedError": "node",
    "ReferenceCountingAssertionError": "node",
    "ObjectStoreFullError": "node",
    "OutOfDiskError": "node",
    "PlasmaObjectNotAvailable": "node",
    "TaskCancelledError": "node",
    "PendingCallsLimitExceeded": "node",
    "RayChannelError": "node",
    "RayChannelTimeoutError": "node",
    "RayCgraphCapacityExceeded": "node",
    "RayDirectTransportError": "node",
    "StreamingGeneratorReplayInconsistentError": "node",
    "ObjectRefStreamEndOfStreamError": "node",
    "RuntimeEnvSetupError": "start",
    "ActorUnschedulableError": "start",
    "TaskUnschedulableError": "start",
    "ActorPlacementGroupRemoved": "start",
    "TaskPlacementGroupRemoved": "start",
    "ActorAlreadyExistsError": "start",
    "ActorHandleNotFoundError": "node",
    "RayTaskError": "task",
    "UserCodeException": "task",
    "UnserializableException": "task",
    "CrossLanguageError": "task",
    "OufOfBandObjectRefSerializationException": "task",
    "LocalRayletDiedError": "fatal",
    "AuthenticationError": "fatal",
}
KINDS = ("actor", "crash", "node", "start", "task", "fatal")


def exception_kind(exc: BaseException) -> str:
    """RAY_EXCEPTIONS' entry of the exception's class or nearest listed base
    in ray.exceptions; "crash" for anything else (charged, so bounded by
    run.max_attempts)."""
    for klass in type(exc).__mro__:
        if klass.__module__ == "ray.exceptions" and klass.__name__ in RAY_EXCEPTIONS:
            return RAY_EXCEPTIONS[klass.__name__]
    return "crash"


def loss_cause(exc: BaseException, death_cause: str | None) -> str:
    """Why an actor is gone, as the scheduler counts it: its node was
    preempted (spot) or lost/drained/unreachable (no attempt charged), or its
    process died (a crash, an OOM kill: the shard it ran is charged). Ray
    says "preempted" on the error; `death_cause` is the GCS's (None when it
    could not be read: then the error message is read)."""
    if getattr(exc, "preempted", False):
        return sch.PREEMPTED
    if type(exc).__name__ == "ActorUnavailableError":
        return sch.NODE  # the GCS still counts it alive: its node cannot be reached
    if death_cause is not None:
        return death_cause
    return sch.NODE if "its node has died" in str(exc) else sch.CRASH


def outcome_event(call: str, outcome, *, shard: str | None = None, running: bool = False,
                  death_cause: str | None = None):
    """The one place a Ray call's outcome becomes a scheduler event. `call`:
    "ready", "process" (of `shard`) or "live"; `outcome`: what ray.get
    returned, or the exception it raised (GetTimeoutError for a timeout);
    `running`: the worker was running a shard; `death_cause`: the GCS's
    cause for an actor error (see loss_cause). Pure: no Ray calls."""
    if not isinstance(outcome, BaseException):
        if call == "ready":
            if outcome.get("error"):
                info = {**outcome["error"], **{k: outcome.get(k) for k in ("host", "node_id")}}
                return StartFailed(info, outcome.get("node_id"))
            return Ready(outcome.get("node_id"))
        if call == "live":
            return LiveRead(outcome or {})
        return record_event(shard, outcome)
    if call == "live":
        return Nothing()
    kind = exception_kind(outcome)
    lines = str(outcome).splitlines()
    first = lines[0] if lines else ""
    if kind == "fatal":
        return Fatal(f"the driver lost its Ray cluster ({type(outcome).__name__}: {first}); shards done are kept "
                     "and the same command resumes", _exc_info(outcome))
    if kind == "task":
        cause = getattr(outcome, "cause", None)
        info = failure_info(cause) if isinstance(cause, BaseException) else _exc_info(outcome)
        if call == "ready":
            return StartFailed(info)
        return ShardFailed(shard, info, deterministic=bool(info.get("deterministic")), broken=_is_cuda_error(info))
    if kind == "start":
        return StartFailed(_exc_info(outcome))
    cause = loss_cause(outcome, death_cause) if kind == "actor" else sch.CRASH if kind == "crash" else sch.NODE
    doing = "while running the shard" if running else "while starting"
    return Lost(cause, {"type": type(outcome).__name__, "message": f"worker lost {doing} ({cause}): {first}",
                        "traceback": lines[-TRACEBACK_LINES:]})


def _exc_info(exc: BaseException) -> dict:
    lines = str(exc).splitlines()
    return {"type": type(exc).__name__, "message": lines[0] if lines else "", "traceback": lines[-TRACEBACK_LINES:],
            "deterministic": False}


# -- the actor --------------------------------------------------------------------


class _ShardActor:
    """The Ray actor: a ShardWorker kept alive across shards. A start-up
    failure is kept, not raised, so `ready()` can tell the driver why
    (an exception in __init__ would only surface as a bare ActorDiedError).
    `fence`: the driver's lease; the worker's writes stop when it is lost."""

    def __init__(self, spec: JobSpec, worker_cls: type | None, expect_cuda: bool, fence: str | None = None):
        from .worker import ShardWorker, placement

        self.where = placement()
        self.worker = None
        self.startup_error = None
        try:
            if expect_cuda:
                _check_cuda(spec, self.where)
            self.worker = (worker_cls or ShardWorker)(spec)
            if getattr(self.worker, "store", None) is not None:
                self.worker.store.fence = fence
        except BaseException as exc:  # reported by ready(); the scheduler decides (stop, or avoid the node)
            self.startup_error = failure_info(exc)

    def ready(self) -> dict:
        return {**self.where, "error": self.startup_error}

    def process(self, url: str) -> dict:
        return run_shard(self.worker, url)

    def live(self) -> dict:  # runs in the "monitor" concurrency group, beside process()
        return self.worker.live if self.worker else {}


def _check_cuda(spec: JobSpec, where: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device = {spec.model.device!r} with run.gpus_per_worker = {spec.run.gpus_per_worker or 1} "
            f"expects CUDA, but this worker (host {where['host']}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}) sees no CUDA device; set model.device = \"cpu\" "
            f"and run.gpus_per_worker = 0 to run on CPUs")


@dataclass
class _Worker:
    """The driver's view of one actor (its scheduling state is the scheduler's)."""

    handle: object
    ready_ref: object  # ready(), until it has answered
    placed: bool = False  # a node has taken it (polled from the GCS)
    placed_asked: float = -math.inf
    running: dict = field(default_factory=dict)  # process() ref -> shard url
    live_ref: object = None
    live_asked: float = -math.inf
    live: dict = field(default_factory=dict)


# -- placement and the cluster's size ----------------------------------------------


def _placement(spec: JobSpec, ray, started_local: bool) -> tuple[float, bool, int | None, bool]:
    """(GPUs per worker, whether workers expect CUDA, GPUs the autoscaler can
    reach (None when unknown), whether an autoscaler runs)."""
    reach, autoscaler = _autoscaler_view(ray) if not started_local else (None, False)
    gpus = spec.run.gpus_per_worker
    device = spec.model.device
    if gpus is None:
        if device.startswith("cuda"):
            gpus = 1.0
        elif device == "auto":
            has = ray.cluster_resources().get("GPU", 0) > 0 or (reach or 0) > 0 or (reach is None and autoscaler)
            gpus = 1.0 if has else 0.0
        else:
            gpus = 0.0
    expect_cuda = gpus > 0 and (device == "auto" or device.startswith("cuda"))
    return gpus, expect_cuda, reach, autoscaler


def _autoscaler_view(ray) -> tuple[int | None, bool]:
    """GPUs the cluster can reach with its autoscaler (from the cluster config
    the autoscaler publishes: autoscaler v2, KubeRay), and whether an
    autoscaler that can add nodes runs at all (the v1 autoscaler publishes
    only its status, with the node types of the nodes it runs).
    Both are private Ray APIs, so any failure means "unknown"."""
    reach = None
    try:
        from ray._private import state

        limits = state.state.get_max_resources_from_cluster_config()
        if limits and 0 < limits.get("GPU", 0) < sys.maxsize:
            reach = int(limits["GPU"])
        running = limits is not None
    except Exception:
        running = False
    if not running:
        try:
            from ray.experimental.internal_kv import _internal_kv_get

            status = json.loads(_internal_kv_get("__autoscaling_status") or "{}")
            node_types = ((status.get("autoscaler_report") or {}).get("node_type_mapping") or {}).values()
            # Every head runs the v1 monitor; without a cluster config it has a
            # read-only provider whose "node types" are just "node_<id>" per
            # node, and it can add nothing.
            running = any(not t.startswith("node_") for t in node_types)
        except Exception:
            running = False
    return reach, running


def _worker_cap(spec: JobSpec, gpus_per_worker: float, cluster_gpus: float, reach: int | None,
                autoscaler: bool) -> int:
    """How many workers to keep requested. Explicit run.max_workers wins; CPU
    workers: 1; GPU workers: one per GPU slot the cluster has or its
    autoscaler can add; with an autoscaler whose limits are unknown, up to
    UNKNOWN_REACH_WORKERS (the pending ones are the scale-up demand); on a
    fixed cluster, its GPU slots (at least 1: a pending actor waits for a GPU
    node that is added by hand)."""
    if spec.run.max_workers:
        return spec.run.max_workers
    if gpus_per_worker == 0:
        return 1
    slots = lambda g: int(math.floor(g / gpus_per_worker + 1e-9))  # noqa: E731
    if reach is not None:
        return max(1, slots(max(reach, cluster_gpus)))
    if autoscaler:
        return max(UNKNOWN_REACH_WORKERS, slots(cluster_gpus))
    return max(1, slots(cluster_gpus))


class _GCS:
    """What the driver asks the GCS's actor table (private Ray APIs)."""

    @staticmethod
    def placed_on(handle) -> tuple[bool, str | None]:
        """Whether a node has taken this actor (a worker process leased for
        it, maybe still in __init__), and which node. When the table cannot
        be read the actor counts as placed, so it is not killed as surplus;
        its start deadline then covers the wait."""
        try:
            from ray._private import state

            address = state.actors(actor_id=handle._actor_id.hex())["Address"]
            return bool(address["Port"]), address.get("NodeID") or None
        except Exception:
            return True, None

    @staticmethod
    def death_cause(handle) -> str | None:
        """The actor's death cause as the scheduler counts it (see
        loss_cause), None when the table does not say."""
        try:
            from ray._private import state
            from ray.core.generated.common_pb2 import ActorDiedErrorContext, NodeDeathInfo

            cause = state.actors(actor_id=handle._actor_id.hex())["DeathCause"]
            if cause.HasField("actor_died_error_context"):
                ctx = cause.actor_died_error_context
                if ctx.node_death_info.reason == NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED:
                    return sch.PREEMPTED
                if ctx.reason == ActorDiedErrorContext.NODE_DIED:
                    return sch.NODE
                return sch.CRASH
            if cause.HasField("oom_context"):
                return sch.CRASH
        except Exception:
            pass
        return None


# -- the local cluster ---------------------------------------------------------------


def _connect(ray, spec: JobSpec, stop) -> bool:
    """Join the cluster named by run.ray_address (--ray-address), else by
    RAY_ADDRESS (set for the driver of a `ray job submit` job), else start a
    local one. Returns whether this driver started it (and must stop it).

    A local cluster's GCS and raylet listen on every interface (Ray 2.60 has
    no setting to bind them to loopback: a `_node_ip_address` of 127.0.0.1
    is replaced by the host's address), so it always runs with Ray's token
    authentication, whatever RAY_AUTH_MODE says: only processes holding the
    token (this driver and the workers its cluster starts) can use it."""
    address = spec.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="warning",
                  runtime_env={"env_vars": _forwarded_env()})
    if address:
        ray.init(address=address, **kwargs)
    else:
        workers = spec.run.max_workers or 1
        _token_auth()
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(workers * spec.run.cpus_per_worker)),
                 _temp_dir=os.environ.get("IMPRINT_RAY_TMPDIR"), **kwargs)
    stop.install()
    return not address


def _token_auth() -> None:
    """Token mode for the cluster about to start: in the environment (the
    GCS, the raylet and every worker inherit it) and in this process's Ray
    config, which was read when Ray was imported (Ray does the same when it
    turns token auth on by default; a driver whose config still says
    "disabled" would be refused by its own GCS)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


def _restore_auth(auth_mode: str | None) -> None:
    """After a local cluster is shut down: RAY_AUTH_MODE as the caller had
    it (a notebook, a test process that joins other clusters next)."""
    if auth_mode == os.environ.get("RAY_AUTH_MODE"):
        return
    if auth_mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = auth_mode
    from ray._raylet import Config

    Config.initialize("")


def _forwarded_env() -> dict:
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "IMPRINT_CACHE",
            "OMP_NUM_THREADS")
    # Inside a submitted Ray job, the job's runtime_env already gives its
    # env_vars to every worker, and Ray refuses a ray.init runtime_env that
    # sets one of them again.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: os.environ[k] for k in keys if k in os.environ and k not in taken}


# -- the driver loop --------------------------------------------------------------------


def _run_ray(spec, store, pending, report, bar, worker_cls, stop) -> None:
    import ray

    started = False
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    workers: dict[int, _Worker] = {}
    try:
        if not ray.is_initialized():
            started = _connect(ray, spec, stop)
        _drive(ray, spec, store, pending, report, bar, worker_cls, started, workers, stop)
    finally:
        for w in workers.values():
            ray.kill(w.handle, no_restart=True)
        if started:
            ray.shutdown()  # stops the local cluster's processes too
        if started:
            _restore_auth(auth_mode)


def _drive(ray, spec, store, pending, report, bar, worker_cls, started_local, workers, stop, *,
           gcs=_GCS, clock=time) -> None:
    """The Ray adapter's loop: Ray's signals become scheduler events
    (`outcome_event`), the scheduler's actions become Ray calls. `gcs`
    (placed_on, death_cause) and `clock` (monotonic, sleep) are Ray's GCS
    and the time, or a simulator's."""
    gpus, expect_cuda, reach, autoscaler = _placement(spec, ray, started_local)
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=spec.run.cpus_per_worker, max_restarts=0, max_task_retries=0,
                           concurrency_groups={"monitor": 1})(_ShardActor)
    demand = f"{gpus:g} GPU and {spec.run.cpus_per_worker:g} CPU each" if gpus else \
        f"{spec.run.cpus_per_worker:g} CPU each"
    cap = lambda: _worker_cap(spec, gpus, ray.cluster_resources().get("GPU", 0), reach, autoscaler)  # noqa: E731
    ledger = _Ledger(spec, store, report, bar)
    sched = sch.Scheduler(pending, _limits(spec, demand), cap(), clock.monotonic())
    cap_checked = clock.monotonic()
    fence = getattr(store, "fence", None)

    def act(actions: list) -> None:
        for a in actions:
            if ledger.apply(a):
                continue
            if isinstance(a, sch.Request):
                workers[a.worker] = _request(actor_cls, a.avoid, spec, worker_cls, expect_cuda, fence)
            elif isinstance(a, sch.Submit):
                _check_lease(store)  # a driver that lost the output's lease hands out no more work
                w = workers[a.worker]
                w.running[w.handle.process.remote(a.shard)] = a.shard
            elif isinstance(a, sch.Kill):
                w = workers.pop(a.worker, None)
                if w is not None:
                    ray.kill(w.handle, no_restart=True)

    act(sched.start(clock.monotonic()))
    while not ledger.finished:
        stop.check()
        now = clock.monotonic()
        if now - cap_checked > CAP_EVERY_S:
            cap_checked = now
            act(sched.set_cap(cap(), now))
        for wid, w in list(workers.items()):
            if not w.placed and w.ready_ref is not None and now - w.placed_asked > PLACED_EVERY_S:
                w.placed_asked = now
                w.placed, node = gcs.placed_on(w.handle)
                if w.placed:
                    act(sched.placed(wid, node, now))

        refs = {}
        for wid, w in workers.items():
            if w.ready_ref is not None:
                refs[w.ready_ref] = (wid, "ready")
            for ref in w.running:
                refs[ref] = (wid, "process")
            if w.live_ref is not None:
                refs[w.live_ref] = (wid, "live")
        done = []
        if refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=WAIT_S)
            if done:
                done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        else:
            clock.sleep(WAIT_S)
        for ref in done:
            wid, call = refs[ref]
            w = workers.get(wid)
            if w is None or ledger.finished:
                continue  # killed while handling an earlier ref of this round
            shard = w.running.pop(ref, None) if call == "process" else None
            if call == "ready":
                w.ready_ref, w.placed = None, True
            elif call == "live":
                w.live_ref = None
            try:
                outcome = ray.get(ref, timeout=GET_TIMEOUT_S)
            except Exception as exc:  # every Ray error is an outcome (see RAY_EXCEPTIONS)
                outcome = exc
            is_actor_error = isinstance(outcome, BaseException) and exception_kind(outcome) == "actor"
            death = gcs.death_cause(w.handle) if is_actor_error else None
            event = outcome_event(call, outcome, shard=shard, running=bool(w.running) or shard is not None,
                                  death_cause=death)
            if call == "ready" and not isinstance(outcome, BaseException):
                ledger.where[wid] = outcome
            if isinstance(event, LiveRead):
                w.live = event.live
                bar.set_live(w.live)
                continue
            if isinstance(event, ShardDone):
                ledger.summaries[shard] = event.summary
            act(scheduler_actions(sched, wid, event, clock.monotonic()))
        if ledger.finished:
            break
        now = clock.monotonic()
        act(sched.tick(now))
        for w in workers.values():
            if w.running and w.live_ref is None and now - w.live_asked > LIVE_EVERY_S:
                w.live_asked = now
                w.live_ref = w.handle.live.options(concurrency_group="monitor").remote()
        bar.refresh()


def _request(actor_cls, avoid: tuple, spec: JobSpec, worker_cls, expect_cuda: bool, fence: str | None = None) -> _Worker:
    """A new actor, on none of the `avoid` nodes (where workers could not
    start), through a label selector on Ray's node-id label."""
    opts = {"label_selector": {"ray.io/node-id": f"!in({','.join(avoid)})"}} if avoid else {}
    try:
        h = actor_cls.options(**opts).remote(spec, worker_cls, expect_cuda, fence)
    except (TypeError, ValueError):  # a Ray without label selectors: the node may be tried again
        h = actor_cls.remote(spec, worker_cls, expect_cuda, fence)
    return _Worker(handle=h, ready_ref=h.ready.remote())
