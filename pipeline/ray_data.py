"""Ray Data interop: edit the rows of a `ray.data.Dataset` with the engine
and scorers of `imprint run`.

    import ray
    from pipeline.ray_data import ImprintEdits, edit_dataset

    ds = ray.data.read_webdataset("shards/photos/", decoder=None)   # or read_parquet(...)
    edits = edit_dataset(ds, job="jobs/photos.toml", concurrency=2)  # one GPU per actor when the cluster has GPUs
    edits.write_parquet("out/edits-parquet/")

`ImprintEdits` is the callable class for `Dataset.map_batches`: each actor
builds one `worker.ShardWorker` (the model, the engine and the scorers a
job's worker holds) from a job spec and turns a batch of input rows into one
row per edit. An input row holds the image (encoded bytes, a Hugging Face
`{"bytes", "path"}` dict or an HxWxC uint8 array) in `image_col` (default:
the first of image, jpg, jpeg, png, webp), its key (`key` or WebDataset's
`__key__`; else its place in the batch), and its prompts as a sample's json
would: a `json` column (dict, bytes or text) and/or `source_prompt` /
`target_prompts` / `txt` columns; every other json field lands in `meta`.
Prompts follow the job's rules (`input.source_prompt`, `input.templates`,
`input.truncate_prompts`) through `data.decode_sample`, so a row the job
would make an error row gives an output row with `error` set and no edit.

Output columns (`OUTPUT_COLUMNS`): key, source_prompt, target_prompt,
target_index, seed_index, seed, method, params (JSON), model_id, edit
(encoded image bytes in `output.image_format`; None for a rejected edit
unless `filter.write_rejected`), image_format, width, height, the scores
(`tables.SCORES`), kept, error, error_type, meta (JSON).
"""

from __future__ import annotations

import io
import json
from typing import Any

from .tables import SCORES

IMAGE_COLS = ("image", "jpg", "jpeg", "png", "webp")
OUTPUT_COLUMNS = ("key", "source_prompt", "target_prompt", "target_index", "seed_index", "seed", "method", "params",
                  "model_id", "edit", "image_format", "width", "height", *SCORES, "kept", "error", "error_type", "meta")
SHARD = "ray-data"  # the `shard` a Sample from a dataset row carries (seeds derive from the key, not the shard)


class ImprintEdits:
    """`Dataset.map_batches(ImprintEdits, fn_constructor_kwargs={"job": ...},
    concurrency=N, num_gpus=1, batch_format="numpy")`: see the module doc.

    job: a job file (TOML), a raw spec dict, or None (the spec defaults);
    overrides: `--set` style strings ("model.id=tiny"). input.shards and
    output.path are not used. image_col: the column holding the image."""

    def __init__(self, job: Any = None, overrides: list[str] | tuple[str, ...] = (), image_col: str | None = None):
        from .spec import load_spec
        from .worker import ShardWorker

        overrides = list(overrides)
        if isinstance(job, dict) or job is None:
            raw = dict(job or {})
            raw.setdefault("input", {}).setdefault("shards", [SHARD])
            spec = load_spec(raw=raw, overrides=overrides)
        else:
            spec = load_spec(job, overrides)
        if spec.input.codes:
            raise ValueError("input.codes: ImprintEdits edits images; stored codes are edited by `imprint edit-codes`")
        self.spec = spec
        self.worker = ShardWorker(spec)  # the model, engine and scorers of a job's worker
        self.image_col = image_col

    def __call__(self, batch) -> dict[str, list]:
        from .batching import ShapeBuckets
        from .data import decode_sample

        rows = _rows(batch)
        worker, spec = self.worker, self.spec
        out: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
        buckets = ShapeBuckets(spec.batch.images)
        ready = []
        for i, row in enumerate(rows):
            raw = self._raw(row, i)
            s = decode_sample(raw, SHARD, spec.input, spec.image, worker.resolution, worker.models.count_tokens)
            if not s.error:
                worker._check_p2p(s)
            if s.error:
                _append(out, _error_row(s))
                continue
            ready.extend(buckets.add(s))
        ready.extend(buckets.flush())
        for group in ready:
            for row in self._edit(group):
                _append(out, row)
        return out

    def _raw(self, row: dict, index: int) -> dict:
        """A dataset row as the raw WebDataset sample `decode_sample` reads."""
        key = row.get("key", row.get("__key__"))
        raw: dict = {"__key__": str(key) if key is not None and str(key) else f"{index:09d}"}
        col = self.image_col or next((c for c in IMAGE_COLS if row.get(c) is not None), None)
        if col is None or row.get(col) is None:
            raw["__error__"], raw["__error_type__"] = (f"no image in the row (column {self.image_col or ' / '.join(IMAGE_COLS)})",
                                                     "no_image")
            return raw
        data = _image_bytes(row[col])
        raw[_ext(data)] = data
        meta = _json_field(row.get("json"))
        if meta is None:  # unreadable: decode_sample makes the row a `bad_json` error row
            raw["json"] = row["json"]
            return raw
        for name in ("source_prompt", "target_prompts"):
            if row.get(name) is not None:
                value = row[name]
                meta[name] = value.tolist() if hasattr(value, "tolist") else value
        raw["json"] = json.dumps(meta, default=str).encode()
        if row.get("txt") is not None:
            txt = row["txt"]
            raw["txt"] = txt if isinstance(txt, bytes) else str(txt).encode()
        return raw

    def _edit(self, samples) -> list[dict]:
        from .data import encode_image
        from .worker import _meta_json

        worker, spec = self.worker, self.spec
        outs = worker.engine.run(samples)
        scores, keep, _ = worker._score(outs)
        rows, i = [], 0
        for o in outs:
            for e in o.edits:
                params = o.variant_params or worker.engine.params(e.variant)
                kept = bool(keep[i])
                write = kept or spec.filter.write_rejected
                rows.append({
                    "key": o.sample.key, "source_prompt": o.sample.source_prompt, "target_prompt": e.target_prompt,
                    "target_index": e.target_index, "seed_index": e.seed_index, "seed": e.seed,
                    "method": params["method"], "params": json.dumps(params, sort_keys=True),
                    "model_id": worker.models.model_id,
                    "edit": encode_image(e.image, spec.output.image_format, spec.output.quality) if write else None,
                    "image_format": spec.output.image_format, "width": int(e.image.shape[2]),
                    "height": int(e.image.shape[1]), **{s: _score(scores, s, i) for s in SCORES}, "kept": kept,
                    "error": None, "error_type": None, "meta": _meta_json(o.sample),
                })
                i += 1
        return rows


def edit_dataset(ds, job: Any = None, overrides: list[str] | tuple[str, ...] = (), *, concurrency: int = 1,
                 batch_size: int = 8, image_col: str | None = None, num_gpus: float | None = None):
    """`ds.map_batches` with `ImprintEdits` on a pool of `concurrency`
    actors, each with one GPU when the cluster has GPUs (`num_gpus=None`),
    else on CPUs."""
    import ray

    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return ds.map_batches(ImprintEdits, fn_constructor_kwargs={"job": job, "overrides": list(overrides),
                                                               "image_col": image_col},
                          batch_size=batch_size, batch_format="numpy", concurrency=concurrency, num_gpus=num_gpus)


def _rows(batch) -> list[dict]:
    """A batch (numpy dict, pandas frame or pyarrow table) as row dicts."""
    if hasattr(batch, "to_pylist"):  # pyarrow
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return batch.to_dict("records")
    cols = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(cols.values()))) if cols else 0
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):  # Hugging Face Image
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):  # a decoded image
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(value).save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        return _image_bytes(value.item())
    return b""  # decode_sample turns it into a `decode` error row


def _ext(data: bytes) -> str:
    from .data import sniff_format

    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(sniff_format(data) or "", "png")


def _json_field(value) -> dict | None:
    """The row's json as a dict ({} when there is none), or None when it is unreadable."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        obj = json.loads(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _score(scores: dict, name: str, i: int):
    v = scores.get(name)
    return None if v is None else float(v[i])


def _error_row(sample) -> dict:
    from .worker import _meta_json

    row = {c: None for c in OUTPUT_COLUMNS}
    row.update(key=sample.key, source_prompt=sample.source_prompt or None, error=sample.error,
               error_type=sample.error_type or "other", kept=False, meta=_meta_json(sample))
    return row


def _append(out: dict[str, list], row: dict) -> None:
    for c in OUTPUT_COLUMNS:
        out[c].append(row.get(c))
