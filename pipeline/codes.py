"""Noise codes <-> `noise/` table rows: float16 (or float32) bytes with
shape and dtype columns, plus everything needed to check that a stored code
is used with the model and schedule it was made for."""

from __future__ import annotations

import json

import numpy as np
import torch

from .inversion.common import NoiseCode

_NP = {"float16": np.float16, "float32": np.float32}


def _pack(t: torch.Tensor, dtype: str) -> tuple[bytes, list[int]]:
    arr = t.detach().float().cpu().numpy().astype(_NP[dtype])
    return arr.tobytes(), list(arr.shape)


def _unpack(data: bytes, shape: list[int], dtype: str) -> torch.Tensor:
    arr = np.frombuffer(data, dtype=_NP[dtype]).reshape(shape)
    return torch.from_numpy(arr.astype(np.float32))


def scheduler_config_json(scheduler) -> str:
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset", "set_alpha_to_one",
            "prediction_type", "timestep_spacing", "rescale_betas_zero_snr")
    cfg = scheduler.config
    return json.dumps({k: cfg[k] for k in keep if k in cfg}, sort_keys=True, default=str)


def code_to_rows(code: NoiseCode, sample, seeds: list[int], models, dtype: str = "float16") -> list[dict]:
    """One row per code in the batch (per seed of one sample)."""
    rows = []
    for n in range(len(code)):
        one = code[n]
        xs, xs_shape = _pack(one.x_start[0], dtype)
        zs, zs_shape = _pack(one.zs[:, 0], dtype)
        extra = {k: _pack(v[0], dtype) for k, v in one.extra.items()}
        rows.append({
            "key": sample.key, "shard": sample.shard, "seed_index": n, "seed": seeds[n],
            "method": code.method, "model_id": models.model_id, "num_steps": code.num_steps, "skip": code.skip,
            "timesteps": [int(t) for t in code.timesteps.tolist()],
            "scheduler_config": scheduler_config_json(models.scheduler),
            "params": json.dumps(code.params, sort_keys=True), "source_prompt": sample.source_prompt,
            "width": int(sample.image.shape[2]), "height": int(sample.image.shape[1]), "dtype": dtype,
            "x_start": xs, "x_start_shape": xs_shape, "zs": zs, "zs_shape": zs_shape,
            "extra_names": list(extra), "extra_shapes": [v[1] for v in extra.values()],
            "extra_data": [v[0] for v in extra.values()],
        })
    return rows


def row_to_code(row: dict) -> NoiseCode:
    """Rebuild a batch-of-one NoiseCode from a `noise/` row (as a dict)."""
    dt = row["dtype"]
    x_start = _unpack(row["x_start"], row["x_start_shape"], dt)[None]
    zs = _unpack(row["zs"], row["zs_shape"], dt)[:, None]
    extra = {n: _unpack(d, s, dt)[None] for n, s, d in zip(row["extra_names"] or [], row["extra_shapes"] or [], row["extra_data"] or [])}
    return NoiseCode(
        x_start=x_start, zs=zs, timesteps=torch.tensor(row["timesteps"], dtype=torch.long),
        num_steps=int(row["num_steps"]), skip=int(row["skip"]), method=row["method"],
        params=json.loads(row["params"]), extra=extra,
    )


def check_compatible(row: dict, models) -> None:
    """A stored code only makes sense with the model and schedule it was
    inverted with; say which part differs."""
    if row["model_id"] != models.model_id:
        raise ValueError(f"code of {row['key']!r} was made with model {row['model_id']!r}, not {models.model_id!r}")
    ours = json.loads(scheduler_config_json(models.scheduler))
    theirs = json.loads(row["scheduler_config"])
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"code of {row['key']!r} was made with another scheduler configuration (differs in {', '.join(diff)})")


def code_shards(path: str) -> list[str]:
    """The noise/ files of a job output (or of a noise/ folder itself), sorted."""
    from .store import OutputStore

    store = OutputStore.open(path)
    files = store.table_files("noise")
    if not files:  # maybe the noise/ folder itself was given
        parent, _, name = store.root.rpartition("/")
        if name == "noise":
            files = OutputStore(store.fs, parent).table_files("noise")
    if not files:
        raise ValueError(f"input.codes: no noise/*.parquet files under {path!r} (was the job run with output.noise = true?)")
    prefix = "" if "://" not in path else path.split("://", 1)[0] + "://"
    return [prefix + f if prefix and not f.startswith(prefix) else f for f in files]


def read_code_rows(url: str):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if "://" in url:
        fs, path = pafs.FileSystem.from_uri(url)
    else:
        fs, path = pafs.LocalFileSystem(), url
    table = pq.read_table(path, filesystem=fs)
    for batch in table.to_batches(max_chunksize=16):
        yield from batch.to_pylist()
