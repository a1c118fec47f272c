"""`imprint export OUT DEST`: the kept edits of a job's output as training
data, either WebDataset shards (`edit.<fmt>`, the pixel-aligned
`source.<fmt>` and a `json` per edit, readable by
`webdataset.WebDataset(...).decode("pil")`) or a Hugging Face `imagefolder`
(`edits/`, `sources/` and a `metadata.jsonl` whose `file_name` and
`source_file_name` make the `image` and `source` columns of
`datasets.load_dataset("imagefolder", data_dir=DEST)`). Only committed
shards are exported, one input shard at a time (memory stays bounded by one
shard's sources).

Names (WebDataset keys, file names) are `<shard>_<key>_t<target>_s<seed>_<method>`
with the input shard's file stem (`part-000` for `/data/part-000.tar`), so
they are short, carry no local path, and do not change with how the shard
path was spelled; two input shards with one stem get the output's
shard name (stem plus a hash of the URL) instead.

DEST is whole or absent: the export is written into a staging folder beside
DEST (`.<DEST name>.imprint-export-<id>`) and renamed to DEST only when it
succeeded, so a re-export never mixes with an older one. DEST must be empty
or absent; `overwrite` replaces a non-empty DEST (the old folder is moved
aside, the new one renamed in, the old one removed). An output whose job has
shards left or failed is refused unless `partial` (its committed shards are
exported). Exported JSON is strict: a NaN or infinite score is `null`."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid

import pyarrow.parquet as pq

from .store import OutputStore
from .tables import SCORES, image_bytes

FORMATS = ("webdataset", "files")
METADATA = "metadata.jsonl"  # the name Hugging Face's imagefolder reads
_RESULT_COLUMNS = ["key", "shard", "source_prompt", "target_prompt", "target_index", "seed_index", "seed", "method",
                   "params", "model_id", "image", "image_format", "width", "height", *SCORES, "kept", "meta"]


def _safe(text: str) -> str:
    # WebDataset splits a member's name at its first dot: keys must have none.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def edit_record(r: dict, shard: str) -> dict:
    """What travels with an exported edit: prompts, seed, method and every
    parameter, scores, and the input's carried metadata. `shard`: the input
    shard's short label (see the module doc), not its path."""
    return {
        "key": r["key"], "shard": shard, "source_prompt": r["source_prompt"], "target_prompt": r["target_prompt"],
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
    labels = _shard_labels(list(by_shard))
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
                yield edit_record(r, labels[shard]), data, r["image_format"], src, src_fmt


def _shard_labels(names: list[str]) -> dict[str, str]:
    """Output shard name (`<stem>-<hash of the URL>`, `data.shard_name`) ->
    its label in exported names: the stem, unless two shards share it."""
    stems = {n: n.rsplit("-", 1)[0] for n in names}
    count: dict[str, int] = {}
    for stem in stems.values():
        count[stem] = count.get(stem, 0) + 1
    return {n: stem if count[stem] == 1 else n for n, stem in stems.items()}


def _name(rec: dict) -> str:
    return _safe(f"{rec['shard']}_{rec['key']}_t{rec['target_index']}_s{rec['seed_index']}_{rec['method']}")


def strict_json(value):
    """`value` with every NaN or infinite float made None (JSON has no NaN;
    Python's json writes a bare `NaN` that strict readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value) -> str:
    return json.dumps(strict_json(value), sort_keys=True, allow_nan=False)


def unfinished(out: str) -> str | None:
    """Why `out`'s job is not finished (shards left or failed), or None."""
    from .status import job_status

    try:
        st = job_status(out)
    except FileNotFoundError:
        raise ValueError(f"{out!r} is not an imprint output (no job.json)") from None
    if not st["left"] and not st["failed"]:
        return None
    return (f"{len(st['done'])} of {st['total']} shard(s) done, {len(st['failed'])} failed, {len(st['left'])} left")


def export(out: str, dest: str, fmt: str = "webdataset", maxcount: int = 1000, include_rejected: bool = False,
           overwrite: bool = False, partial: bool = False) -> dict:
    """Write the kept edits of `out` to the local folder `dest` (see the
    module doc for `overwrite` and `partial`). Returns {"edits": n, "files":
    [files in dest]}."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    store = OutputStore.open(out)
    if store.current_hash() is None:
        raise ValueError(f"{out!r} is not an imprint output (no job.json)")
    why = unfinished(out)
    if why and not partial:
        raise ValueError(f"{out} is unfinished ({why}): run the job to its end (`imprint status {out}` lists what "
                         "is left), or pass --partial to export the shards done so far")
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ValueError(f"{dest}: DEST must be a folder")
    held = sorted(os.listdir(dest)) if os.path.isdir(dest) else []
    if held and not overwrite:
        raise ValueError(f"{dest} is not empty ({len(held)} entries, e.g. {held[0]}): exporting into it would mix "
                         "with what it holds; choose an empty or new folder, or pass --overwrite to replace it whole")
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.imprint-export-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        edits = _edits(store, include_rejected)
        if fmt == "webdataset":
            done = _export_webdataset(edits, staging, maxcount)
        else:
            done = _export_files(edits, staging)
        _swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    done["files"] = [os.path.join(dest, os.path.relpath(f, staging)) for f in done["files"]]
    done["partial"] = why
    return done


def _swap_in(staging: str, dest: str) -> None:
    """`staging` becomes `dest`: renamed over an empty or absent DEST; a
    non-empty one is moved aside first and removed once the new one is in."""
    try:
        os.replace(staging, dest)  # POSIX: succeeds when dest is absent or an empty folder
        return
    except OSError:
        if not os.path.isdir(dest):
            raise
    old = f"{staging}.old"
    os.replace(dest, old)
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _export_webdataset(edits, dest: str, maxcount: int) -> dict:
    import webdataset as wds

    n = 0
    pattern = os.path.join(dest, "edits-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for rec, data, fmt, src, src_fmt in edits:
            sample = {"__key__": _name(rec), f"edit.{fmt}": data, "json": dumps(rec).encode()}
            if src is not None:
                sample[f"source.{src_fmt}"] = src
            sink.write(sample)
            n += 1
    files = sorted(os.path.join(dest, f) for f in os.listdir(dest) if re.fullmatch(r"edits-\d{6}\.tar", f))
    if n == 0:  # ShardWriter opens its first tar before any sample: no edits, no file
        for f in files:
            os.remove(f)
        files = []
    return {"edits": n, "files": files}


def _export_files(edits, dest: str) -> dict:
    """A Hugging Face imagefolder: one metadata line per edit, its image in
    `file_name` and its pixel-aligned source in `source_file_name` (the
    `image` and `source` columns), prompts, method, seed, parameters and
    scores as columns. Nested values (params, meta) are JSON strings, so
    every line has the same columns whatever the method."""
    os.makedirs(os.path.join(dest, "edits"), exist_ok=True)
    os.makedirs(os.path.join(dest, "sources"), exist_ok=True)
    n = 0
    seen_sources: set[str] = set()
    metadata = os.path.join(dest, METADATA)
    with open(metadata, "w") as fh:
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
            scores = rec.pop("scores")
            line = {"file_name": edit_file, "source_file_name": source_file, **rec,
                    **{s: scores.get(s) for s in SCORES},
                    "params": dumps(rec["params"]), "meta": dumps(rec["meta"])}
            fh.write(dumps(line) + "\n")
            n += 1
    return {"edits": n, "files": [metadata]}
