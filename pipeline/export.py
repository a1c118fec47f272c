"""`imprint export OUT DEST`: the kept edits of a job's output as training
data, either WebDataset shards (`edit.<fmt>`, the pixel-aligned
`source.<fmt>` and a `json` per edit, readable by
`webdataset.WebDataset(...).decode("pil")`) or plain image files with a
`manifest.jsonl`. Only committed shards are exported, one input shard at a
time (memory stays bounded by one shard's sources)."""

from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq

from .store import OutputStore
from .tables import SCORES, image_bytes

FORMATS = ("webdataset", "files")
_RESULT_COLUMNS = ["key", "shard", "source_prompt", "target_prompt", "target_index", "seed_index", "seed", "method",
                   "params", "model_id", "image", "image_format", "width", "height", *SCORES, "kept", "meta"]


def _safe(text: str) -> str:
    # WebDataset splits a member's name at its first dot: keys must have none.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def edit_record(r: dict) -> dict:
    """What travels with an exported edit: prompts, seed, method and every
    parameter, scores, and the input's carried metadata."""
    return {
        "key": r["key"], "shard": r["shard"], "source_prompt": r["source_prompt"], "target_prompt": r["target_prompt"],
        "target_index": r["target_index"], "seed_index": r["seed_index"], "seed": r["seed"], "method": r["method"],
        "params": json.loads(r["params"]) if r["params"] else {}, "model_id": r["model_id"],
        "width": r["width"], "height": r["height"], "scores": {s: r[s] for s in SCORES if r.get(s) is not None},
        "meta": json.loads(r["meta"]) if r.get("meta") else {},
    }


def _edits(store: OutputStore, include_rejected: bool):
    """(record, edit bytes, format, source bytes, source format) per exported
    edit, shard by shard."""
    by_shard: dict[str, dict[str, list[str]]] = {}
    for table in ("results", "sources"):
        for path in store.table_files(table):
            shard = os.path.basename(path).rsplit(".", 2)[0]
            by_shard.setdefault(shard, {}).setdefault(table, []).append(path)
    for shard, files in sorted(by_shard.items()):
        sources = {}
        for path in files.get("sources", []):
            t = pq.read_table(path, filesystem=store.fs, columns=["key", "image", "image_format"])
            for s in t.to_pylist():
                sources[s["key"]] = (image_bytes(s["image"]), s["image_format"])
        for path in files.get("results", []):
            t = pq.read_table(path, filesystem=store.fs, columns=_RESULT_COLUMNS)
            for r in t.to_pylist():
                data = image_bytes(r["image"])
                if data is None or not (r["kept"] or include_rejected):
                    continue
                src, src_fmt = sources.get(r["key"], (None, None))
                yield edit_record(r), data, r["image_format"], src, src_fmt


def _name(rec: dict) -> str:
    return _safe(f"{rec['shard']}_{rec['key']}_t{rec['target_index']}_s{rec['seed_index']}_{rec['method']}")


def export(out: str, dest: str, fmt: str = "webdataset", maxcount: int = 1000, include_rejected: bool = False) -> dict:
    """Write the kept edits of `out` to the local folder `dest`. Returns
    {"edits": n, "files": [written files]}."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    store = OutputStore.open(out)
    if store.current_hash() is None:
        raise ValueError(f"{out!r} is not an imprint output (no job.json)")
    os.makedirs(dest, exist_ok=True)
    edits = _edits(store, include_rejected)
    if fmt == "webdataset":
        return _export_webdataset(edits, dest, maxcount)
    return _export_files(edits, dest)


def _export_webdataset(edits, dest: str, maxcount: int) -> dict:
    import webdataset as wds

    n = 0
    pattern = os.path.join(dest, "edits-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for rec, data, fmt, src, src_fmt in edits:
            sample = {"__key__": _name(rec), f"edit.{fmt}": data, "json": json.dumps(rec, sort_keys=True).encode()}
            if src is not None:
                sample[f"source.{src_fmt}"] = src
            sink.write(sample)
            n += 1
    files = sorted(os.path.join(dest, f) for f in os.listdir(dest) if re.fullmatch(r"edits-\d{6}\.tar", f))
    return {"edits": n, "files": files}


def _export_files(edits, dest: str) -> dict:
    os.makedirs(os.path.join(dest, "edits"), exist_ok=True)
    os.makedirs(os.path.join(dest, "sources"), exist_ok=True)
    n = 0
    seen_sources: set[str] = set()
    manifest = os.path.join(dest, "manifest.jsonl")
    with open(manifest, "w") as fh:
        for rec, data, fmt, src, src_fmt in edits:
            name = _name(rec)
            edit_file = f"edits/{name}.{fmt}"
            with open(os.path.join(dest, edit_file), "wb") as f:
                f.write(data)
            source_file = None
            if src is not None:
                source_file = f"sources/{_safe(rec['shard'] + '_' + rec['key'])}.{src_fmt}"
                if source_file not in seen_sources:
                    with open(os.path.join(dest, source_file), "wb") as f:
                        f.write(src)
                    seen_sources.add(source_file)
            fh.write(json.dumps({"edit_file": edit_file, "source_file": source_file, **rec}, sort_keys=True) + "\n")
            n += 1
    return {"edits": n, "files": [manifest]}
