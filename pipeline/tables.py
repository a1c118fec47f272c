"""Output table schemas (the single source of truth; `schemas/*.json` are
generated from here by `imprint schemas` and checked in tests)."""

from __future__ import annotations

import json

import pyarrow as pa

# The sample entry holding an edit-region mask (lossless PNG, white = the region to edit), measured by the
# PIE-Bench metrics (pipeline/pie_metrics.py); the input contract (schemas/sample.md). Not `mask.png`: that
# entry is a noise-space stroke's mask.
EDIT_MASK_KEY = "edit_mask.png"

SCHEMA_VERSION = "2"  # 2: image columns are {bytes, path} structs; sources.image; meta columns
STAGES = ("read", "vae_encode", "invert", "edit", "vae_decode", "score", "encode", "write")
SCORES = ("clip_text", "clip_direction", "clip_image", "lpips", "diversity")
# PIE-Bench's metrics (pipeline/pie_metrics.py), on rows of samples with an edit mask; null elsewhere
PIE_METRICS = ("structure_distance", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim", "clip_whole", "clip_edited")

_timing = [pa.field(f"time_{s}_s", pa.float64()) for s in STAGES]
# Hugging Face `datasets`' Image storage: an encoded image is a struct of its
# bytes and an optional path, so `load_dataset("parquet", ...)` decodes it.
IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
IMAGE_COLUMNS = ("image", "recon_image")

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
        pa.field("image", IMAGE),  # {bytes: encoded edit, path: null}; null when rejected and not written
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        *[pa.field(s, pa.float32()) for s in SCORES],
        *[pa.field(s, pa.float64()) for s in PIE_METRICS],
        pa.field("kept", pa.bool_()),  # passed the job's filters
        pa.field("status", pa.string()),  # ok | rejected
        *_timing,
        pa.field("meta", pa.string()),  # JSON: the input sample's extra json fields (url, license, ...)
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
        pa.field("image", IMAGE),  # the source as the model saw it (cropped, resized): pixel-aligned with its edits
        pa.field("image_format", pa.string()),
        pa.field("meta", pa.string()),  # JSON: the input sample's extra json fields (url, license, ...)
        # the decoded reconstruction (first method's code, source prompt) when score.recon_psnr decoded it; else null
        pa.field("recon_image", IMAGE),
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
        # what zs holds: "noise" (sigma-scaled noise maps; also when null, as in codes written before this
        # column) or "residual" (turbo-edit's additive residuals r_t = x_{t-1} - mu_t)
        pa.field("zs_kind", pa.string()),
    ]
)

TABLES = {"results": RESULTS, "sources": SOURCES, "noise": NOISE}
ROW_GROUP_ROWS = {"results": 256, "sources": 1024, "noise": 16}  # noise rows are ~1 MiB each


def hf_features(name: str) -> dict:
    """Hugging Face `datasets` feature metadata (the `huggingface` key of the
    Arrow schema): image columns are `Image`, the rest follow the Arrow types."""
    return {"info": {"features": {c: {"_type": "Image"} for c in IMAGE_COLUMNS if c in TABLES[name].names}}}


def image_value(data: bytes | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": None}


def image_bytes(value) -> bytes | None:
    """The encoded bytes of an image cell, as read back by pyarrow/pandas."""
    return value.get("bytes") if isinstance(value, dict) else value


def table_from_rows(name: str, rows: list[dict], metadata: dict[str, str]) -> pa.Table:
    schema = TABLES[name]
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    for c in IMAGE_COLUMNS:
        if c in cols:
            cols[c] = [image_value(v) if isinstance(v, bytes) else v for v in cols[c]]
    meta = {b"imprint.schema_version": SCHEMA_VERSION.encode(), b"imprint.table": name.encode(),
            b"huggingface": json.dumps(hf_features(name)).encode()}
    meta.update({f"imprint.{k}".encode(): str(v).encode() for k, v in metadata.items()})
    return pa.Table.from_pydict(cols, schema=schema.with_metadata(meta))


def schema_json(name: str) -> dict:
    schema = TABLES[name]
    return {
        "table": name,
        "schema_version": SCHEMA_VERSION,
        "format": "Parquet (zstd), one or more parts per input shard: <out>/" + name + "/<shard>.<part>.parquet; "
        "committed when <out>/_done/<shard>.<spec hash>.<digest>.json lists them",
        "columns": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def dump_schema_json(name: str) -> str:
    return json.dumps(schema_json(name), indent=2) + "\n"
