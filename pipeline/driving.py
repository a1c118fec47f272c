"""What both drivers (inline in executor.py, Ray in ray_adapter.py) share:
the errors a job stops with, a shard's failure record, the events a worker's
result becomes for the scheduler, and the ledger that carries out the
scheduler's bookkeeping actions (attempts, success stats, failure records,
notices, stops) with the driver's own retried writes and its lease checks.
Below both drivers in the import order, so neither imports the other's
module to reach them."""

from __future__ import annotations

import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from . import scheduler as sch
from .data import shard_name
from .preflight import JobError
from .spec import JobSpec
from .store import STATS, LeaseLost, OutputStore, one_line


TRACEBACK_LINES = 8


# The driver's own writes (see _driver_write): tries, and the first wait between
# them (doubled after each).
DRIVER_WRITE_TRIES = 4
DRIVER_WRITE_WAIT_S = 0.5


class JobStopped(RuntimeError):
    """The scheduler stopped the job (no worker placed within
    run.placement_timeout_s, workers that cannot start); the message says
    why and `info` holds the error it stopped for, if any. Done shards are
    kept: the same command resumes."""

    def __init__(self, message: str, info: dict | None = None):
        self.info = info or {}
        super().__init__(message)


class OutputTakenOver(JobStopped):
    """The output's lease is no longer this driver's (it was stopped past the
    lease's TTL and another run took the output over): it stops and writes
    nothing more there, not even its stop reason."""


class WorkerStartError(JobStopped):
    """Workers could not start (model load, device, parameters): the first
    one of the job, or the same error on several nodes (see scheduler.py)."""

    def __init__(self, info: dict, message: str | None = None):
        where = f" on {info['host']}" if info.get("host") else ""
        super().__init__(message or f"a worker could not start{where}: {info['type']}: {info['message']}", info)


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


def _shard_succeeded(store: OutputStore, report: JobReport, bar, summary: dict, where: dict) -> None:
    report.done += 1
    report.images += summary["images"]
    report.errors += summary["errors"]
    report.error_types.update(summary.get("error_types", {}))
    report.edits += summary["edits"]
    report.unet_calls += summary["unet_calls"]
    stats = {k: summary[k] for k in ("shard", "images", "errors", "edits", "kept", "unet_calls", "seconds")}
    stats.update(samples=summary["images"] + summary["errors"], error_types=summary.get("error_types", {}),
                 **{k: where.get(k) for k in ("host", "node_id", "actor_id")})
    _driver_write(f"{STATS}/{summary['name']}.json",
                  lambda: store.write_json(f"{STATS}/{summary['name']}.json", stats))
    bar.shard_done(summary)


def _driver_write(what: str, write):
    """One of the driver's own writes (a shard's _stats/ file, the index,
    job.error.json): an I/O error (a transient object-store error) is
    retried with a growing wait, then logged, and the job goes on: what the
    write describes (committed shards) is already safe in their markers.
    Returns the write's result, None when every try failed."""
    wait = DRIVER_WRITE_WAIT_S
    for attempt in range(1, DRIVER_WRITE_TRIES + 1):
        try:
            return write()
        except OSError as exc:  # OutputWriteError and the file system's own errors
            if attempt == DRIVER_WRITE_TRIES:
                print(f"[imprint] could not write {what} after {attempt} tries ({one_line(exc)}); "
                      "the job goes on without it", file=sys.stderr, flush=True)
                return None
            time.sleep(wait)
            wait *= 2


def _check_lease(store: OutputStore) -> None:
    """Before the driver hands out a shard or accounts for a finished one:
    OutputTakenOver when the output's lease is another run's (this driver
    was stopped past the TTL and resumed). A lease that cannot be read
    proves nothing: the workers check again before each part they write."""
    lost = store.lease.lost if store.lease is not None else ""
    try:
        store.check_fence()
    except LeaseLost as exc:
        lost = str(exc)
    except OSError:
        pass
    if lost:
        raise OutputTakenOver(f"{lost}; this driver stopped without writing more (the other run goes on)")


def _limits(spec: JobSpec, demand: str = "a worker") -> sch.Limits:
    r = spec.run
    return sch.Limits(max_attempts=r.max_attempts, shard_timeout_s=r.shard_timeout_s,
                      placement_timeout_s=r.placement_timeout_s, start_timeout_s=r.start_timeout_s, demand=demand)


class _Ledger:
    """Carries out the scheduler's bookkeeping actions, the same inline and on
    Ray: attempts, success stats, failure records, progress, notices, stops.
    `summaries` holds each finished shard's summary until its Succeed;
    `where` each worker's placement (host, node, actor) for the records."""

    def __init__(self, spec: JobSpec, store: OutputStore, report: JobReport, bar):  # bar: executor.Progress
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
            _check_lease(self.store)
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


@dataclass(frozen=True)
class Ready:
    node: str | None


@dataclass(frozen=True)
class StartFailed:
    """The worker cannot start (its start raised, its runtime env cannot be
    set up, it can never be scheduled)."""
    failure: dict
    node: str | None = None


@dataclass(frozen=True)
class ShardDone:
    shard: str
    summary: dict


@dataclass(frozen=True)
class ShardFailed:
    shard: str
    failure: dict
    deterministic: bool
    broken: bool  # the worker may be unusable (a CUDA error): it is replaced


@dataclass(frozen=True)
class Lost:
    """The worker is gone (or cannot be reached: it is killed)."""
    cause: str  # scheduler.CRASH / NODE / PREEMPTED
    failure: dict


@dataclass(frozen=True)
class LiveRead:
    live: dict


@dataclass(frozen=True)
class Nothing:
    """Nothing to tell the scheduler (a failed read of live counters says
    nothing the worker's other calls will not)."""


@dataclass(frozen=True)
class Fatal:
    """The job cannot go on from this driver: it stops (JobStopped; done
    shards are kept and the same command resumes)."""
    message: str
    failure: dict
    taken_over: bool = False  # the output's lease is another run's: nothing more is written


def record_event(shard: str, result: dict) -> ShardDone | ShardFailed | Fatal:
    """A shard's result as `run_shard` returns it (inline or from an actor)."""
    if "summary" in result:
        return ShardDone(shard, result["summary"])
    f = result["failure"]
    if f.get("type") == "LeaseLost":
        return Fatal(f["message"], f, taken_over=True)
    return ShardFailed(shard, f, deterministic=bool(f.get("deterministic", False)), broken=_is_cuda_error(f))


def scheduler_actions(sched: sch.Scheduler, wid: int, event, now: float) -> list:
    """Hand one event about worker `wid` to the scheduler; its actions."""
    if isinstance(event, Ready):
        return sched.ready(wid, event.node, now)
    if isinstance(event, StartFailed):
        return sched.start_failed(wid, event.node, event.failure, now)
    if isinstance(event, ShardDone):
        return sched.shard_done(wid, event.shard, now)
    if isinstance(event, ShardFailed):
        return sched.shard_failed(wid, event.shard, event.failure, now, deterministic=event.deterministic,
                                  broken=event.broken)
    if isinstance(event, Lost):
        return sched.worker_lost(wid, event.cause, event.failure, now)
    if isinstance(event, Fatal):
        raise (OutputTakenOver if event.taken_over else JobStopped)(event.message, event.failure)
    return []
