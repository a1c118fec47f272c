"""Everything checked before any work, by `imprint run` (`executor.plan`, in
the driver, before the output path is claimed) and by `imprint validate`
(the same function, so what validate passes, run starts):

- the model resolves and the spec fits it (steps, prompt context, image size
  against the UNet's downsampling and the LPIPS trunk), from its configuration
  files only;
- the device exists where the workers run when that is here (inline jobs,
  and Ray jobs on the local cluster imprint starts);
- pretrained weights of the model and the scorers are at hand: present in the
  cache while the hub is offline (`HF_HUB_OFFLINE=1`), scorer weights cached
  or their source answering within seconds (else every worker would spend
  minutes in download retries), shipped files present; no weights are loaded;
- the input: the shard patterns list to shards that exist and the first one
  opens as a tar (or, for edit-codes jobs, the codes folder holds noise files);
- the output path is free or holds results of this spec.

A failure is one error naming the field (exit 2): SpecError for the spec
against the model and machine, JobError for the input and output. What it
found (the shards, the spec's hash, the output store it opened and the hash
in its job.json) is what `run` goes on with: the spec is hashed and the
output opened once per run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .models import ModelLimits, model_limits
from .spec import JobSpec, SpecError

if TYPE_CHECKING:
    from .store import OutputStore

# Smallest image side (pixels) each LPIPS trunk can score: below it a pooling
# layer has no output ("Output size is too small"). Measured on lpips 0.1's
# trunks; tests/test_preflight.py checks both sides of every bound.
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16, "squeeze": 17}


class JobError(RuntimeError):
    """A job that cannot start; the message says why."""


@dataclass(frozen=True)
class Preflight:
    limits: ModelLimits
    shards: list[str]  # the job's input files (tar shards, or noise files of an edit-codes job)
    spec_hash: str
    store: "OutputStore"  # the output, opened once: read by the checks here, claimed by executor.plan
    output_hash: str | None  # the spec hash in the output's job.json (None: there is none)


def preflight(spec: JobSpec, force: bool = False) -> Preflight:
    """Raise SpecError naming the field when the job cannot start; return
    the model's limits and the input's shards. `force`: the output may hold
    another spec's results (run --force moves them aside)."""
    limits = check_model(spec)
    _check_device(spec)
    shards = _check_input(spec)  # the user's own data first; weights are the machine's
    _check_weights(spec)
    spec_hash = spec.hash()
    store, output_hash = _check_output(spec, spec_hash, force)
    return Preflight(limits, shards, spec_hash, store, output_hash)


def check_model(spec: JobSpec) -> ModelLimits:
    """The spec against its model's configuration (no weights, no input)."""
    try:
        limits = model_limits(spec.model.id, spec.model.revision or None)
    except ValueError as exc:
        raise SpecError(f"model.id: {exc}") from None
    steps = spec.inversion.steps
    if steps > limits.num_train_timesteps:
        raise SpecError(f"inversion.steps: {steps} is more than the scheduler's {limits.num_train_timesteps} training "
                        f"steps (model {spec.model.id!r})")
    if spec.input.max_prompt_tokens > limits.text_context:
        raise SpecError(f"input.max_prompt_tokens: {spec.input.max_prompt_tokens} is more than the text encoder's context "
                        f"of {limits.text_context} tokens (longer prompts would be truncated silently)")
    _check_size(spec, limits)
    guidance = None
    if limits.family == "flow":
        from .models.flow import guidance_embedded

        guidance = guidance_embedded(spec.model.id, spec.model.revision or None)
    check_family(spec, limits.family, guidance)
    return limits


def check_family(spec: JobSpec, family: str, guidance_embedded: bool | None = None) -> None:
    """What the model's family cannot run, refused with the field: a method
    without a module for the family (EDICT on flows, FlowEdit on SD), and on
    flow models (SD3/FLUX) Prompt-to-Prompt (it edits a UNet's
    cross-attention; flows have joint attention), noise-space strokes (they
    act on DDPM noise maps), and guidance on a FLUX model without a guidance
    embedding (FLUX-schnell is guidance-distilled: cfg must be 1).
    `guidance_embedded`: the flow model's (True FLUX-dev, False FLUX-schnell,
    None SD3); the engine checks a loaded model with the same function."""
    from .inversion import FAMILY_NAMES, get_method

    for name in spec.inversion.methods:
        try:
            get_method(name, family)
        except ValueError as exc:
            raise SpecError(f"inversion.method: {exc} (model {spec.model.id!r})") from None
    if family != "flow":
        return
    family = FAMILY_NAMES[family]
    if "p2p" in spec.edit.controls:
        raise SpecError(f"edit.control: Prompt-to-Prompt replaces a UNet's cross-attention maps; {family} attend "
                        f"jointly over text and image tokens, which imprint does not control: use control = \"none\"")
    if spec.manipulate.strokes:
        raise SpecError(f"manipulate.strokes: colour strokes act on DDPM noise maps; {family} are not supported")
    if guidance_embedded is False:
        for v in spec.variants():
            for name, value in (("inversion.cfg_source", v.cfg_source), ("edit.cfg_target", v.cfg_target)):
                if value != 1.0:
                    raise SpecError(f"{name}: model {spec.model.id!r} takes no guidance (a FLUX model without a "
                                    f"guidance embedding, e.g. FLUX.1-schnell): set it to 1, got {value!r}")


def _check_size(spec: JobSpec, limits: ModelLimits) -> None:
    """The shorter image side (image.resolution, or the model's native size)
    must give latents the UNet can downsample to its coarsest level, and
    images the LPIPS trunk can pool (it scores at the native size)."""
    im = spec.image
    side = im.resolution or limits.resolution
    need, why = limits.latent_multiple, f"model {spec.model.id!r} needs {limits.latent_multiple} (VAE factor x UNet downsampling)"
    if spec.score.enabled and LPIPS_MIN_SIDE.get(spec.score.lpips_net, 0) > need:
        need = LPIPS_MIN_SIDE[spec.score.lpips_net]
        why = f"the LPIPS {spec.score.lpips_net!r} trunk needs {need} pixels"
    if side >= need:
        return
    smallest = -(-need // im.multiple) * im.multiple  # the smallest multiple of image.multiple that works
    field = "image.resolution" if im.resolution else "image.resolution (0: the model's native size)"
    raise SpecError(f"{field}: images of {side} pixels are too small ({why}); the smallest size that works "
                    f"with image.multiple = {im.multiple} is image.resolution = {smallest}")


def _check_device(spec: JobSpec) -> None:
    """The device must exist here when the job's workers run here: inline,
    or on the local Ray cluster imprint starts (it has this machine's GPUs
    only, so a worker asking for a GPU there would wait for
    run.placement_timeout_s for a node that never comes). A job that joins
    an existing cluster (run.ray_address, or $RAY_ADDRESS inside `ray job
    submit`) runs its workers on other machines: there the device is the
    workers' (a CPU-only driver may schedule GPU workers)."""
    device = spec.model.device
    if spec.run.executor != "inline" and joins_existing_cluster(spec):
        return
    where = "this machine" if spec.run.executor == "inline" else \
        "this machine (the local Ray cluster imprint starts has this machine's devices only)"
    join = "" if spec.run.executor == "inline" else ", or join a cluster that has it (run.ray_address)"
    if device not in ("auto", "cpu"):
        kind, _, index = device.partition(":")
        n = device_count(kind)
        if int(index or 0) >= n:
            have = f"{n} {kind} device(s)" if n else f"no {kind} device"
            raise SpecError(f"model.device: {device!r} does not exist on {where} ({have}); use auto or cpu{join}")
    gpus = spec.run.gpus_per_worker
    if spec.run.executor != "inline" and gpus and device_count("cuda") < gpus:
        raise SpecError(f"run.gpus_per_worker: {gpus:g} GPU(s) per worker, and {where} has "
                        f"{device_count('cuda')}; unset it (or 0){join}")


def joins_existing_cluster(spec: JobSpec) -> bool:
    """Whether a Ray job joins a running cluster rather than starting a local
    one (the choice ray_adapter._run_ray and _connect make): this process is
    already connected to one (a notebook, a test's cluster), or
    run.ray_address / RAY_ADDRESS names one."""
    import sys

    ray = sys.modules.get("ray")  # (not imported here only to ask: an unconnected process has not imported it)
    connected = ray is not None and ray.is_initialized()
    return bool(connected or spec.run.ray_address or os.environ.get("RAY_ADDRESS", ""))


def device_count(kind: str) -> int:
    """Devices of a torch device type on this machine (0 for unknown types)."""
    import torch

    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else 0
    if kind == "xpu":
        return torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    return 0


def _check_weights(spec: JobSpec) -> None:
    from .models import missing_model_weights

    problem = missing_model_weights(spec.model.id, spec.model.revision or None)
    if problem:
        raise SpecError(f"model.id: {problem}")
    if spec.score.enabled:
        from .scoring import missing_weights
        from .spec import score_config

        missing = missing_weights(score_config(spec))
        if missing:
            raise SpecError(f"{missing[0]}: {missing[1]}")


def _check_input(spec: JobSpec) -> list[str]:
    """The shards (listings only), and the first one opened as a tar."""
    if spec.input.codes:
        from .codes import code_shards

        try:
            return code_shards(spec.input.codes)
        except (ValueError, OSError) as exc:
            raise JobError(_field(str(exc), "input.codes")) from None
    from .data import expand_shards, missing_shards

    try:
        shards = expand_shards(spec.input.shards, allow_pipe=spec.input.allow_pipe)
    except (ValueError, OSError) as exc:
        raise JobError(_field(str(exc), "input.shards")) from None
    if not shards:
        raise JobError("input.shards: the patterns expand to no shards")
    missing = missing_shards(shards)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise JobError(f"input.shards: shard not found: {missing[0]}{more}")
    _open_first(shards[0], spec.input.allow_pipe)
    return shards


def _open_first(url: str, allow_pipe: bool) -> None:
    """Open the first shard and read its first sample: a file that is not a
    tar stops the job here instead of failing every shard max_attempts
    times. Only local and object-store shards are opened (reading an http
    URL or running a pipe: command belongs to the workers)."""
    from .data import OBJECT_STORE_SCHEMES, read_raw_samples, url_scheme

    if url_scheme(url) not in ("", *OBJECT_STORE_SCHEMES):
        return
    samples = read_raw_samples(url, allow_pipe=allow_pipe)
    try:
        next(samples, None)
    except OSError as exc:
        raise JobError(f"input.shards: {exc}") from None
    finally:
        samples.close()


def _check_output(spec: JobSpec, spec_hash: str, force: bool) -> "tuple[OutputStore, str | None]":
    """The output path is free, or holds this spec's results, or `force`
    (results of another spec are moved aside). Read only: the path is
    claimed by `OutputStore.prepare` once every check passed. Returns the
    store and the spec hash in its job.json."""
    from .store import OutputError, OutputStore

    store = OutputStore.open(spec.output.path)
    try:
        old = store.current_hash()
    except OutputError as exc:  # job.json there but unreadable: refuse, decide nothing from it (--force too)
        raise JobError(str(exc)) from None
    if not force and old and old != spec_hash and holds_results(store):
        raise JobError(f"output.path: {spec.output.path!r} holds results of another job spec (hash {old}, this one "
                        f"{spec_hash}); use a new output path, or run --force to move them aside and redo every shard")
    return store, old


def holds_results(store) -> bool:
    """Whether an output holds anything of its spec: a done or failed marker,
    or a table file. A run that stopped before committing anything (a worker
    that could not start) leaves none, so its job.json does not keep the
    path from a corrected spec."""
    from .store import DONE, FAILED
    from .tables import TABLES

    return any(_has_files(store, d) for d in (DONE, FAILED, *TABLES))


def _has_files(store, rel: str) -> bool:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store._p(rel), recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException):
        return True  # unreadable: assume it holds results (never take over what cannot be checked)
    return any(i.type == pafs.FileType.File for i in infos)


def _field(message: str, field: str) -> str:
    return message if message.startswith(field) else f"{field}: {message}"
