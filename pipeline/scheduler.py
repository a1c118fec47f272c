"""The job's scheduling decisions, apart from Ray: a state machine that takes
events (a worker placed on a node, ready, failed to start, lost with its
node or not; a shard done or failed; time passing) and returns actions
(request a worker, submit a shard, kill a worker, charge an attempt, record
a shard as done or failed, stop the job, finish). No I/O and no clock of its
own: time comes in with every event, so the same code runs under Ray
(`ray_adapter._drive`), inline (`executor._run_inline`) and in the seeded
simulators of tests/test_scheduler_sim.py (the state machine alone) and
tests/test_ray_driver_sim.py (the Ray driver's loop around it).

What it guarantees (checked after every step of the simulator):
- every shard ends exactly once: done, or failed with its cause;
- no shard waits while a ready worker is idle: a worker holds only the
  shard it runs (the next one is sent when it finishes), so nothing ever
  waits behind a long shard, and a lost worker's shards go at once to the
  idle ones;
- the job never waits forever: with work left and no worker placed on a
  node for `placement_timeout_s`, it stops and says what it waited for; a
  worker placed but not ready within `start_timeout_s` (a hung download) is
  stopped as a start failure;
- only a failure of the work charges an attempt (the shard raised, crashed
  its worker process, ran past `shard_timeout_s`); a worker lost with its
  node (lost, preempted, drained) does not. An error that would repeat
  (`deterministic`: a spec or data error such as a ValueError) fails the
  shard at once;
- a worker that cannot start stops the job only while no worker has ever
  started, or when the same error has happened on `start_error_nodes`
  distinct nodes (or `max_start_failures` start failures in all); otherwise
  its node is avoided and the job goes on."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Worker states.
REQUESTED = "requested"  # asked of the cluster, on no node yet
STARTING = "starting"  # on a node, loading (model download, weights, CUDA)
READY = "ready"  # takes shards
GONE = "gone"

# How a worker was lost (worker_lost's `cause`).
CRASH = "crash"  # its process died (segfault, OOM kill, exit): the work's fault, charged
NODE = "node"  # its node was lost, drained or unreachable: not charged
PREEMPTED = "preempted"  # its node was preempted (spot): not charged
LOSS_CAUSES = (CRASH, NODE, PREEMPTED)


@dataclass(frozen=True)
class Limits:
    max_attempts: int = 3
    shard_timeout_s: float = 14400.0
    placement_timeout_s: float = 1800.0
    start_timeout_s: float = 1800.0
    start_error_nodes: int = 3  # the same start error on this many distinct nodes stops the job
    max_start_failures: int = 9  # start failures of any kind after which the job stops
    max_losses: int = 10  # node losses one shard may live through before it fails (a shard that kills nodes)
    first_notice_s: float = 30.0  # "waiting for the cluster" after this long with nothing placed...
    notice_every_s: float = 60.0  # ... and again this often
    demand: str = "a worker"  # what one worker asks the cluster for, for messages


# -- actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Ask the cluster for a new worker, on none of the `avoid` nodes."""
    worker: int
    avoid: tuple = ()


@dataclass(frozen=True)
class Submit:
    worker: int
    shard: str


@dataclass(frozen=True)
class Kill:
    """Stop the worker (it may be alive but unreachable, holding a GPU). Its
    shards are already back in the queue or charged."""
    worker: int


@dataclass(frozen=True)
class Charge:
    """One failed attempt of the shard's work; `attempts` in all so far."""
    shard: str
    attempts: int
    failure: dict


@dataclass(frozen=True)
class Requeue:
    """The shard left its worker unfinished and waits for another."""
    shard: str


@dataclass(frozen=True)
class Succeed:
    shard: str
    worker: int


@dataclass(frozen=True)
class Fail:
    """The shard failed for good; `failure` says why."""
    shard: str
    worker: int | None
    attempts: int
    failure: dict


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class Stop:
    """The job stops; `start_error` is the failure of a worker that could not
    start, when that is why."""
    message: str
    start_error: dict | None = None


@dataclass(frozen=True)
class Finish:
    """Every shard has ended."""


# -- state -------------------------------------------------------------------------


@dataclass
class WorkerState:
    id: int
    state: str
    since: float  # when it entered its state
    node: str | None = None
    shards: list = field(default_factory=list)  # [0] runs; a worker holds at most one (see module doc)
    shard_started: float = 0.0


@dataclass
class ShardState:
    state: str = "queued"  # queued | assigned | done | failed
    worker: int | None = None
    attempts: int = 0  # failed attempts of the work itself
    losses: int = 0  # times its worker was lost with its node while it ran
    failure: dict | None = None


def _failure(kind: str, message: str) -> dict:
    return {"type": kind, "message": message, "traceback": []}


class Scheduler:
    """One job's scheduling. Call an event method, get the actions to carry
    out, in order. After `Stop` or `Finish` every event returns []."""

    def __init__(self, shards: list[str], limits: Limits, cap: int, now: float):
        if len(set(shards)) != len(shards):
            raise ValueError("shards must be distinct")
        self.limits = limits
        self.cap = max(1, cap)
        self.shards = {s: ShardState() for s in shards}
        self.queue = deque(shards)
        self.workers: dict[int, WorkerState] = {}
        self.next_id = 0
        self.ever_ready = False
        self.avoid: set[str] = set()
        self.start_errors: dict[tuple, set] = {}  # (type, message) -> nodes it happened on
        self.start_failures = 0
        self.unplaced_since: float | None = now  # work left and no worker on a node, since
        self.last_notice = -float("inf")
        self.ended = False  # Stop or Finish was returned
        self.stop_reason: str | None = None

    # -- queries --

    def live(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.state != GONE]

    def unfinished(self) -> int:
        return sum(1 for s in self.shards.values() if s.state in ("queued", "assigned"))

    # -- events --

    def start(self, now: float) -> list:
        return self._settle(now, [])

    def set_cap(self, cap: int, now: float) -> list:
        """How many workers the cluster has or can add room for (run.max_workers)."""
        self.cap = max(1, cap)
        return self._settle(now, [])

    def placed(self, worker: int, node: str | None, now: float) -> list:
        w = self._worker(worker)
        if w is None or w.state != REQUESTED:
            return []
        w.state, w.since, w.node = STARTING, now, node
        return self._settle(now, [])

    def ready(self, worker: int, node: str | None, now: float) -> list:
        w = self._worker(worker)
        if w is None or w.state not in (REQUESTED, STARTING):
            return []
        w.state, w.since, w.node = READY, now, node or w.node
        self.ever_ready = True
        return self._settle(now, [])

    def start_failed(self, worker: int, node: str | None, failure: dict, now: float) -> list:
        """The worker's start raised (model not loadable, no CUDA, bad parameters)."""
        w = self._worker(worker)
        if w is None or w.state == GONE:
            return []
        return self._settle(now, self._start_failure(w, node or w.node, failure))

    def shard_done(self, worker: int, shard: str, now: float) -> list:
        w = self._worker(worker)
        if not self._holds(w, shard):
            return []  # a late result of a shard that has left this worker
        self._leave(w, shard, now)
        self.shards[shard].state = "done"
        return self._settle(now, [Succeed(shard, worker)])

    def shard_failed(self, worker: int, shard: str, failure: dict, now: float, *, deterministic: bool = False,
                     broken: bool = False) -> list:
        """The shard's work raised. `deterministic`: it would raise again (a
        spec or data error); `broken`: the worker may be unusable (a CUDA
        error) and is replaced."""
        w = self._worker(worker)
        if not self._holds(w, shard):
            return []
        self._leave(w, shard, now)
        acts = self._charge(shard, worker, failure, deterministic)
        if broken:
            acts += self._drop(w)
        return self._settle(now, acts)

    def worker_lost(self, worker: int, cause: str, failure: dict, now: float) -> list:
        """The worker is gone: `cause` CRASH (its process died: the shard it
        ran is charged), NODE or PREEMPTED (not charged)."""
        if cause not in LOSS_CAUSES:
            raise ValueError(f"unknown cause {cause!r}")
        w = self._worker(worker)
        if w is None or w.state == GONE:
            return []
        if w.state != READY:
            if cause == CRASH:  # died while starting: counts towards the start-failure limit only
                self.start_failures += 1
                if self.start_failures >= self.limits.max_start_failures:
                    return self._stop(f"{self.start_failures} workers failed to start; the last died while "
                                      f"starting: {failure['type']}: {failure['message']}", failure)
            return self._settle(now, self._drop(w))
        current = w.shards[0] if w.shards else None
        acts = self._drop(w, keep=current)
        if current is not None:
            self._leave(w, current, now)
            if cause == CRASH:
                acts += self._charge(current, worker, failure, False)
            else:
                st = self.shards[current]
                st.losses += 1
                if st.losses >= self.limits.max_losses:
                    acts += self._fail(current, worker, _failure(
                        "WorkerLost", f"the shard lost its worker with its node {st.losses} times (lost, preempted "
                                      f"or drained nodes); the last: {failure['message']}"))
                else:
                    acts += self._requeue(current, front=True)
        return self._settle(now, acts)

    def tick(self, now: float) -> list:
        """Time passed: deadlines of shards, of starts and of placement."""
        if self.ended:
            return []
        lim = self.limits
        acts: list = []
        for w in list(self.live()):
            if w.state == READY and w.shards and now - w.shard_started > lim.shard_timeout_s:
                shard = w.shards[0]
                acts += self._drop(w, keep=shard)
                self._leave(w, shard, now)
                acts += self._charge(shard, w.id, _failure(
                    "TimeoutError", f"the shard took longer than run.shard_timeout_s = {lim.shard_timeout_s:g} s; "
                                    f"its worker was stopped"), False)
            elif w.state == STARTING and now - w.since > lim.start_timeout_s:
                acts += self._start_failure(w, w.node, _failure(
                    "StartTimeout", f"the worker was placed but not ready within run.start_timeout_s = "
                                    f"{lim.start_timeout_s:g} s (a hung model download or load?)"))
                if self.ended:
                    return acts
        if self.unfinished() and self.unplaced_since is not None:
            waited = now - self.unplaced_since
            if waited > lim.placement_timeout_s:
                n = sum(1 for w in self.live() if w.state == REQUESTED)
                avoided = f"; nodes avoided after start failures: {len(self.avoid)}" if self.avoid else ""
                return acts + self._stop(
                    f"no worker was placed for run.placement_timeout_s = {lim.placement_timeout_s:g} s: waited for "
                    f"the cluster to place {lim.demand} ({n} requested, {self.unfinished()} shards left{avoided}); "
                    f"add nodes, lower run.gpus_per_worker / run.cpus_per_worker, or raise run.placement_timeout_s")
            if waited > lim.first_notice_s and now - self.last_notice > lim.notice_every_s:
                self.last_notice = now
                n = sum(1 for w in self.live() if w.state == REQUESTED)
                acts.append(Notice(f"waiting for the cluster to place a worker ({lim.demand}; {n} requested; "
                                   f"stops after run.placement_timeout_s = {lim.placement_timeout_s:g} s)"))
        return self._settle(now, acts)

    # -- internals --

    def _worker(self, worker: int) -> WorkerState | None:
        return None if self.ended else self.workers.get(worker)

    def _holds(self, w: WorkerState | None, shard: str) -> bool:
        return w is not None and w.state == READY and shard in w.shards

    def _leave(self, w: WorkerState, shard: str, now: float) -> None:
        if shard in w.shards:
            if w.shards[0] == shard:
                w.shard_started = now  # the next one, if any, starts now
            w.shards.remove(shard)

    def _requeue(self, shard: str, front: bool) -> list:
        st = self.shards[shard]
        st.state, st.worker = "queued", None
        (self.queue.appendleft if front else self.queue.append)(shard)
        return [Requeue(shard)]

    def _fail(self, shard: str, worker: int | None, failure: dict) -> list:
        st = self.shards[shard]
        st.state, st.worker, st.failure = "failed", None, failure
        return [Fail(shard, worker, st.attempts, failure)]

    def _charge(self, shard: str, worker: int, failure: dict, deterministic: bool) -> list:
        st = self.shards[shard]
        st.attempts += 1
        acts: list = [Charge(shard, st.attempts, failure)]
        if deterministic or st.attempts >= self.limits.max_attempts:
            return acts + self._fail(shard, worker, failure)
        return acts + self._requeue(shard, front=False)

    def _drop(self, w: WorkerState, keep: str | None = None) -> list:
        """`w` goes; the shards it holds go back to the front of the queue
        uncharged (except `keep`, which the caller settles)."""
        acts: list = []
        for shard in reversed(w.shards):
            if shard != keep:
                w.shards.remove(shard)
                acts += self._requeue(shard, front=True)
        w.state = GONE
        return acts + [Kill(w.id)]

    def _start_failure(self, w: WorkerState, node: str | None, failure: dict) -> list:
        acts = self._drop(w)
        self.start_failures += 1
        key = (failure.get("type"), failure.get("message"))
        nodes = self.start_errors.setdefault(key, set())
        nodes.add(node if node is not None else f"worker {w.id}")
        error = f"{failure.get('type')}: {failure.get('message')}"
        host = failure.get("host") or node
        where = f" on {host}" if host else ""
        if not self.ever_ready:
            return acts + self._stop(f"a worker could not start{where}: {error}", failure)
        if len(nodes) >= self.limits.start_error_nodes:
            return acts + self._stop(f"workers could not start on {len(nodes)} nodes with the same error: {error}",
                                     failure)
        if self.start_failures >= self.limits.max_start_failures:
            return acts + self._stop(f"{self.start_failures} workers could not start; the last: {error}", failure)
        if node is not None:
            self.avoid.add(node)
        return acts + [Notice(f"a worker could not start{where} ({error}); the job goes on without that node")]

    def _stop(self, message: str, start_error: dict | None = None) -> list:
        self.ended = True
        self.stop_reason = message
        return [Stop(message, start_error)]

    def _settle(self, now: float, acts: list) -> list:
        """After every event: hand queued shards to idle ready workers, keep
        min(cap, shards left) workers, note whether any is placed, and
        finish when every shard has ended."""
        if self.ended:
            return acts
        for w in self.live():
            if w.state == READY and not w.shards and self.queue:
                shard = self.queue.popleft()
                st = self.shards[shard]
                st.state, st.worker = "assigned", w.id
                w.shards.append(shard)
                w.shard_started = now
                acts.append(Submit(w.id, shard))
        left = self.unfinished()
        if left == 0:
            for w in self.live():
                acts += self._drop(w)
            self.ended = True
            return acts + [Finish()]
        want = min(self.cap, left)
        live = self.live()
        while len(live) < want:
            w = WorkerState(self.next_id, REQUESTED, now)
            self.next_id += 1
            self.workers[w.id] = w
            live.append(w)
            acts.append(Request(w.id, tuple(sorted(self.avoid))))
        # Surplus workers go: beyond the cap and beyond the shards left (the
        # tail of the job), only those no node has taken yet (their demand
        # would make an autoscaler add nodes for nothing). Idle ready ones
        # stay until the job ends, to take over the shard of a worker that is
        # lost: a lower cap often means just that (a lost node leaves the
        # cluster's GPU count before its workers' errors reach the driver).
        # Never one a node is starting, nor a busy one.
        for w in [w for w in live if w.state == REQUESTED][:max(0, len(live) - want)]:
            acts += self._drop(w)
        placed = any(w.state in (STARTING, READY) for w in self.live())
        if placed:
            self.unplaced_since = None
        elif self.unplaced_since is None:
            self.unplaced_since = now
        return acts
