"""Running a job: check everything that can be checked before any work,
skip shards already done under the same spec, then hand shards to workers,
inline or as Ray actors (ray_adapter.py). Ray is a thin executor around
`ShardWorker`; the shard is the unit of scheduling, output, retry and resume.

Every scheduling decision (which worker gets which shard, when to ask for a
worker, what charges an attempt, when the job stops) is made by the pure
state machine in `scheduler.py`; the drivers (inline here, Ray in
ray_adapter.py) only turn what they see into its events and carry out its
actions. The driver's own writes (a shard's `_stats/` file, the index,
`job.error.json`) are retried and then logged: they never stop a job whose
shards are committed. Before handing out a shard and before accounting for
one, the driver checks that the output's lease is still its own."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from . import driving
from .data import expand_shards, missing_shards, shard_name  # noqa: F401
# the job's errors and report live in driving.py (below both drivers); imported here, their public home
from .driving import (JobReport, JobStopped, OutputTakenOver, WorkerStartError, _check_lease, _Ledger,  # noqa: F401
                      _limits, failure_info, record_event, run_shard, scheduler_actions)
from .preflight import JobError, holds_results, preflight  # noqa: F401 (JobError: its public home)
from . import scheduler as sch
from .spec import JobSpec, SpecError, to_toml
from .store import OutputError, OutputStore

JOB_ERROR_FILE = "job.error.json"  # why the last run stopped, for `imprint status`


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


# -- failures ------------------------------------------------------------------


# -- progress --------------------------------------------------------------------


class Progress:
    """Images done (whole shards plus the samples done inside running ones),
    edits per second and an ETA, through tqdm: a bar redrawn in place on a
    terminal, a plain line every `every` seconds (and per finished shard) in
    a log. The ETA counts down within a shard because running shards report
    their samples. The total is exact for shards whose size is known before
    they run (`sizes`: local tars, counted from their headers) and estimated,
    for the others, from those of them finished so far; it no longer jumps
    with the first shards' sizes (24 -> 16 -> 13 on the demo)."""

    def __init__(self, total: int, skipped: int, enabled: bool, sizes: dict[str, int] | None = None):
        from tqdm import tqdm

        self.total, self.skipped, self.enabled = total, skipped, enabled
        self.sizes = dict(sizes or {})  # pending shard -> its samples, where known up front
        self.unknown_done = self.unknown_samples = 0  # finished shards of unknown size, and their samples
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
            if summary["shard"] not in self.sizes:
                self.unknown_done += 1
                self.unknown_samples += summary["images"] + summary["errors"]
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
            # images in the whole run: the known sizes, plus the unknown shards at the mean of those finished
            unknown = self.total - self.skipped - len(self.sizes)
            est = sum(self.sizes.values())
            if unknown:
                est = (est + round(self.unknown_samples / self.unknown_done * unknown)) if self.unknown_done else None
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


def _known_sizes(pending: list[str], budget_s: float = 2.0) -> dict[str, int]:
    """Samples per pending local shard, counted from tar headers for at most
    `budget_s` seconds (a run of many large shards starts without waiting:
    the rest are estimated as they finish)."""
    from .data import count_samples

    sizes, t0 = {}, time.monotonic()
    for url in pending:
        if time.monotonic() - t0 > budget_s:
            break
        n = count_samples(url)
        if n is not None:
            sizes[url] = n
    return sizes


# -- planning --------------------------------------------------------------------


@dataclass
class Plan:
    """What a run executes: the output (opened and checked by preflight,
    then claimed), the spec's hash, every shard and those still to do."""

    store: OutputStore
    spec_hash: str
    shards: list[str]
    pending: list[str]


def plan(spec: JobSpec, force: bool = False) -> Plan:
    """Everything checked before any model is loaded (`preflight`: the spec
    against the model, weights at hand, shards exist and the first opens,
    output free or this spec's), then the output path is claimed, on the
    store preflight opened and with the hash it computed. O(n) in the
    shards, with one listing of the output's done markers."""
    pre = preflight(spec, force=force)
    store, h, old = pre.store, pre.spec_hash, pre.output_hash
    # An output whose job.json names another spec but that holds no results
    # (its run stopped before committing anything) is free: take it over.
    take_over = bool(old and old != h and not holds_results(store))
    try:
        store.prepare(to_toml(spec), h, force=force or take_over)
    except OutputError as exc:
        raise JobError(str(exc)) from None
    store.delete(JOB_ERROR_FILE)  # a new run: the last one's stop reason no longer applies
    if force:
        return Plan(store, h, pre.shards, pre.shards)
    try:
        done = store.done_shards(h)
    except (OSError, OutputError) as exc:
        store.release()
        raise JobError(f"output.path {spec.output.path!r}: {exc}") from None
    return Plan(store, h, pre.shards, [s for s in pre.shards if shard_name(s) not in done])


def _finish_output(store: OutputStore, spec_hash: str) -> None:
    """End of a run (done, failed or stopped): remove the parts of shards
    without a valid marker, so the finished output holds committed rows
    only, and refresh the index (retried, then logged: see _driver_write);
    then give the output's lease up. A driver whose lease is gone leaves
    the output as it is."""
    try:
        if store.lease is not None and not store.lease.still_ours():
            print(f"[imprint] {store.lease.lost or 'the output lease is no longer ours'}: "
                  "leaving the output as it is", file=sys.stderr, flush=True)
        else:
            driving._driver_write("the output's index", lambda: store.finish(spec_hash))
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
    todo = plan(spec, force)
    store, shards, pending = todo.store, todo.shards, todo.pending
    report = JobReport(output=spec.output.path, total=len(shards), skipped=len(shards) - len(pending))
    bar = Progress(len(shards), report.skipped, progress, _known_sizes(pending) if progress else None)
    t0 = time.perf_counter()
    try:
        with _StopSignals(raise_at_once=mode == "inline") as stop:
            if pending and mode == "inline":
                _run_inline(spec, store, pending, report, bar, worker_cls)
            elif pending:
                from .ray_adapter import _run_ray

                _run_ray(spec, store, pending, report, bar, worker_cls, stop)
    except OutputTakenOver:
        raise  # the output is another run's now: nothing is written there
    except JobStopped as exc:
        why = {"error": str(exc), **exc.info, "time": time.time()}
        driving._driver_write(JOB_ERROR_FILE, lambda: store.write_json(JOB_ERROR_FILE, why))
        raise
    except (_Stopped, KeyboardInterrupt) as exc:
        report.seconds = time.perf_counter() - t0
        raise JobInterrupted(getattr(exc, "signum", signal.SIGINT), report) from None
    finally:
        bar.close()
        _finish_output(store, todo.spec_hash)
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
                    if getattr(worker, "store", None) is not None:
                        worker.store.fence = store.fence  # its commits run under this driver's lease
                except Exception as exc:
                    todo.extend(sched.start_failed(act.worker, None, failure_info(exc), now))
                    continue
                ledger.where[wid] = worker.placement
                todo.extend(sched.ready(wid, worker.placement.get("node_id"), now))
            elif isinstance(act, sch.Submit):
                _check_lease(store)
                # the same reading of a result as on Ray: a CUDA error replaces the worker, a lost lease stops
                event = record_event(act.shard, run_shard(worker, act.shard))
                if hasattr(event, "summary"):
                    ledger.summaries[act.shard] = event.summary
                todo.extend(scheduler_actions(sched, act.worker, event, time.monotonic()))
            elif isinstance(act, sch.Kill):
                worker = None if act.worker == wid else worker
    finally:
        stop.set()
        watcher.join()
