"""Peak host memory (RSS) of one shard worker against the shard's size.

    python tools/measure_worker_rss.py                 # 200- and 2,000-sample shards
    python tools/measure_worker_rss.py --samples 200 2000 --code /path/to/other/checkout

Each measurement runs `ShardWorker.process` on one shard in a fresh
process (the tiny model, noise maps on, scoring off, PNG images, few steps)
and reports that process's peak RSS (`ru_maxrss`). The shards are built
beforehand in this process, so building them does not count. `--code` runs
another checkout's `pipeline` package on the same shards (to compare with an
older version)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_shard(path: str, n: int) -> str:
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    with wds.TarWriter(path) as sink:
        for i in range(n):
            arr = (rng.random((80, 96, 3)) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:06d}", "png": buf.getvalue(), "txt": f"a caption number {i}"})
    return path


def child(shard: str, out: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.spec import load_spec
    from pipeline.worker import ShardWorker

    spec = load_spec(raw={
        "input": {"shards": [shard], "templates": ["{source}, oil painting"]},
        "model": {"id": "tiny"}, "inversion": {"steps": steps, "skip": 1}, "edit": {"seeds": 2},
        "batch": {"images": 4}, "output": {"path": out, "noise": True, "image_format": "png"},
        "score": {"enabled": False}, "run": {"executor": "inline", "seed": 0, "threads": 1},
    })
    for table in ("results", "sources", "noise", "_done", "_failed"):  # older versions need the folders
        os.makedirs(os.path.join(out, table), exist_ok=True)
    worker = ShardWorker(spec)
    t0 = time.perf_counter()
    summary = worker.process(shard)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"images": summary["images"], "edits": summary["edits"], "seconds": time.perf_counter() - t0,
                      "peak_rss_mib": peak_kib / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--code", default=ROOT, help="checkout whose pipeline package runs the worker")
    ap.add_argument("--child", nargs=2, metavar=("SHARD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.samples:
            shard = build_shard(os.path.join(tmp, f"rss-{n}.tar"), n)
            env = {**os.environ, "PYTHONPATH": args.code, "OMP_NUM_THREADS": "1"}
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--child",
                                  shard, os.path.join(tmp, f"out-{n}")], env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(res.stderr[-3000:])
            row = {"samples": n, **json.loads(res.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
        lo, hi = rows[0]["peak_rss_mib"], rows[-1]["peak_rss_mib"]
        print(f"peak RSS {lo:.0f} MiB ({rows[0]['samples']} samples) vs {hi:.0f} MiB ({rows[-1]['samples']} samples): "
              f"{(hi - lo) / lo * 100:+.1f}%")


if __name__ == "__main__":
    main()
