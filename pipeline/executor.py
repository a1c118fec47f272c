"""Running a job: check everything that can be checked before any work,
skip shards already done under the same spec, then hand shards to workers,
inline or as Ray actors (one per GPU, or CPU actors without GPUs). Ray is a
thin executor around `ShardWorker`; the shard is the unit of scheduling,
output, retry and resume."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .data import expand_shards, missing_shards, shard_name
from .preflight import preflight
from .spec import JobSpec, SpecError, to_toml
from .store import OutputError, OutputStore


class JobError(RuntimeError):
    """A job that cannot start; the message says why."""


@dataclass
class JobReport:
    output: str
    total: int
    skipped: int = 0
    done: int = 0
    failed: dict = field(default_factory=dict)  # shard -> reason
    images: int = 0
    errors: int = 0
    edits: int = 0
    unet_calls: int = 0
    seconds: float = 0.0


class Progress:
    """One status line on stderr: shards done/failed/total, images and edits
    per second, ETA."""

    def __init__(self, total: int, skipped: int, enabled: bool):
        self.total, self.skipped, self.enabled = total, skipped, enabled
        self.t0 = time.perf_counter()
        self.done = self.failed = self.images = self.edits = 0
        self._last = 0.0
        # A terminal gets one line redrawn in place; a log gets a full line
        # now and then and whenever a shard finishes.
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 15.0

    def update(self, summary: dict | None = None, failed: bool = False, force: bool = False) -> None:
        if summary:
            self.done += 1
            self.images += summary["images"]
            self.edits += summary["edits"]
        if failed:
            self.failed += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and not (summary or failed) and now - self._last < self.every:
            return
        if not force and self.tty and now - self._last < self.every:
            return
        self._last = now
        dt = max(now - self.t0, 1e-9)
        finished = self.done + self.failed
        left = self.total - self.skipped - finished
        eta = dt / finished * left if finished else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        line = (f"[imprint] shards {self.done + self.skipped}/{self.total} done, {self.failed} failed | "
                f"{self.images / dt:.2f} img/s, {self.edits / dt:.2f} edits/s | ETA {eta_s}")
        sys.stderr.write(f"\r{line}   " if self.tty else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            if self.tty:
                sys.stderr.write("\n")


def plan(spec: JobSpec, force: bool = False) -> tuple[OutputStore, list[str], list[str]]:
    """Everything checked before any model is loaded: shards exist, output is
    writable and not another job's. Returns (store, all shards, pending)."""
    preflight(spec)
    try:
        if spec.input.codes:
            from .codes import code_shards

            shards = code_shards(spec.input.codes)
        else:
            shards = expand_shards(spec.input.shards, allow_pipe=spec.input.allow_pipe)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if not shards:
        raise JobError("input.shards: the patterns expand to no shards")
    missing = missing_shards(shards)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise JobError(f"input.shards: shard not found: {missing[0]}{more}")
    store = OutputStore.open(spec.output.path)
    h = spec.hash()
    try:
        store.prepare(to_toml(spec), h, force=force)
    except OutputError as exc:
        raise JobError(str(exc)) from None
    try:
        done = set() if force else store.done_shards(h)
    except OSError as exc:
        raise JobError(f"output.path {spec.output.path!r}: {exc}") from None
    pending = [s for s in shards if shard_name(s) not in done]
    return store, shards, pending


def run_job(spec: JobSpec, *, executor: str | None = None, force: bool = False, progress: bool = True,
            worker_cls: type | None = None) -> JobReport:
    """Run a job. `worker_cls` replaces `ShardWorker` (a subclass) in both
    executors, e.g. one that crashes mid-shard in the tests."""
    store, shards, pending = plan(spec, force)
    report = JobReport(output=spec.output.path, total=len(shards), skipped=len(shards) - len(pending))
    bar = Progress(len(shards), report.skipped, progress)
    t0 = time.perf_counter()
    mode = executor or spec.run.executor
    if pending:
        if mode == "inline":
            _run_inline(spec, store, pending, report, bar, worker_cls)
        elif mode == "ray":
            _run_ray(spec, store, pending, report, bar, worker_cls)
        else:
            raise SpecError(f"run.executor: must be ray or inline, got {mode!r}")
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _record(report: JobReport, summary: dict) -> None:
    report.done += 1
    report.images += summary["images"]
    report.errors += summary["errors"]
    report.edits += summary["edits"]
    report.unet_calls += summary["unet_calls"]


def _fail(store: OutputStore, report: JobReport, url: str, attempts: int, reason: str) -> None:
    reason = " ".join(reason.split())  # one line in _failed/, the summary and the log
    report.failed[url] = reason
    if not store.mark_failed(shard_name(url), {"shard": url, "attempts": attempts, "error": reason, "time": time.time()}):
        # Not even a failure record can be written: the output itself is
        # unusable (disk full, permission lost), so stop with one message.
        raise JobError(f"output.path {store.root!r} is no longer writable; shard {url} failed: {reason}")


def _run_inline(spec: JobSpec, store: OutputStore, pending: list[str], report: JobReport, bar: Progress,
                worker_cls: type | None = None) -> None:
    from .worker import ShardWorker

    worker = (worker_cls or ShardWorker)(spec)
    for url in pending:
        for attempt in range(1, spec.run.max_attempts + 1):
            try:
                summary = worker.process(url)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if attempt == spec.run.max_attempts:
                    _fail(store, report, url, attempt, reason)
                    bar.update(failed=True)
                continue
            _record(report, summary)
            bar.update(summary)
            break


class _ShardActor:
    """The Ray actor: a ShardWorker kept alive across shards."""

    def __init__(self, spec: JobSpec, worker_cls: type | None = None):
        from .worker import ShardWorker

        self.worker = (worker_cls or ShardWorker)(spec)

    def process(self, url: str) -> dict:
        return self.worker.process(url)

    def pid(self) -> int:
        return os.getpid()


def _run_ray(spec: JobSpec, store: OutputStore, pending: list[str], report: JobReport, bar: Progress,
             worker_cls: type | None = None) -> None:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    started = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="warning",
                      runtime_env={"env_vars": _forwarded_env()})
        if spec.run.ray_address:
            ray.init(address=spec.run.ray_address, **kwargs)
        else:
            tmp = os.environ.get("IMPRINT_RAY_TMPDIR")
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, spec.run.workers or 1),
                     _temp_dir=tmp, **kwargs)
        started = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n_workers = spec.run.workers or max(gpus, 1)
        # Fractional CPUs: an actor holding a whole CPU plus a task needing one
        # can deadlock a 2-CPU machine.
        opts = {"num_gpus": 1, "num_cpus": 0.5} if gpus else {"num_cpus": 0.5}
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **opts)(_ShardActor)
        actors = [actor_cls.remote(spec, worker_cls) for _ in range(min(n_workers, len(pending)))]
        queue, attempts = deque(pending), Counter()
        in_flight: dict = {}  # ref -> (actor, url)

        def submit(actor) -> None:
            while queue and sum(1 for a, _ in in_flight.values() if a is actor) < 2:
                url = queue.popleft()
                attempts[url] += 1
                in_flight[actor.process.remote(url)] = (actor, url)

        for a in actors:
            submit(a)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            bar.update()
            if not ready:
                continue
            ref = ready[0]
            actor, url = in_flight.pop(ref)
            try:
                summary = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                # The worker process died (OOM, node loss, crash): replace it and
                # requeue the shard; its partial files never got a marker.
                if actor in actors:
                    actors.remove(actor)
                    actors.append(actor_cls.remote(spec, worker_cls))
                _retry_or_fail(spec, store, report, bar, queue, attempts, url, f"worker died: {type(exc).__name__}")
                for a in actors:
                    submit(a)
                continue
            except RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                _retry_or_fail(spec, store, report, bar, queue, attempts, url, f"{type(cause).__name__}: {cause}")
                submit(actor)
                continue
            _record(report, summary)
            bar.update(summary)
            submit(actor)
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def _retry_or_fail(spec, store, report, bar, queue, attempts, url, reason) -> None:
    if attempts[url] >= spec.run.max_attempts:
        _fail(store, report, url, attempts[url], reason)
        bar.update(failed=True)
    else:
        queue.append(url)


def _forwarded_env() -> dict:
    keys = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "IMPRINT_CACHE", "OMP_NUM_THREADS")
    # Inside a submitted Ray job, the job's runtime_env already gives its
    # env_vars to every worker, and Ray refuses a ray.init runtime_env that
    # sets one of them again.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: os.environ[k] for k in keys if k in os.environ and k not in taken}
