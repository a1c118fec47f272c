"""Running a job: check everything that can be checked before any work,
skip shards already done under the same spec, then hand shards to workers,
inline or as Ray actors. Ray is a thin executor around `ShardWorker`; the
shard is the unit of scheduling, output, retry and resume.

On Ray the driver keeps as many worker actors requested as the cluster has,
or its autoscaler can add, GPU slots for (`_worker_cap`): actors that cannot
be placed yet stay pending, which is the demand that makes the autoscaler add
GPU nodes, and each actor gets shards as soon as it is up. Retries are charged
only where one can help: a worker that cannot start stops the job at once, a
lost worker charges only the shard it was running."""

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

from .data import shard_name
from .preflight import JobError, holds_results, preflight  # noqa: F401 (JobError: its public home)
from .spec import JobSpec, SpecError, to_toml
from .store import STATS, OutputError, OutputStore

# A started worker holds the shard it runs plus this many more, so it never
# waits for the driver between shards (unless workers still starting need them).
QUEUED_PER_WORKER = 1
# Without the autoscaler's limits (an autoscaler that does not publish its
# cluster config), request this many GPU workers at most: the ones that cannot
# be placed are the demand that makes it add nodes. run.max_workers overrides.
UNKNOWN_REACH_WORKERS = 16
TRACEBACK_LINES = 8
JOB_ERROR_FILE = "job.error.json"  # why the last run stopped, for `imprint status`


class WorkerStartError(RuntimeError):
    """A worker could not start (model load, device, parameters): retrying on
    another worker would fail the same way, so the job stops."""

    def __init__(self, info: dict):
        self.info = info
        where = f" on {info['host']}" if info.get("host") else ""
        super().__init__(f"a worker could not start{where}: {info['type']}: {info['message']}")


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
    """Type, message and the last lines of the traceback of an exception."""
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return {"type": type(exc).__name__, "message": str(exc), "traceback": lines[-TRACEBACK_LINES:]}


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
    old = store.current_hash()
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
    except OSError as exc:
        raise JobError(f"output.path {spec.output.path!r}: {exc}") from None
    return store, shards, [s for s in shards if shard_name(s) not in done]


def run_job(spec: JobSpec, *, executor: str | None = None, force: bool = False, progress: bool = True,
            worker_cls: type | None = None) -> JobReport:
    """Run every pending shard of `spec`. `worker_cls` (default ShardWorker)
    is the class each worker instantiates, inline or inside a Ray actor.
    Raises WorkerStartError when a worker cannot start and JobInterrupted on
    Ctrl-C / SIGTERM (after stopping the workers and any cluster it started)."""
    store, shards, pending = plan(spec, force)
    report = JobReport(output=spec.output.path, total=len(shards), skipped=len(shards) - len(pending))
    mode = executor or spec.run.executor
    if mode not in ("inline", "ray"):
        raise SpecError(f"run.executor: must be ray or inline, got {mode!r}")
    bar = Progress(len(shards), report.skipped, progress)
    t0 = time.perf_counter()
    try:
        with _StopSignals(raise_at_once=mode == "inline") as stop:
            if pending and mode == "inline":
                _run_inline(spec, store, pending, report, bar, worker_cls)
            elif pending:
                _run_ray(spec, store, pending, report, bar, worker_cls, stop)
    except WorkerStartError as exc:
        store.write_json(JOB_ERROR_FILE, {"error": str(exc), **exc.info, "time": time.time()})
        raise
    except (_Stopped, KeyboardInterrupt) as exc:
        report.seconds = time.perf_counter() - t0
        raise JobInterrupted(getattr(exc, "signum", signal.SIGINT), report) from None
    finally:
        bar.close()
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


def _shard_charged(spec: JobSpec, store: OutputStore, report: JobReport, bar: Progress, queue: deque,
                   url: str, failure: dict, where: dict) -> None:
    """One attempt of `url` failed: retry it at the back of the queue, or
    record it as failed once its attempts are spent."""
    attempts = report.attempts
    attempts[url] += 1
    if attempts[url] < spec.run.max_attempts:
        queue.append(url)
        bar.shard_stopped(url)
        return
    record = {"shard": url, "attempts": attempts[url], "error": " ".join(f"{failure['type']}: {failure['message']}".split()),
              **failure, **{k: where.get(k) for k in ("host", "node_id", "actor_id")}, "time": time.time()}
    report.failed[url] = record["error"]
    report.failures[url] = record
    if not store.mark_failed(shard_name(url), record):
        # Not even a failure record can be written: the output itself is
        # unusable (disk full, permission lost), so stop with one message.
        raise JobError(f"output.path {store.root!r} is no longer writable; shard {url} failed: {record['error']}")
    bar.shard_failed(url)


# -- inline --------------------------------------------------------------------


def _run_inline(spec, store, pending, report, bar, worker_cls) -> None:
    from .worker import ShardWorker

    try:
        worker = (worker_cls or ShardWorker)(spec)
    except Exception as exc:
        raise WorkerStartError(failure_info(exc)) from exc
    stop = threading.Event()

    def show_live():  # the shard runs in this thread; its counters are read from another
        while not stop.wait(0.5):
            bar.set_live(worker.live)
            bar.refresh()

    watcher = threading.Thread(target=show_live, daemon=True)
    watcher.start()
    queue = deque(pending)
    try:
        while queue:
            url = queue.popleft()
            result = run_shard(worker, url)
            if "summary" in result:
                _shard_succeeded(store, report, bar, result["summary"], worker.placement)
            else:
                _shard_charged(spec, store, report, bar, queue, url, result["failure"], worker.placement)
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
        except BaseException as exc:  # reported by ready(); the driver stops the job
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
    """The driver's view of one actor."""

    handle: object
    ready_ref: object  # ready(), until it has answered
    created: float
    where: dict = field(default_factory=dict)
    running: list = field(default_factory=list)  # [(ref, url)], in submission order: [0] runs first
    shard_started: float = 0.0  # when the shard now running began (its deadline counts from here)
    live_ref: object = None
    live_asked: float = 0.0
    live: dict = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.ready_ref is None

    def current_shard(self) -> str | None:
        """The shard the actor is running: the first unfinished one it was
        given (an actor runs its process() calls one at a time, in order).
        Its live counters are not used here: they lag, and still name the
        previous shard when a shard kills the worker before it starts."""
        return self.running[0][1] if self.running else None


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


def _is_placed(handle) -> bool:
    """Whether a node has taken this actor (a worker process leased for it,
    maybe still in __init__), from the GCS actor table (a private Ray API:
    when it fails the actor counts as placed, so it is not killed)."""
    try:
        from ray._private import state

        return bool(state.actors(actor_id=handle._actor_id.hex())["Address"]["Port"])
    except Exception:
        return True


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
    workers: list[_Worker] = []
    try:
        _drive(ray, spec, store, pending, report, bar, worker_cls, started, workers, stop)
    finally:
        for w in workers:
            ray.kill(w.handle, no_restart=True)
        if started:
            ray.shutdown()  # stops the local cluster's processes too


def _drive(ray, spec, store, pending, report, bar, worker_cls, started_local, workers, stop) -> None:
    from ray.exceptions import GetTimeoutError, RayActorError

    gpus, expect_cuda, reach, autoscaler = _placement(spec, ray, started_local)
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=spec.run.cpus_per_worker, max_restarts=0, max_task_retries=0,
                           concurrency_groups={"monitor": 1})(_ShardActor)
    queue = deque(pending)
    lost_before_start = 0
    cap, cap_checked, waiting_said = 1, 0.0, 0.0

    def drop(w: _Worker, charge: dict | None) -> None:
        """Kill `w` (it may be alive but unreachable, still holding a GPU) and
        give its shards back: the one it was running is charged `charge`
        (when given), the ones queued behind it go back to the front uncharged."""
        settle(w)
        ray.kill(w.handle, no_restart=True)
        workers.remove(w)
        current = w.current_shard()
        for _, url in reversed(w.running):
            if url == current and charge is not None:
                continue
            queue.appendleft(url)
            bar.shard_stopped(url)
        if current is not None and charge is not None:
            _shard_charged(spec, store, report, bar, queue, current, charge, w.where)

    def settle(w: _Worker) -> None:
        """Record the shards `w` finished before it was lost or stopped: their
        results outlive the actor, and they must be neither charged nor redone
        (a death and an earlier success can arrive in the same round)."""
        refs = [r for r, _ in w.running]
        finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        for ref in finished:
            try:
                result = ray.get(ref, timeout=10)
            except (RayActorError, GetTimeoutError):
                continue  # the shard it was running when it died
            record(w, ref, next(u for r, u in w.running if r == ref), result)

    def record(w: _Worker, ref, url: str, result: dict) -> dict | None:
        """A finished process() call of `w`: the shard leaves its list and is
        recorded as done, or charged. Returns the failure, if any."""
        w.running = [(r, u) for r, u in w.running if r != ref]
        w.shard_started = time.monotonic()
        if "summary" in result:
            _shard_succeeded(store, report, bar, result["summary"], w.where)
            return None
        _shard_charged(spec, store, report, bar, queue, url, result["failure"], w.where)
        return result["failure"]

    def feed(w: _Worker) -> None:
        # A shard queued behind a running one is only worth it when no worker
        # still coming up (a node the autoscaler is adding) would want it.
        starting = sum(1 for x in workers if not x.up)
        while queue and (not w.running or (len(w.running) < 1 + QUEUED_PER_WORKER and len(queue) > starting)):
            url = queue.popleft()
            if not w.running:
                w.shard_started = time.monotonic()
            w.running.append((w.handle.process.remote(url), url))

    while queue or any(w.running for w in workers):
        stop.check()
        now = time.monotonic()
        if now - cap_checked > 2.0:
            cap = _worker_cap(spec, gpus, ray.cluster_resources().get("GPU", 0), reach, autoscaler)
            cap_checked = now
        # Scale: keep min(cap, shards not finished) workers. Surplus ones go:
        # idle started ones, and those no node has taken yet (their demand
        # would add nodes for nothing); never one that a node is starting.
        left = len(queue) + sum(len(w.running) for w in workers)
        want = min(cap, left)
        while len(workers) < want:
            h = actor_cls.remote(spec, worker_cls, expect_cuda)
            workers.append(_Worker(handle=h, ready_ref=h.ready.remote(), created=now))
        surplus = len(workers) - want
        if surplus > 0:
            idle = [w for w in workers if w.up and not w.running]
            unplaced = [w for w in workers if not w.up and not _is_placed(w.handle)] if surplus > len(idle) else []
            for w in (idle + unplaced)[:surplus]:
                ray.kill(w.handle, no_restart=True)
                workers.remove(w)
        if not any(w.up for w in workers) and now - waiting_said > 60 and now - workers[0].created > 30:
            waiting_said = now
            need = f"{gpus:g} GPU and " if gpus else ""
            print(f"[imprint] waiting for the cluster to place a worker ({need}{spec.run.cpus_per_worker:g} CPU "
                  f"each; {len(workers)} requested)", file=sys.stderr, flush=True)

        refs = {}
        for w in workers:
            if w.ready_ref is not None:
                refs[w.ready_ref] = (w, "ready")
            for ref, url in w.running:
                refs[ref] = (w, url)
            if w.live_ref is not None:
                refs[w.live_ref] = (w, "live")
        done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
        if done:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in done:
            w, what = refs[ref]
            if w not in workers:
                continue  # dropped while handling an earlier ref of this round
            try:
                result = ray.get(ref, timeout=10)
            except (RayActorError, GetTimeoutError) as exc:
                # The actor is gone or unreachable (process crash, OOM kill,
                # node lost). Not a start-up failure: those are reported by
                # ready(). Only the shard it was running is charged.
                if what == "ready":
                    lost_before_start += 1
                    if lost_before_start > 3 * spec.run.max_attempts:
                        raise JobError(f"{lost_before_start} workers died before they started; the last: "
                                       f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
                    drop(w, None)
                    continue
                info = {"type": type(exc).__name__,
                        "message": f"worker lost while running the shard: {str(exc).splitlines()[0] if str(exc) else ''}",
                        "traceback": str(exc).splitlines()[-TRACEBACK_LINES:]}
                drop(w, info)
                continue
            if what == "ready":
                w.ready_ref = None
                if result["error"]:
                    raise WorkerStartError({**result["error"], **{k: result.get(k) for k in ("host", "node_id")}})
                w.where = result
                feed(w)
            elif what == "live":
                w.live_ref, w.live = None, result or {}
                bar.set_live(w.live)
            else:
                failure = record(w, ref, what, result)
                if failure is not None and _is_cuda_error(failure):
                    drop(w, None)  # the device may be broken for this process: a fresh worker
                else:
                    feed(w)

        now = time.monotonic()
        for w in list(workers):
            if w.running and now - w.shard_started > spec.run.shard_timeout_s:
                drop(w, {"type": "TimeoutError", "traceback": [],
                         "message": f"the shard took longer than run.shard_timeout_s = {spec.run.shard_timeout_s:g} s; "
                                    f"its worker was stopped"})
            elif w.running and w.live_ref is None and now - w.live_asked > 1.0:
                w.live_asked = now
                w.live_ref = w.handle.live.options(concurrency_group="monitor").remote()
        bar.refresh()


def _forwarded_env() -> dict:
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "IMPRINT_CACHE",
            "OMP_NUM_THREADS")
    # Inside a submitted Ray job, the job's runtime_env already gives its
    # env_vars to every worker, and Ray refuses a ray.init runtime_env that
    # sets one of them again.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: os.environ[k] for k in keys if k in os.environ and k not in taken}
