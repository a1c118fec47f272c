"""`imprint status OUT`: done, failed and left shards of a job's output."""

from __future__ import annotations

import tomllib
from collections import Counter

from .data import expand_shards, shard_name
from .executor import JOB_ERROR_FILE
from .store import FAILED, META_FILE, SPEC_FILE, OutputError, OutputStore


def job_status(out: str) -> dict:
    store = OutputStore.open(out)
    try:
        spec_hash = store.current_hash()
    except OutputError as exc:
        raise ValueError(str(exc)) from None
    if spec_hash is None:
        raise FileNotFoundError(f"{out!r} is not an imprint output (no {META_FILE})")
    try:
        spec = tomllib.loads(store.read_text(SPEC_FILE) or "")
        if spec["input"].get("codes"):
            from .codes import code_shards

            shards = code_shards(spec["input"]["codes"])
        else:
            shards = expand_shards(spec["input"]["shards"], allow_pipe=spec["input"].get("allow_pipe", False))
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        shards = []
    # listings and the counts index: a marker is opened only when the index
    # does not hold it yet (committed since the last run ended)
    try:
        done = store.shard_counts(spec_hash)
    except OutputError as exc:
        raise ValueError(str(exc)) from None
    failed = {k: v for k, v in store.markers(FAILED).items() if k not in done}
    left = [s for s in shards if shard_name(s) not in done and shard_name(s) not in failed]
    error_types: Counter = Counter()
    for v in done.values():
        error_types.update(v.get("error_types") or {})
    return {
        "output": out,
        "spec_hash": spec_hash,
        "total": len(shards),
        "done": sorted(done),
        "failed": failed,
        "left": left,
        "images": sum(v.get("images", 0) for v in done.values()),
        "errors": sum(v.get("errors", 0) for v in done.values()),
        "edits": sum(v.get("edits", 0) for v in done.values()),
        "kept": sum(v.get("kept", 0) for v in done.values()),
        "error_types": dict(error_types.most_common()),
        # why the last run stopped (a worker that could not start), until a run starts again
        "stopped": store.read_json(JOB_ERROR_FILE),
    }
