"""Planning at dataset scale: how long `executor.plan()` takes for N shard
URLs (brace expansion, de-duplication, the done check against the output's
`_done/` markers). Not a test: run it by hand and record the figures in
pipeline/BENCH.md.

    python tools/bench_planning.py --shards 100000 --done 50000

The shards are s3:// URLs (nothing is opened: remote shards are checked when
a worker reads them); the output is a local folder with `--done` markers of
the job's spec hash written first, as a resumed job would find them."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.data import expand_shards, shard_name
from pipeline.executor import plan
from pipeline.spec import load_spec
from pipeline.store import DONE, files_digest, marker_name, part_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--done", type=int, default=50_000, help="markers already in the output")
    ap.add_argument("--out", default=None, help="output folder (default: a temp dir)")
    args = ap.parse_args()
    n = args.shards
    width = len(str(n - 1))
    # Two patterns that overlap by half: de-duplication has real work to do.
    patterns = [f"s3://bench-bucket/data/shard-{{{0:0{width}d}..{n - 1:0{width}d}}}.tar",
                f"s3://bench-bucket/data/shard-{{{0:0{width}d}..{n // 2 - 1:0{width}d}}}.tar"]
    out = args.out or tempfile.mkdtemp(prefix="imprint-bench-plan-")
    spec = load_spec(raw={"input": {"shards": patterns}, "model": {"id": "tiny"}, "output": {"path": out}})

    t0 = time.perf_counter()
    shards = expand_shards(patterns)
    t_expand = time.perf_counter() - t0
    assert len(shards) == n, len(shards)

    # The markers a resumed job finds (written here, not timed).
    os.makedirs(os.path.join(out, DONE), exist_ok=True)
    h = spec.hash()

    for table in ("results", "sources"):
        os.makedirs(os.path.join(out, table), exist_ok=True)

    def write_marker(url: str) -> None:
        # what a committed shard leaves: one part per table, then a marker whose
        # name carries the spec hash and the digest of the (file, size) list
        name = shard_name(url)
        files = []
        for table in ("results", "sources"):
            rel = f"{table}/{part_name(name, 0)}"
            with open(os.path.join(out, rel), "wb") as fh:
                fh.write(b"PAR1" * 4)
            files.append((rel, 16))
        with open(os.path.join(out, DONE, marker_name(name, h, files_digest(files))), "w") as fh:
            json.dump({"shard": url, "spec_hash": h, "files": files}, fh)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write_marker, shards[: args.done]))

    t0 = time.perf_counter()
    todo = plan(spec)
    store, all_shards, pending = todo.store, todo.shards, todo.pending
    t_plan = time.perf_counter() - t0
    assert len(all_shards) == n and len(pending) == n - args.done, (len(all_shards), len(pending))

    t0 = time.perf_counter()
    done = store.done_shards(h)
    t_done = time.perf_counter() - t0
    store.release()  # plan() took the output's lease
    print(json.dumps({"shards": n, "done": len(done), "pending": len(pending), "expand_dedupe_s": round(t_expand, 3),
                      "done_shards_s": round(t_done, 3), "plan_total_s": round(t_plan, 3), "output": out}, indent=1))


if __name__ == "__main__":
    main()
