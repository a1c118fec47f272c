"""Output table schemas (the single source of truth; `schemas/*.json` are
generated from here by `imprint schemas` and checked in tests)."""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = "1"
STAGES = ("read", "vae_encode", "invert", "edit", "vae_decode", "score", "encode", "write")
SCORES = ("clip_text", "clip_direction", "clip_image", "lpips", "diversity")

_timing = [pa.field(f"time_{s}_s", pa.float64()) for s in STAGES]

RESULTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("source_prompt", pa.string()),
        pa.field("target_prompt", pa.string()),
        pa.field("target_index", pa.int32()),
        pa.field("seed_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("method", pa.string()),
        pa.field("num_steps", pa.int32()),
        pa.field("skip", pa.int32()),
        pa.field("cfg_source", pa.float32()),
        pa.field("cfg_target", pa.float32()),
        pa.field("params", pa.string()),  # JSON: every method parameter
        pa.field("model_id", pa.string()),
        pa.field("image", pa.binary()),  # encoded edit (null when rejected and not written)
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        *[pa.field(s, pa.float32()) for s in SCORES],
        pa.field("kept", pa.bool_()),  # passed the job's filters
        pa.field("status", pa.string()),  # ok | rejected
        *_timing,
    ]
)

SOURCES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("source_prompt", pa.string()),
        pa.field("target_prompts", pa.list_(pa.string())),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("num_edits", pa.int32()),
        pa.field("num_kept", pa.int32()),
        pa.field("recon_error_max", pa.float32()),  # latent max |edit(code, source) - x0|
        pa.field("recon_error_mean", pa.float32()),
        pa.field("recon_errors", pa.string()),  # JSON {method: max error} when several methods ran
        pa.field("recon_psnr", pa.float32()),  # decoded reconstruction vs input (optional)
        pa.field("status", pa.string()),  # ok | error
        pa.field("error", pa.string()),
        *_timing,
    ]
)

NOISE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("seed_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("method", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("num_steps", pa.int32()),
        pa.field("skip", pa.int32()),
        pa.field("timesteps", pa.list_(pa.int32())),
        pa.field("scheduler_config", pa.string()),  # JSON of the scheduler's config
        pa.field("params", pa.string()),  # JSON
        pa.field("source_prompt", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("dtype", pa.string()),  # float16 | float32
        pa.field("x_start", pa.binary()),
        pa.field("x_start_shape", pa.list_(pa.int32())),
        pa.field("zs", pa.binary()),
        pa.field("zs_shape", pa.list_(pa.int32())),
        pa.field("extra_names", pa.list_(pa.string())),
        pa.field("extra_shapes", pa.list_(pa.list_(pa.int32()))),
        pa.field("extra_data", pa.list_(pa.binary())),
    ]
)

TABLES = {"results": RESULTS, "sources": SOURCES, "noise": NOISE}
ROW_GROUP_ROWS = {"results": 256, "sources": 1024, "noise": 16}  # noise rows are ~1 MiB each


def table_from_rows(name: str, rows: list[dict], metadata: dict[str, str]) -> pa.Table:
    schema = TABLES[name]
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    meta = {b"imprint.schema_version": SCHEMA_VERSION.encode(), b"imprint.table": name.encode()}
    meta.update({f"imprint.{k}".encode(): str(v).encode() for k, v in metadata.items()})
    return pa.Table.from_pydict(cols, schema=schema.with_metadata(meta))


def schema_json(name: str) -> dict:
    schema = TABLES[name]
    return {
        "table": name,
        "schema_version": SCHEMA_VERSION,
        "format": "Parquet (zstd), one file per input shard: <out>/" + name + "/<shard>.parquet",
        "columns": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def dump_schema_json(name: str) -> str:
    return json.dumps(schema_json(name), indent=2) + "\n"
