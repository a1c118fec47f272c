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
            "prediction_type", "timestep_spacing", "rescale_betas_zero_snr",
            # FlowMatchEulerDiscreteScheduler (SD3, FLUX): what decides its sigmas
            "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
            "time_shift_type", "shift_terminal", "invert_sigmas")
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
            "extra_data": [v[0] for v in extra.values()], "zs_kind": code.zs_kind,
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
        params=json.loads(row["params"]), extra=extra, zs_kind=row.get("zs_kind") or "noise",
    )


def check_compatible(row: dict, models) -> None:
    """A stored code only makes sense with the model and schedule it was
    inverted with; say which part differs."""
    check_made_with(row["key"], row["model_id"], row["scheduler_config"], models)


def check_made_with(key: str, model_id: str, scheduler_config: str, models) -> None:
    """The check of `check_compatible` for a code that is not a stored row
    (the Python API's `Code`): the same rule and message."""
    if model_id != models.model_id:
        raise ValueError(f"code of {key!r} was made with model {model_id!r}, not {models.model_id!r}")
    ours = json.loads(scheduler_config_json(models.scheduler))
    theirs = json.loads(scheduler_config)
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"code of {key!r} was made with another scheduler configuration (differs in {', '.join(diff)})")


class CodeError(ValueError):
    """A stored code that cannot be used; its sample becomes an error row."""


# Extra tensors a method's edit cannot do without (see the method modules).
_REQUIRED_EXTRA = {"edict": ("y",)}
_ROW_FIELDS = {"key": str, "shard": str, "seed_index": int, "seed": int, "method": str, "model_id": str, "num_steps": int,
               "skip": int, "timesteps": list, "scheduler_config": str, "params": str, "source_prompt": str,
               "width": int, "height": int, "dtype": str, "x_start": bytes, "x_start_shape": list, "zs": bytes,
               "zs_shape": list}


def check_code_rows(rows: list[dict], models) -> None:
    """Everything a stored code must satisfy before it reaches the engine,
    for the rows (seeds) of one sample. The noise/ file is untrusted input:
    raise CodeError saying what is wrong instead of failing the whole file
    (or, for NaN maps, silently producing NaN images and scores)."""
    from .inversion import get_method, method_names
    from .inversion.common import Schedule

    for r in rows:
        for name, kind in _ROW_FIELDS.items():
            v = r.get(name)
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise CodeError(f"stored code: {name} must be {kind.__name__}, got {type(v).__name__} {_short(v)}")
    first = rows[0]
    shared = ("method", "num_steps", "skip", "timesteps", "params", "width", "height", "dtype", "source_prompt",
              "model_id", "scheduler_config")
    for r in rows[1:]:
        diff = [k for k in shared if r[k] != first[k]]
        if diff:
            raise CodeError(f"stored codes of one sample disagree in {', '.join(diff)}")
    if len({r["seed_index"] for r in rows}) != len(rows):
        raise CodeError("stored codes of one sample repeat a seed_index")
    check_compatible(first, models)
    method = first["method"]
    if method not in method_names():
        raise CodeError(f"stored code: unknown method {method!r} (expected one of {', '.join(method_names())})")
    train_steps = int(models.scheduler.config.num_train_timesteps)
    n, skip = first["num_steps"], first["skip"]
    if not 1 <= n <= train_steps:
        raise CodeError(f"stored code: num_steps {n} outside [1, {train_steps}] (the scheduler's training steps)")
    if not 0 <= skip < n:
        raise CodeError(f"stored code: skip {skip} outside [0, num_steps = {n})")
    try:
        params = json.loads(first["params"])
    except ValueError as exc:
        raise CodeError(f"stored code: params are not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise CodeError(f"stored code: params must be a JSON object, got {_short(params)}")
    _check_code_params(method, params)
    try:
        module = get_method(method, models.family)
    except ValueError as exc:
        raise CodeError(f"stored code: {exc}") from None
    f = models.vae_scale_factor
    w, h = first["width"], first["height"]
    if w <= 0 or h <= 0 or w % f or h % f:
        raise CodeError(f"stored code: image size {w}x{h} is not a positive multiple of the VAE factor {f}")
    kind = first.get("zs_kind") or "noise"  # codes written before the column hold noise maps
    if kind != getattr(module, "ZS_KIND", "noise") or any((r.get("zs_kind") or "noise") != kind for r in rows):
        raise CodeError(f"stored code: zs_kind {kind!r} is not what method {method!r} stores "
                        f"({getattr(module, 'ZS_KIND', 'noise')!r})")
    own_schedule = getattr(module, "code_timesteps", None)  # a method with its own timestep rule (turbo-edit)
    try:
        if models.family == "flow":  # sigmas depend on the latent's size (FLUX's resolution-dependent shift)
            from .inversion.flow import FlowSchedule

            expected = FlowSchedule.from_scheduler(models.scheduler, n, (h // f, w // f)).timesteps.tolist()[skip:]
        else:
            expected = (own_schedule(models.scheduler, n, params) if own_schedule else
                        Schedule.from_scheduler(models.scheduler, n).timesteps.tolist())[skip:]
    except ValueError as exc:
        raise CodeError(f"stored code: {exc}") from None
    if first["timesteps"] != expected:
        raise CodeError(f"stored code: timesteps do not match the schedule of {n} steps from skip {skip}")
    if first["dtype"] not in _NP:
        raise CodeError(f"stored code: dtype must be one of {', '.join(_NP)}, got {first['dtype']!r}")
    grid = [int(models.vae.config.latent_channels), h // f, w // f]
    steps = len(expected)
    # methods whose codes always hold one map per step (noise maps, or residuals)
    stochastic = "eta" in getattr(module, "DEFAULTS", {}) or kind == "residual"
    # a method whose maps are not one per step says how many its parameters give (flowedit's noise draws)
    counts = (module.code_maps(steps, params),) if hasattr(module, "code_maps") else (steps,) if stochastic else (0, steps)
    for r in rows:
        if r["x_start_shape"] != grid:
            raise CodeError(f"stored code: latent grid {r['x_start_shape']} does not match {grid} "
                            f"(the model's latents of a {w}x{h} image)")
        zs_steps = r["zs_shape"][0] if r["zs_shape"] else -1
        if r["zs_shape"][1:] != grid or zs_steps not in counts:
            raise CodeError(f"stored code: noise maps of shape {r['zs_shape']}; expected {[counts[-1], *grid]}")
        names, shapes, data = r.get("extra_names") or [], r.get("extra_shapes") or [], r.get("extra_data") or []
        if not (len(names) == len(shapes) == len(data)) or any(s != grid for s in shapes):
            raise CodeError("stored code: extra tensors do not match their names or the latent grid")
        missing = [x for x in _REQUIRED_EXTRA.get(method, ()) if x not in names]
        if missing:
            raise CodeError(f"stored code: method {method!r} needs extra tensor(s) {', '.join(missing)}")
        itemsize = np.dtype(_NP[first["dtype"]]).itemsize
        for label, blob, shape in [("x_start", r["x_start"], grid), ("zs", r["zs"], r["zs_shape"]),
                                   *[(f"extra {nm}", d, sh) for nm, d, sh in zip(names, data, shapes)]]:
            if not isinstance(blob, bytes) or len(blob) != int(np.prod(shape)) * itemsize:
                raise CodeError(f"stored code: {label} holds {len(blob) if isinstance(blob, bytes) else 'no'} bytes, "
                                f"not {int(np.prod(shape)) * itemsize} for shape {shape} in {first['dtype']}")
            if not np.isfinite(np.frombuffer(blob, dtype=_NP[first["dtype"]])).all():
                raise CodeError(f"stored code: {label} holds NaN or infinite values")


def _check_code_params(method: str, params: dict) -> None:
    from .inversion import get_method
    from .spec import SpecError, _check_param_value, _is_number

    defaults = getattr(get_method(method), "DEFAULTS", {})
    for k, v in params.items():
        if k == "manipulations":  # recorded by noise-space edits; informational
            continue
        if k == "image_geometry":  # SDXL: (orig h, w), (crop top, left), (target h, w) the code was inverted under
            if not (isinstance(v, list) and len(v) == 3 and all(
                    isinstance(p, list) and len(p) == 2 and all(type(n) is int and 0 <= n < 1 << 20 for n in p) for p in v)):
                raise CodeError(f"stored code: params.image_geometry must be [[h, w], [top, left], [h, w]] of "
                                f"non-negative integers, got {_short(v)}")
            continue
        if k == "cfg_source":
            if not _is_number(v) or v < 0:
                raise CodeError(f"stored code: params.cfg_source must be a finite number >= 0, got {_short(v)}")
            continue
        if k not in defaults:
            raise CodeError(f"stored code: params.{k} is not a parameter of method {method!r}")
        try:
            _check_param_value(f"params.{k}", k, v, defaults[k])
        except SpecError as exc:
            raise CodeError(f"stored code: {exc}") from None
    for k in defaults:
        if k == "eta" and k not in params:
            raise CodeError(f"stored code: params lack {k} (method {method!r} needs it)")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


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
