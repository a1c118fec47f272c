"""The real Ray driver loop (ray_adapter._drive, with its scheduler, ledger
and lease checks) against a seeded fake Ray: actors that are placed late or
never, fail to start, hang, crash, run out of memory, raise every kind of
exception of ray.exceptions, nodes that are lost (the cluster's GPU count
drops at once, the actors' errors arrive later), GPU counts that change at
any moment, results that are lost, failed _stats/ writes, and an output
lease taken over by another run. Time is simulated (the loop's clock and
ray.wait advance it), so a run of minutes takes milliseconds.

Checked for every seed: the loop ends (returns, or raises JobStopped: the
only exception meant to leave it); every shard is committed exactly once
and counted done, or recorded failed (after max_attempts, or at once for a
deterministic error, or after max_losses node losses), never both; a
stopped job committed no shard twice; nothing is handed out after the
lease was lost; an idle ready worker is never killed while work is left.
A failure names its seed; replay one with
    IMPRINT_SIM_SEED=<seed> pytest tests/test_ray_driver_sim.py -k replay -s
`make test` runs IMPRINT_DRIVER_SIM_FAST seeds (200), `make test-slow`
IMPRINT_DRIVER_SIM_RUNS (10,000). The old driver's defects are run as
variants below, and the simulator must find a violating seed for each."""

from __future__ import annotations

import heapq
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
import ray.exceptions as rex

import pipeline.driving as driving
import pipeline.executor as executor
from pipeline import ray_adapter as ra
from pipeline import scheduler as sch
from pipeline.executor import JobReport, JobStopped, OutputTakenOver, Progress
from pipeline.spec import load_spec
from pipeline.store import LeaseLost, OutputWriteError

FAST = int(os.environ.get("IMPRINT_DRIVER_SIM_FAST", "200"))
RUNS = int(os.environ.get("IMPRINT_DRIVER_SIM_RUNS", "10000"))
HORIZON_S = 50_000.0  # simulated seconds; every run ends far sooner (its deadlines are minutes)


class Violation(AssertionError):
    pass


# -- the fake Ray -----------------------------------------------------------------


def died(message: str = "The actor died unexpectedly before finishing this task.") -> BaseException:
    exc = rex.ActorDiedError()
    exc.args = (message,)
    return exc


# What a process() call may raise instead of returning, with whether the
# actor's process is gone afterwards and its GCS death cause.
PROCESS_ERRORS = [
    (lambda: rex.OutOfMemoryError("Task was killed due to the node running low on memory."), True, None),
    (lambda: rex.WorkerCrashedError(), True, None),
    (lambda: died(), True, sch.CRASH),
    (lambda: rex.NodeDiedError("node died"), True, sch.NODE),
    (lambda: rex.ObjectLostError("ab" * 14, "", "call site"), False, None),
    (lambda: rex.OwnerDiedError("ab" * 14, "", "call site"), False, None),
    (lambda: rex.ObjectStoreFullError("object store full"), False, None),
    (lambda: rex.RaySystemError("system error"), False, None),
    (lambda: rex.RpcError("rpc failed"), False, None),
    (lambda: rex.GetTimeoutError("get timed out"), False, None),
    (lambda: rex.TaskCancelledError(), False, None),
    (lambda: rex.ActorUnavailableError("unreachable", b"\0" * 16), True, None),
    (lambda: rex.RayTaskError("process", "Traceback: SystemExit", SystemExit(3)), False, None),
]
START_ERRORS = [
    (lambda: rex.RuntimeEnvSetupError("pip install failed"), True),
    (lambda: rex.ActorUnschedulableError("no node matches the label selector"), True),
    (lambda: rex.OutOfMemoryError("killed while loading the model"), True),
    (lambda: died("The actor died because its node has died."), True),
]


@dataclass(eq=False)  # hashed by identity, as the driver keys its maps by refs
class Ref:
    sim: "FakeRay"
    t: float = math.inf  # when it resolves
    value: object = None
    exc: BaseException | None = None
    on_resolve: object = None  # an effect at resolution time (a commit)
    resolved: bool = False


@dataclass
class Node:
    id: str
    gpus: int
    alive: bool = True
    bad: bool = False  # workers cannot start here
    actors: set = field(default_factory=set)


@dataclass
class Actor:
    id: int
    avoid: tuple
    fence: str | None
    node: str | None = None
    state: str = "pending"  # pending | starting | ready | dead
    ready_ref: Ref | None = None
    running: list = field(default_factory=list)  # unresolved process refs
    death_cause: str | None = None
    dropped: bool = False  # its last call told the driver to drop it (an error, a CUDA failure)
    unschedulable: bool = False  # no node will ever match it


class Handle:
    def __init__(self, sim: "FakeRay", actor: Actor):
        self.sim, self.actor = sim, actor
        self.ready = _Method(lambda: actor.ready_ref)
        self.process = _Method(lambda url: sim.process(actor, url))
        self.live = _Method(lambda: sim.live(actor))


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)

    def options(self, **kw):
        return self


class ActorClass:
    def __init__(self, sim: "FakeRay", avoid: tuple = ()):
        self.sim, self.avoid = sim, avoid

    def options(self, label_selector=None, **kw):
        avoid = ()
        if label_selector:
            avoid = tuple(label_selector["ray.io/node-id"][len("!in("):-1].split(","))
        return ActorClass(self.sim, avoid)

    def remote(self, spec, worker_cls, expect_cuda, fence=None):
        return self.sim.request(self.avoid, fence)


class FakeRay:
    """Ray's API as the driver loop uses it (remote, wait, get, kill,
    cluster_resources), the GCS (placed_on, death_cause) and the clock
    (monotonic, sleep), over one seeded discrete-event simulation."""

    def __init__(self, seed: int, shards: list[str], log=None):
        self.seed, self.log = seed, log or (lambda *a: None)
        r = self.r = random.Random(seed)
        self.t = 0.0
        self.seq = 0
        self.events: list = []  # (t, seq, fn)
        self.nodes: dict[str, Node] = {}
        self.actors: dict[int, Actor] = {}
        self.pending: list[int] = []
        self.shards = shards
        self.always_bad = {s for s in shards if r.random() < 0.08}
        self.p = {"fail": r.choice([0, 0.05, 0.2]), "cuda": r.choice([0, 0.05]), "raise": r.choice([0, 0.05, 0.15]),
                  "hang": r.choice([0, 0.02, 0.05]), "start_raise": r.choice([0, 0.05, 0.2]),
                  "start_hang": r.choice([0, 0.03]), "stats_fail": r.choice([0, 0.1, 0.5]),
                  "fatal": r.choice([0, 0, 0, 0.01]), "live_raise": r.choice([0, 0.2])}
        for _ in range(r.randint(0, 3)):
            self.add_node()
        for _ in range(r.randint(0, 4)):  # nodes lost at any moment (GPU count first, errors later)
            self.at(r.uniform(0, 300), self.lose_node)
        for _ in range(r.randint(0, 3)):  # nodes added (an autoscaler, a person)
            self.at(r.uniform(0, 400), self.add_node)
        for _ in range(r.choice([0, 0, 2, 5])):  # the GPU count read wrong for a moment
            self.at(r.uniform(0, 300), self.flicker)
        self.gpu_override: int | None = None
        self.lease_lost_at = r.uniform(0, 200) if r.random() < 0.1 else math.inf
        # checker state
        self.commits: Counter = Counter()
        self.submits: list[tuple[float, str]] = []
        self.idle_kills: list[tuple[float, int]] = []
        self.stats_written: list[tuple[float, str]] = []

    # -- the event queue --

    def at(self, t: float, fn) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    def advance(self, to: float) -> None:
        while self.events and self.events[0][0] <= to:
            t, _, fn = heapq.heappop(self.events)
            self.t = max(self.t, t)
            fn()
        self.t = max(self.t, to)
        if self.t > HORIZON_S:
            raise Violation(f"the loop has not ended after {HORIZON_S:g} simulated seconds")

    def resolve_at(self, ref: Ref, t: float) -> None:
        ref.t = t
        self.at(t, lambda: self._resolve(ref))

    def _resolve(self, ref: Ref) -> None:
        if ref.resolved or ref.t > self.t:
            return  # re-timed (its actor died first)
        ref.resolved = True
        if ref.on_resolve is not None:
            ref.on_resolve(ref)

    # -- the cluster --

    def add_node(self) -> None:
        n = Node(f"node{len(self.nodes)}", gpus=self.r.choice([1, 1, 2]), bad=self.r.random() < 0.1)
        self.nodes[n.id] = n
        self.log(f"{self.t:8.2f} + {n.id} ({n.gpus} GPU{', bad' if n.bad else ''})")
        self.place()

    def lose_node(self) -> None:
        alive = [n for n in self.nodes.values() if n.alive]
        if not alive:
            return
        n = self.r.choice(alive)
        n.alive = False
        self.log(f"{self.t:8.2f} - {n.id} lost with actors {sorted(n.actors)}")
        for aid in list(n.actors):
            # The GPU count drops now; the actors' errors reach the driver later.
            self.kill_actor(self.actors[aid], sch.NODE, delay=self.r.choice([0.0, 1.0, 5.0, 20.0]),
                            exc=lambda: died("The actor died because its node has died."))

    def flicker(self) -> None:
        self.gpu_override = self.r.randint(0, 1)
        self.at(self.t + self.r.uniform(0.5, 5), lambda: setattr(self, "gpu_override", None))

    def cluster_resources(self) -> dict:
        gpus = sum(n.gpus for n in self.nodes.values() if n.alive)
        return {"CPU": 8.0, "GPU": float(self.gpu_override if self.gpu_override is not None else gpus)}

    def place(self) -> None:
        for aid in list(self.pending):
            a = self.actors[aid]
            if a.unschedulable:
                continue
            free = [n for n in self.nodes.values()
                    if n.alive and len(n.actors) < n.gpus and n.id not in a.avoid]
            if not free:
                continue
            n = self.r.choice(free)
            self.pending.remove(aid)
            a.node, a.state = n.id, "starting"
            n.actors.add(aid)
            self.start(a, n)

    def start(self, a: Actor, n: Node) -> None:
        r, ref = self.r, a.ready_ref
        t = self.t + r.uniform(0.5, 10)
        if r.random() < self.p["start_hang"]:
            return  # a hung model download: the start deadline covers it
        if r.random() < self.p["start_raise"]:
            make, gone = r.choice(START_ERRORS)
            ref.exc = make()
            if gone:
                ref.on_resolve = lambda ref: self.kill_actor(a, sch.CRASH, delay=None)
        elif n.bad:
            ref.value = {"host": n.id, "node_id": n.id, "pid": 1,
                         "error": {"type": "OSError", "message": "model weights not found", "traceback": []}}
        else:
            ref.value = {"host": n.id, "node_id": n.id, "pid": 1, "error": None}
            ref.on_resolve = lambda ref: setattr(a, "state", "ready") if a.state == "starting" else None
        self.resolve_at(ref, t)

    def kill_actor(self, a: Actor, cause: str | None, delay: float | None, exc=None) -> None:
        """The actor's process is gone: unresolved calls fail (after `delay`;
        None: they were already answered), its GPU slot frees."""
        if a.state == "dead":
            return
        a.state, a.death_cause = "dead", cause
        if a.node is not None:
            self.nodes[a.node].actors.discard(a.id)
        elif a.id in self.pending:
            self.pending.remove(a.id)
        for ref in [a.ready_ref, *a.running]:
            if ref is not None and not ref.resolved:
                ref.value, ref.exc, ref.on_resolve = None, (exc or died)(), None  # no commit after death
                if delay is None:
                    ref.t = math.inf  # never answered: the driver has dropped the actor
                else:
                    self.resolve_at(ref, self.t + delay)
        a.running = []
        self.place()

    # -- Ray's API --

    def remote(self, **opts):
        return lambda cls: ActorClass(self)

    def request(self, avoid: tuple, fence: str | None) -> Handle:
        a = Actor(len(self.actors), avoid, fence)
        a.ready_ref = Ref(self)
        self.actors[a.id] = a
        self.pending.append(a.id)
        self.place()
        if a.state == "pending" and self.r.random() < 0.05:  # no node will ever match (all avoided, say)
            a.unschedulable = True
            a.ready_ref.exc = rex.ActorUnschedulableError("cannot be scheduled")
            a.ready_ref.on_resolve = lambda ref: self.kill_actor(a, None, delay=None)
            self.resolve_at(a.ready_ref, self.t + self.r.uniform(1, 30))
        return Handle(self, a)

    def process(self, a: Actor, url: str) -> Ref:
        self.submits.append((self.t, url))
        r, ref = self.r, Ref(self)
        if a.state == "dead":
            ref.exc = died()
            self.resolve_at(ref, self.t + 0.1)
            return ref
        a.running.append(ref)
        a.dropped = False
        self.log(f"{self.t:8.2f}   submit {url} to actor {a.id}")
        t = self.t + r.uniform(0.5, 20)

        def finished(ref, a=a):
            if ref in a.running:
                a.running.remove(ref)

        roll = r.random()
        if url in self.always_bad:
            ref.value = {"failure": {"type": "ValueError", "message": "p2p cannot align the prompt",
                                     "traceback": [], "deterministic": True}}
            ref.on_resolve = finished
        elif roll < self.p["hang"]:
            return ref  # runs past run.shard_timeout_s
        elif roll < self.p["hang"] + self.p["raise"]:
            make, gone, cause = r.choice(PROCESS_ERRORS)
            ref.exc = make()

            def raised(ref, a=a, gone=gone, cause=cause):
                self.log(f"{self.t:8.2f}   {url} on actor {a.id} raises {type(ref.exc).__name__}")
                finished(ref)
                a.dropped = True
                if gone:
                    self.kill_actor(a, cause, delay=None)

            ref.on_resolve = raised
        elif roll < self.p["hang"] + self.p["raise"] + self.p["fatal"]:
            ref.exc = rex.LocalRayletDiedError()
            ref.on_resolve = finished
        elif roll < self.p["hang"] + self.p["raise"] + self.p["fatal"] + self.p["cuda"]:
            ref.value = {"failure": {"type": "RuntimeError", "message": "CUDA error: an illegal memory access",
                                     "traceback": [], "deterministic": False}}

            def broken(ref, a=a):
                finished(ref)
                a.dropped = True

            ref.on_resolve = broken
        elif roll < self.p["hang"] + self.p["raise"] + self.p["fatal"] + self.p["cuda"] + self.p["fail"]:
            ref.value = {"failure": {"type": "OSError", "message": "connection reset", "traceback": [],
                                     "deterministic": False}}
            ref.on_resolve = finished
        else:
            def commit(ref, a=a, url=url):
                finished(ref)
                if self.t >= self.lease_lost_at:  # the worker's fence: its lease was taken over
                    ref.value = {"failure": {"type": "LeaseLost", "message": "now held by newrun",
                                             "traceback": [], "deterministic": False}}
                    return
                self.commits[url] += 1
                self.log(f"{self.t:8.2f}   commit {url} by actor {a.id}")

            ref.value = {"summary": summary(url)}
            ref.on_resolve = commit
        self.resolve_at(ref, t)
        return ref

    def live(self, a: Actor) -> Ref:
        ref = Ref(self)
        if self.r.random() < self.p["live_raise"] or a.state == "dead":
            ref.exc = died()
        else:
            ref.value = {"shard": "", "samples": 1, "edits": 1}
        self.resolve_at(ref, self.t + 0.05)
        return ref

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None):
        done = [r for r in refs if r.resolved]
        if len(done) < num_returns and timeout:
            soonest = min((r.t for r in refs if not r.resolved), default=math.inf)
            self.advance(min(soonest, self.t + timeout))
            done = [r for r in refs if r.resolved]
        return done[:max(num_returns, 0)], [r for r in refs if not r.resolved]

    def get(self, ref: Ref, timeout: float | None = None):
        assert ref.resolved, "get of an unresolved ref after wait said it was ready"
        if ref.exc is not None:
            raise ref.exc
        return ref.value

    def kill(self, handle: Handle, no_restart: bool = True) -> None:
        a = handle.actor
        if a.state == "ready" and not a.running and not a.dropped:
            self.idle_kills.append((self.t, a.id))
        self.log(f"{self.t:8.2f}   kill actor {a.id} ({a.state})")
        self.kill_actor(a, sch.CRASH, delay=None)

    # -- the GCS and the clock --

    def placed_on(self, handle: Handle):
        a = handle.actor
        return a.node is not None, a.node

    def death_cause(self, handle: Handle):
        return handle.actor.death_cause

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.advance(self.t + s)


def summary(url: str) -> dict:
    return {"shard": url, "name": url, "images": 2, "errors": 0, "edits": 2, "kept": 2, "unet_calls": 4,
            "seconds": 1.0}


class FakeStore:
    """The driver's side of the output: _stats/ writes that fail now and
    then, failure records, and the lease."""

    def __init__(self, sim: FakeRay):
        self.sim, self.root, self.fence = sim, "mem://out", "ours"
        self.failed: dict = {}
        self.lease = type("Lease", (), {"lost": ""})()

    def write_json(self, rel: str, obj: dict) -> None:
        if self.sim.r.random() < self.sim.p["stats_fail"]:
            raise OutputWriteError(f"cannot write {rel}: injected")
        self.sim.stats_written.append((self.sim.t, obj["shard"]))

    def mark_failed(self, shard: str, info: dict) -> bool:
        self.failed[shard] = info
        return True

    def check_fence(self) -> None:
        if self.sim.t >= self.sim.lease_lost_at:
            raise LeaseLost("output.path 'mem://out': this run's lease is no longer the output's (now held by newrun)")


class NoSignals:
    def check(self):
        pass


# -- one seeded run and its checks -----------------------------------------------------


def run_seed(seed: int, log=None) -> dict:
    try:
        return _run(seed, log)
    except Violation as exc:
        raise Violation(f"seed {seed}: {exc}\nreplay: IMPRINT_SIM_SEED={seed} pytest "
                        f"tests/test_ray_driver_sim.py -k replay -s") from None


def _run(seed: int, log) -> dict:
    r = random.Random(seed * 7919 + 1)
    shards = [f"s{i}" for i in range(r.randint(1, 6))]
    run = {"executor": "ray", "gpus_per_worker": 1, "max_attempts": r.choice([1, 2, 3]), "shard_timeout_s": 60,
           "placement_timeout_s": r.choice([60, 300]), "start_timeout_s": 30}
    if r.random() < 0.3:
        run["max_workers"] = r.randint(1, 4)
    spec = load_spec(raw={"input": {"shards": shards}, "model": {"id": "tiny", "device": "cpu"}, "run": run})
    ray = FakeRay(seed, shards, log)
    store = FakeStore(ray)
    report = JobReport(output="mem://out", total=len(shards))
    workers: dict = {}
    outcome = "finished"
    stopped: BaseException | None = None
    try:
        ra._drive(ray, spec, store, list(shards), report, Progress(len(shards), 0, False), None, True, workers,
                  NoSignals(), gcs=ray, clock=ray)
    except JobStopped as exc:
        outcome, stopped = ("taken over" if isinstance(exc, OutputTakenOver) else "stopped"), exc
    except Violation:
        raise
    except BaseException as exc:  # noqa: BLE001 (anything else escaping the driver is the defect)
        raise Violation(f"{type(exc).__name__} escaped the driver: {exc}") from exc
    check(ray, store, report, shards, spec, outcome, stopped)
    return {"outcome": outcome, "failed": len(report.failed), "commits": sum(ray.commits.values())}


def check(ray: FakeRay, store: FakeStore, report: JobReport, shards: list, spec, outcome: str, stopped) -> None:
    done = {w for _, w in ray.stats_written}
    for s in done:
        if ray.commits[s] != 1:
            raise Violation(f"{s} counted done, committed {ray.commits[s]} times")
    for s in shards:
        if ray.commits[s] > 1:
            raise Violation(f"{s} committed {ray.commits[s]} times")
        if s in report.failed and ray.commits[s]:
            raise Violation(f"{s} is recorded failed but was committed")
        if report.attempts[s] > spec.run.max_attempts:
            raise Violation(f"{s} charged {report.attempts[s]} attempts, max_attempts = {spec.run.max_attempts}")
    if ray.p["stats_fail"] == 0 and report.done != len(done):
        raise Violation(f"{report.done} shards done but {len(done)} stats written")
    if outcome == "finished":
        for s in shards:
            if (ray.commits[s] == 1) == (s in report.failed):
                raise Violation(f"{s}: committed {ray.commits[s]} times, recorded failed: {s in report.failed}")
            if s in report.failed:
                f = report.failures[s]
                why_ok = (f.get("deterministic") or report.attempts[s] == spec.run.max_attempts
                          or f["type"] == "WorkerLost")
                if not why_ok:
                    raise Violation(f"{s} failed after {report.attempts[s]} of {spec.run.max_attempts} attempts: {f}")
        if report.done + len(report.failed) != len(shards):
            raise Violation(f"finished with {report.done} done and {len(report.failed)} failed of {len(shards)}")
    late = [(t, s) for t, s in ray.submits if t > ray.lease_lost_at]
    if late:
        raise Violation(f"shards handed out after the lease was lost at {ray.lease_lost_at:.2f}: {late}")
    if outcome == "taken over" and ray.t < ray.lease_lost_at:
        raise Violation("stopped for a lost lease that was not lost")
    if ray.idle_kills:
        t0, aid = ray.idle_kills[0]
        after = [(t, s) for t, s in ray.submits if t > t0]
        if after:
            raise Violation(f"the idle ready actor {aid} was killed at {t0:.2f} while work was left "
                            f"(handed out later: {after[:3]})")


@pytest.fixture(autouse=True)
def no_waits(monkeypatch):
    monkeypatch.setattr(driving, "DRIVER_WRITE_WAIT_S", 0.0)


def run_many(n: int) -> Counter:
    outcomes = Counter()
    for seed in range(n):
        res = run_seed(seed)
        outcomes[res["outcome"]] += 1
        outcomes["failed shards"] += res["failed"]
        outcomes["commits"] += res["commits"]
    return outcomes


def test_driver_loop_fast_subset():
    outcomes = run_many(FAST)
    # The runs reach the ends and the failure paths, not only the happy one.
    assert outcomes["finished"] > FAST // 3 and outcomes["stopped"] and outcomes["failed shards"], outcomes


@pytest.mark.slow
def test_driver_loop_ten_thousand_seeds():
    outcomes = run_many(RUNS)
    assert outcomes["finished"] > RUNS // 3 and outcomes["stopped"] > RUNS // 100, outcomes
    assert outcomes["taken over"] > 0 and outcomes["failed shards"] > RUNS // 20, outcomes


@pytest.mark.skipif("IMPRINT_SIM_SEED" not in os.environ, reason="set IMPRINT_SIM_SEED to replay one run")
def test_replay():
    print(run_seed(int(os.environ["IMPRINT_SIM_SEED"]), log=print))


# -- the old driver's defects, which the simulator must find -----------------------------


def catches_only_actor_errors(monkeypatch):
    """Issue 31 item 1: only RayActorError and GetTimeoutError were caught."""
    real = ra.outcome_event

    def outcome_event(call, outcome, **kw):
        if isinstance(outcome, BaseException) and not isinstance(outcome, (rex.RayActorError, rex.GetTimeoutError)):
            raise outcome
        return real(call, outcome, **kw)

    monkeypatch.setattr(ra, "outcome_event", outcome_event)


def kills_idle_workers_on_a_cap_drop(monkeypatch):
    """Issue 31 item 8: a lower cap killed idle ready workers."""

    class Old(sch.Scheduler):
        def set_cap(self, cap, now):
            self.cap = max(1, cap)
            live = self.live()
            idle = [w for w in live if w.state == sch.READY and not w.shards]
            acts = []
            for w in idle[:max(0, len(live) - self.cap)]:
                acts += self._drop(w)
            return self._settle(now, acts)

    monkeypatch.setattr(sch, "Scheduler", Old)


def no_lease_check(monkeypatch):
    """Issue 31 items 7a/9a: the driver never checked its lease."""
    monkeypatch.setattr(ra, "_check_lease", lambda store: None)
    monkeypatch.setattr(driving, "_check_lease", lambda store: None)


def stats_write_stops_the_job(monkeypatch):
    """Issue 31 item 5: one failed _stats/ write stopped the job."""
    monkeypatch.setattr(driving, "_driver_write", lambda what, write: write())


@pytest.mark.parametrize("defect, finds", [
    (catches_only_actor_errors, "escaped the driver"),
    (kills_idle_workers_on_a_cap_drop, "idle ready actor"),
    (no_lease_check, "after the lease was lost"),
    (stats_write_stops_the_job, "OutputWriteError escaped"),
])
def test_the_simulator_finds_each_old_defect(monkeypatch, defect, finds):
    defect(monkeypatch)
    for seed in range(RUNS):
        try:
            run_seed(seed)
        except Violation as exc:
            assert finds in str(exc), f"seed {seed}: {exc}"
            return
    pytest.fail(f"no seed out of {RUNS} shows the defect {defect.__name__}")
