"""Running a job: check everything that can be checked before any work,
skip shards already done under the same spec, then hand shards to workers,
inline or as Ray actors. Ray is a thin executor around `ShardWorker`; the
shard is the unit of scheduling, output, retry and resume.

Every scheduling decision (which worker gets which shard, when to ask for a
worker, what charges an attempt, when the job stops) is made by the pure
state machine in `scheduler.py`; the drivers here only turn what they see
(Ray's results and errors, inline results) into its events and carry out
its actions. On Ray the driver keeps as many worker actors requested as the
cluster has, or its autoscaler can add, GPU slots for (`_worker_cap`):
actors that cannot be placed yet stay pending, which is the demand that
makes the autoscaler add GPU nodes."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field

from .data import expand_shards, missing_shards, shard_name  # noqa: F401
from .preflight import JobError, holds_results, preflight  # noqa: F401 (JobError: its public home)
from . import scheduler as sch
from .spec import JobSpec, SpecError, to_toml
from .store import STATS, OutputError, OutputStore

# Without the autoscaler's limits (an autoscaler that does not publish its
# cluster config), request this many GPU workers at most: the ones that cannot
# be placed are the demand that makes it add nodes. run.max_workers overrides.
UNKNOWN_REACH_WORKERS = 16
TRACEBACK_LINES = 8
JOB_ERROR_FILE = "job.error.json"  # why the last run stopped, for `imprint status`


class JobStopped(RuntimeError):
    """The scheduler stopped the job (no worker placed within
    run.placement_timeout_s, workers that cannot start); the message says
    why and `info` holds the error it stopped for, if any. Done shards are
    kept: the same command resumes."""

    def __init__(self, message: str, info: dict | None = None):
        self.info = info or {}
        super().__init__(message)


class WorkerStartError(JobStopped):
    """Workers could not start (model load, device, parameters): the first
    one of the job, or the same error on several nodes (see scheduler.py)."""

    def __init__(self, info: dict, message: str | None = None):
        where = f" on {info['host']}" if info.get("host") else ""
        super().__init__(message or f"a worker could not start{where}: {info['type']}: {info['message']}", info)


class JobInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the driver stopped its workers; the report says
    what was done. Rerunning the same command resumes."""

    def __init__(self, signum: int, report: "JobReport"):
        self.signum, self.report = signum, report
        super().__init__(signal.Signals(signum).name)


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM reached the driver (see _StopSignals)."""

    def __init__(self, signum: int):
        self.signum = signum


@dataclass
class JobReport:
    output: str
    total: int
    skipped: int = 0
    done: int = 0
    failed: dict = field(default_factory=dict)  # shard url -> "Type: message"
    failures: dict = field(default_factory=dict)  # shard url -> its _failed/ record (type, message, traceback, ...)
    images: int = 0
    errors: int = 0
    error_types: Counter = field(default_factory=Counter)  # bad samples per Sample.error_type
    attempts: Counter = field(default_factory=Counter)  # shard url -> failed attempts charged to it
    edits: int = 0
    unet_calls: int = 0
    seconds: float = 0.0


# -- failures ------------------------------------------------------------------


def failure_info(exc: BaseException) -> dict:
    """Type, message and the last lines of the traceback of an exception, and
    whether it would repeat on a retry (see `is_deterministic`)."""
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return {"type": type(exc).__name__, "message": str(exc), "traceback": lines[-TRACEBACK_LINES:],
            "deterministic": is_deterministic(exc)}


def is_deterministic(exc: BaseException) -> bool:
    """A spec or data error (a ValueError: a prompt P2P cannot align, a bad
    parameter) fails the same way on every retry, so the shard is not
    retried. I/O errors (OSError, also those that are ValueErrors too) are
    worth another attempt."""
    return isinstance(exc, ValueError) and not isinstance(exc, OSError)


def _is_cuda_error(info: dict) -> bool:
    """A CUDA error can leave the device unusable for the rest of the process."""
    return "CUDA" in info["message"] or info["type"] in ("OutOfMemoryError", "AcceleratorError")


def run_shard(worker, url: str) -> dict:
    """One shard on a worker: {"summary": ...} or {"failure": failure_info}.
    Used inline and inside the Ray actor, so both record failures alike."""
    try:
        return {"summary": worker.process(url)}
    except Exception as exc:  # the shard failed, the worker lives on
        return {"failure": failure_info(exc)}


# -- progress --------------------------------------------------------------------


class Progress:
    """Images done (whole shards plus the samples done inside running ones),
    edits per second and an ETA, through tqdm: a bar redrawn in place on a
    terminal, a plain line every `every` seconds (and per finished shard) in
    a log. The ETA counts down within a shard because running shards report
    their samples; the total is estimated from the shards finished so far."""

    def __init__(self, total: int, skipped: int, enabled: bool):
        from tqdm import tqdm

        self.total, self.skipped, self.enabled = total, skipped, enabled
        self.done = self.failed = self.samples = self.edits = 0
        self.live: dict[str, dict] = {}  # running shard -> its worker's live counters
        self.finished: set[str] = set()  # a late counter read of these must not count them twice
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.every = 15.0
        self._last_line = 0.0
        self._last_state: tuple = ()
        self._lock = threading.Lock()
        self.bar = tqdm(total=None, unit="img", desc="[imprint]", file=sys.stderr, smoothing=0,
                        dynamic_ncols=True, disable=not (enabled and self.tty))
        self.format_meter = tqdm.format_meter

    def shard_done(self, summary: dict) -> None:
        with self._lock:
            self.done += 1
            self.samples += summary["images"] + summary["errors"]
            self.edits += summary["edits"]
            self.live.pop(summary["shard"], None)
            self.finished.add(summary["shard"])
        self.refresh(line=True)

    def shard_failed(self, url: str) -> None:
        with self._lock:
            self.failed += 1
            self.live.pop(url, None)
            self.finished.add(url)
        self.refresh(line=True)

    def shard_stopped(self, url: str) -> None:
        """Its worker is gone: what it did inside the shard no longer counts."""
        with self._lock:
            self.live.pop(url, None)

    def set_live(self, live: dict) -> None:
        if live.get("shard") and live["shard"] not in self.finished:
            with self._lock:
                self.live[live["shard"]] = live

    def refresh(self, line: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            samples = self.samples + sum(v["samples"] for v in self.live.values())
            edits = self.edits + sum(v["edits"] for v in self.live.values())
            todo = self.total - self.skipped
            # Estimated images in the whole run, once a shard has shown its size.
            est = round(self.samples / self.done * todo) if self.done else None
            elapsed = time.monotonic() - self.t0
            post = (f"shards {self.done + self.skipped}/{self.total} done, {self.failed} failed, "
                    f"{len(self.live)} running | {edits / max(elapsed, 1e-9):.2f} edits/s")
            if self.tty:
                self.bar.total = max(est, samples) if est is not None else None
                self.bar.n = samples
                self.bar.set_postfix_str(post, refresh=False)
                self.bar.refresh()
                return
            now = time.monotonic()
            if not line and now - self._last_line < self.every:
                return
            self._last_line = now
            meter = self.format_meter(samples, max(est, samples) if est is not None else None, elapsed,
                                      unit="img", prefix="[imprint]", postfix=post, ncols=0)
            if (samples, post) == self._last_state and line:
                return  # nothing new since the last line (e.g. the final one right after a shard)
            self._last_state = (samples, post)
            sys.stderr.write(meter + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        self.refresh(line=True)
        self.bar.close()


# -- planning --------------------------------------------------------------------


def plan(spec: JobSpec, force: bool = False) -> tuple[OutputStore, list[str], list[str]]:
    """Everything checked before any model is loaded (`preflight`: the spec
    against the model, weights at hand, shards exist and the first opens,
    output free or this spec's), then the output path is claimed. Returns
    (store, all shards, pending). O(n) in the shards, with one listing of the
    output's done markers."""
    shards = preflight(spec, force=force).shards
    store = OutputStore.open(spec.output.path)
    h = spec.hash()
    try:
        old = store.current_hash()
    except OutputError as exc:  # job.json unreadable (run --force skips preflight's output check)
        raise JobError(str(exc)) from None
    # An output whose job.json names another spec but that holds no results
    # (its run stopped before committing anything) is free: take it over.
    take_over = bool(old and old != h and not holds_results(store))
    try:
        store.prepare(to_toml(spec), h, force=force or take_over)
    except OutputError as exc:
        raise JobError(str(exc)) from None
    store.delete(JOB_ERROR_FILE)  # a new run: the last one's stop reason no longer applies
    if force:
        return store, shards, shards
    try:
        done = store.done_shards(h)
    except (OSError, OutputError) as exc:
        store.release()
        raise JobError(f"output.path {spec.output.path!r}: {exc}") from None
    return store, shards, [s for s in shards if shard_name(s) not in done]


def _finish_output(store: OutputStore, spec_hash: str) -> None:
    """End of a run (done, failed or stopped): remove the parts of shards
    without a valid marker, so the finished output holds committed rows
    only, then give the output's lease up."""
    try:
        if store.finish(spec_hash) is None and store.lease is not None:
            print(f"[imprint] {store.lease.lost or 'the output lease is no longer ours'}: "
                  "leaving the output as it is", file=sys.stderr, flush=True)
    except (OSError, OutputError) as exc:
        print(f"[imprint] could not clean up the output ({exc}); the next run sweeps it", file=sys.stderr, flush=True)
    finally:
        store.release()


def run_job(spec: JobSpec, *, executor: str | None = None, force: bool = False, progress: bool = True,
            worker_cls: type | None = None) -> JobReport:
    """Run every pending shard of `spec`. `worker_cls` (default ShardWorker)
    is the class each worker instantiates, inline or inside a Ray actor.
    Raises JobStopped (WorkerStartError when workers cannot start) when the
    scheduler stops the job, and JobInterrupted on
    Ctrl-C / SIGTERM (after stopping the workers and any cluster it started)."""
    mode = executor or spec.run.executor
    if mode not in ("inline", "ray"):
        raise SpecError(f"run.executor: must be ray or inline, got {mode!r}")
    store, shards, pending = plan(spec, force)
    report = JobReport(output=spec.output.path, total=len(shards), skipped=len(shards) - len(pending))
    bar = Progress(len(shards), report.skipped, progress)
    t0 = time.perf_counter()
    try:
        with _StopSignals(raise_at_once=mode == "inline") as stop:
            if pending and mode == "inline":
                _run_inline(spec, store, pending, report, bar, worker_cls)
            elif pending:
                _run_ray(spec, store, pending, report, bar, worker_cls, stop)
    except JobStopped as exc:
        store.write_json(JOB_ERROR_FILE, {"error": str(exc), **exc.info, "time": time.time()})
        raise
    except (_Stopped, KeyboardInterrupt) as exc:
        report.seconds = time.perf_counter() - t0
        raise JobInterrupted(getattr(exc, "signum", signal.SIGINT), report) from None
    finally:
        bar.close()
        _finish_output(store, spec.hash())
    report.seconds = time.perf_counter() - t0
    return report


class _StopSignals:
    """Ctrl-C and SIGTERM in the driver stop the job through the same cleanup
    (workers killed, a local cluster shut down). Inline, the handler raises at
    once; on Ray it only records the signal and the driver loop raises, since
    an exception raised inside Ray's C calls (ray.wait) corrupts them."""

    def __init__(self, raise_at_once: bool):
        self.raise_at_once = raise_at_once
        self.signum = 0
        self.previous: dict = {}

    def _handle(self, signum, frame):
        self.signum = signum
        if self.raise_at_once:
            raise _Stopped(signum)

    def install(self) -> None:
        """Also after ray.init, which installs its own SIGTERM handler."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous.setdefault(sig, signal.signal(sig, self._handle))

    def check(self) -> None:
        if self.signum:
            raise _Stopped(self.signum)

    def __enter__(self) -> "_StopSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _shard_succeeded(store: OutputStore, report: JobReport, bar: Progress, summary: dict, where: dict) -> None:
    report.done += 1
    report.images += summary["images"]
    report.errors += summary["errors"]
    report.error_types.update(summary.get("error_types", {}))
    report.edits += summary["edits"]
    report.unet_calls += summary["unet_calls"]
    stats = {k: summary[k] for k in ("shard", "images", "errors", "edits", "kept", "unet_calls", "seconds")}
    stats.update(samples=summary["images"] + summary["errors"], error_types=summary.get("error_types", {}),
                 **{k: where.get(k) for k in ("host", "node_id", "actor_id")})
    store.write_json(f"{STATS}/{summary['name']}.json", stats)
    bar.shard_done(summary)


def _limits(spec: JobSpec, demand: str = "a worker") -> sch.Limits:
    r = spec.run
    return sch.Limits(max_attempts=r.max_attempts, shard_timeout_s=r.shard_timeout_s,
                      placement_timeout_s=r.placement_timeout_s, start_timeout_s=r.start_timeout_s, demand=demand)


class _Ledger:
    """Carries out the scheduler's bookkeeping actions, the same inline and on
    Ray: attempts, success stats, failure records, progress, notices, stops.
    `summaries` holds each finished shard's summary until its Succeed;
    `where` each worker's placement (host, node, actor) for the records."""

    def __init__(self, spec: JobSpec, store: OutputStore, report: JobReport, bar: Progress):
        self.spec, self.store, self.report, self.bar = spec, store, report, bar
        self.summaries: dict[str, dict] = {}
        self.where: dict[int, dict] = {}
        self.finished = False

    def apply(self, act) -> bool:
        """Carry out `act` if it is bookkeeping; False for the executor's own
        (Request, Submit, Kill)."""
        if isinstance(act, sch.Charge):
            self.report.attempts[act.shard] = act.attempts
        elif isinstance(act, sch.Requeue):
            self.bar.shard_stopped(act.shard)
        elif isinstance(act, sch.Succeed):
            _shard_succeeded(self.store, self.report, self.bar, self.summaries.pop(act.shard),
                             self.where.get(act.worker, {}))
        elif isinstance(act, sch.Fail):
            self._failed(act)
        elif isinstance(act, sch.Notice):
            print(f"[imprint] {act.message}", file=sys.stderr, flush=True)
        elif isinstance(act, sch.Stop):
            if act.start_error is not None:
                raise WorkerStartError(act.start_error, act.message)
            raise JobStopped(act.message)
        elif isinstance(act, sch.Finish):
            self.finished = True
        else:
            return False
        return True

    def _failed(self, act: "sch.Fail") -> None:
        f = act.failure
        where = self.where.get(act.worker, {}) if act.worker is not None else {}
        record = {"shard": act.shard, "attempts": act.attempts, "error": " ".join(f"{f['type']}: {f['message']}".split()),
                  **f, **{k: where.get(k) for k in ("host", "node_id", "actor_id")}, "time": time.time()}
        self.report.failed[act.shard] = record["error"]
        self.report.failures[act.shard] = record
        if not self.store.mark_failed(shard_name(act.shard), record):
            # Not even a failure record can be written: the output itself is
            # unusable (disk full, permission lost), so stop with one message.
            raise JobError(f"output.path {self.store.root!r} is no longer writable; shard {act.shard} failed: "
                           f"{record['error']}")
        self.bar.shard_failed(act.shard)


# -- inline --------------------------------------------------------------------


def _run_inline(spec, store, pending, report, bar, worker_cls) -> None:
    """One worker in this process, driven by the same scheduler as on Ray:
    the same retries, charges and failure records (no deadlines: a shard
    cannot be stopped from outside its own thread)."""
    from .worker import ShardWorker

    ledger = _Ledger(spec, store, report, bar)
    sched = sch.Scheduler(pending, _limits(spec), cap=1, now=time.monotonic())
    todo = deque(sched.start(time.monotonic()))
    worker, wid = None, None
    stop = threading.Event()

    def show_live():  # the shard runs in this thread; its counters are read from another
        while not stop.wait(0.5):
            if worker is not None:
                bar.set_live(worker.live)
                bar.refresh()

    watcher = threading.Thread(target=show_live, daemon=True)
    watcher.start()
    try:
        while todo and not ledger.finished:
            act = todo.popleft()
            if ledger.apply(act):
                continue
            now = time.monotonic()
            if isinstance(act, sch.Request):
                try:
                    worker, wid = (worker_cls or ShardWorker)(spec), act.worker
                except Exception as exc:
                    todo.extend(sched.start_failed(act.worker, None, failure_info(exc), now))
                    continue
                ledger.where[wid] = worker.placement
                todo.extend(sched.ready(wid, worker.placement.get("node_id"), now))
            elif isinstance(act, sch.Submit):
                result = run_shard(worker, act.shard)
                if "summary" in result:
                    ledger.summaries[act.shard] = result["summary"]
                    todo.extend(sched.shard_done(act.worker, act.shard, time.monotonic()))
                else:
                    f = result["failure"]
                    todo.extend(sched.shard_failed(act.worker, act.shard, f, time.monotonic(),
                                                   deterministic=f.get("deterministic", False)))
            elif isinstance(act, sch.Kill):
                worker = None if act.worker == wid else worker
    finally:
        stop.set()
        watcher.join()


# -- Ray -------------------------------------------------------------------------


class _ShardActor:
    """The Ray actor: a ShardWorker kept alive across shards. A start-up
    failure is kept, not raised, so `ready()` can tell the driver why
    (an exception in __init__ would only surface as a bare ActorDiedError)."""

    def __init__(self, spec: JobSpec, worker_cls: type | None, expect_cuda: bool):
        from .worker import ShardWorker, placement

        self.where = placement()
        self.worker = None
        self.startup_error = None
        try:
            if expect_cuda:
                _check_cuda(spec, self.where)
            self.worker = (worker_cls or ShardWorker)(spec)
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
    placed_asked: float = 0.0
    running: dict = field(default_factory=dict)  # process() ref -> shard url
    live_ref: object = None
    live_asked: float = 0.0
    live: dict = field(default_factory=dict)


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


def _placed_on(handle) -> tuple[bool, str | None]:
    """Whether a node has taken this actor (a worker process leased for it,
    maybe still in __init__), and which node, from the GCS actor table (a
    private Ray API: when it fails the actor counts as placed, so it is not
    killed as surplus; its start deadline then covers the wait)."""
    try:
        from ray._private import state

        address = state.actors(actor_id=handle._actor_id.hex())["Address"]
        return bool(address["Port"]), address.get("NodeID") or None
    except Exception:
        return True, None


def _loss_cause(exc: BaseException, handle) -> str:
    """Why an actor is gone, as the scheduler counts it: its node was
    preempted (spot) or lost/drained/unreachable (no attempt charged), or its
    process died (a crash, an OOM kill: the shard it ran is charged). Ray
    says "preempted" on the error; the rest is in the actor's death cause in
    the GCS (a private API; without it the error message is read)."""
    from ray.exceptions import ActorUnavailableError

    if getattr(exc, "preempted", False):
        return sch.PREEMPTED
    if isinstance(exc, ActorUnavailableError):
        return sch.NODE  # the GCS still counts it alive: its node cannot be reached
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
    return sch.NODE if "its node has died" in str(exc) else sch.CRASH


def _connect(ray, spec: JobSpec, stop: _StopSignals) -> bool:
    """Join the cluster named by run.ray_address (--ray-address), else by
    RAY_ADDRESS (set for the driver of a `ray job submit` job), else start a
    local one. Returns whether this driver started it (and must stop it)."""
    address = spec.run.ray_address or os.environ.get("RAY_ADDRESS", "")
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="warning",
                  runtime_env={"env_vars": _forwarded_env()})
    if address:
        ray.init(address=address, **kwargs)
    else:
        workers = spec.run.max_workers or 1
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(workers * spec.run.cpus_per_worker)),
                 _temp_dir=os.environ.get("IMPRINT_RAY_TMPDIR"), **kwargs)
    stop.install()
    return not address


def _run_ray(spec, store, pending, report, bar, worker_cls, stop: _StopSignals) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        started = _connect(ray, spec, stop)
    workers: dict[int, _Worker] = {}
    try:
        _drive(ray, spec, store, pending, report, bar, worker_cls, started, workers, stop)
    finally:
        for w in workers.values():
            ray.kill(w.handle, no_restart=True)
        if started:
            ray.shutdown()  # stops the local cluster's processes too


def _drive(ray, spec, store, pending, report, bar, worker_cls, started_local, workers, stop) -> None:
    """The Ray adapter: Ray's signals become scheduler events, the
    scheduler's actions become Ray calls."""
    from ray.exceptions import GetTimeoutError, RayActorError

    gpus, expect_cuda, reach, autoscaler = _placement(spec, ray, started_local)
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=spec.run.cpus_per_worker, max_restarts=0, max_task_retries=0,
                           concurrency_groups={"monitor": 1})(_ShardActor)
    demand = f"{gpus:g} GPU and {spec.run.cpus_per_worker:g} CPU each" if gpus else \
        f"{spec.run.cpus_per_worker:g} CPU each"
    cap = lambda: _worker_cap(spec, gpus, ray.cluster_resources().get("GPU", 0), reach, autoscaler)  # noqa: E731
    ledger = _Ledger(spec, store, report, bar)
    sched = sch.Scheduler(pending, _limits(spec, demand), cap(), time.monotonic())
    cap_checked = time.monotonic()

    def act(actions: list) -> None:
        for a in actions:
            if ledger.apply(a):
                continue
            if isinstance(a, sch.Request):
                workers[a.worker] = _request(actor_cls, a.avoid, spec, worker_cls, expect_cuda)
            elif isinstance(a, sch.Submit):
                w = workers[a.worker]
                w.running[w.handle.process.remote(a.shard)] = a.shard
            elif isinstance(a, sch.Kill):
                w = workers.pop(a.worker, None)
                if w is not None:
                    ray.kill(w.handle, no_restart=True)

    def lost(wid: int, w: _Worker, exc: BaseException, now: float) -> None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        cause = _loss_cause(exc, w.handle) if isinstance(exc, RayActorError) else sch.NODE
        doing = "while running the shard" if w.running else "while starting"
        info = {"type": type(exc).__name__, "message": f"worker lost {doing} ({cause}): {first}",
                "traceback": str(exc).splitlines()[-TRACEBACK_LINES:]}
        act(sched.worker_lost(wid, cause, info, now))

    act(sched.start(time.monotonic()))
    while not ledger.finished:
        stop.check()
        now = time.monotonic()
        if now - cap_checked > 2.0:
            cap_checked = now
            act(sched.set_cap(cap(), now))
        for wid, w in list(workers.items()):
            if not w.placed and w.ready_ref is not None and now - w.placed_asked > 2.0:
                w.placed_asked = now
                w.placed, node = _placed_on(w.handle)
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
            done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            if done:
                done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        else:
            time.sleep(0.5)
        for ref in done:
            wid, what = refs[ref]
            w = workers.get(wid)
            if w is None or ledger.finished:
                continue  # killed while handling an earlier ref of this round
            now = time.monotonic()
            try:
                result = ray.get(ref, timeout=10)
            except (RayActorError, GetTimeoutError) as exc:
                if what != "live":  # a failed counter read says nothing the other calls will not
                    lost(wid, w, exc, now)
                else:
                    w.live_ref = None
                continue
            if what == "ready":
                w.ready_ref, w.placed = None, True
                ledger.where[wid] = result
                if result["error"]:
                    info = {**result["error"], **{k: result.get(k) for k in ("host", "node_id")}}
                    act(sched.start_failed(wid, result.get("node_id"), info, now))
                else:
                    act(sched.ready(wid, result.get("node_id"), now))
            elif what == "live":
                w.live_ref, w.live = None, result or {}
                bar.set_live(w.live)
            else:
                url = w.running.pop(ref)
                if "summary" in result:
                    ledger.summaries[url] = result["summary"]
                    act(sched.shard_done(wid, url, now))
                else:
                    f = result["failure"]
                    act(sched.shard_failed(wid, url, f, now, deterministic=f.get("deterministic", False),
                                           broken=_is_cuda_error(f)))
        if ledger.finished:
            break
        now = time.monotonic()
        act(sched.tick(now))
        for w in workers.values():
            if w.running and w.live_ref is None and now - w.live_asked > 1.0:
                w.live_asked = now
                w.live_ref = w.handle.live.options(concurrency_group="monitor").remote()
        bar.refresh()


def _request(actor_cls, avoid: tuple, spec: JobSpec, worker_cls, expect_cuda: bool) -> _Worker:
    """A new actor, on none of the `avoid` nodes (where workers could not
    start), through a label selector on Ray's node-id label."""
    opts = {"label_selector": {"ray.io/node-id": f"!in({','.join(avoid)})"}} if avoid else {}
    try:
        h = actor_cls.options(**opts).remote(spec, worker_cls, expect_cuda)
    except (TypeError, ValueError):  # a Ray without label selectors: the node may be tried again
        h = actor_cls.remote(spec, worker_cls, expect_cuda)
    return _Worker(handle=h, ready_ref=h.ready.remote())


def _forwarded_env() -> dict:
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "IMPRINT_CACHE",
            "OMP_NUM_THREADS")
    # Inside a submitted Ray job, the job's runtime_env already gives its
    # env_vars to every worker, and Ray refuses a ray.init runtime_env that
    # sets one of them again.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: os.environ[k] for k in keys if k in os.environ and k not in taken}
