"""Checks of a job spec that need the model's configuration or the machine,
run once in the driver before any shard is scheduled (`executor.plan`) and by
`imprint validate`. Only configuration files are read, never weights: a spec
that would fail on the first batch (or, worse, run and give NaN scores or
silently truncated prompts) is refused up front with one message naming the
field."""

from __future__ import annotations

from .models import ModelLimits, model_limits
from .spec import JobSpec, SpecError


def preflight(spec: JobSpec) -> ModelLimits:
    """Raise SpecError naming the field when the spec cannot run with its
    model on this machine; return the model's limits."""
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
    im = spec.image
    if im.resolution and im.resolution < limits.latent_multiple:
        # below this the coarsest UNet level has less than one latent pixel
        raise SpecError(f"image.resolution: {im.resolution} is below the smallest size model {spec.model.id!r} can run "
                        f"({limits.latent_multiple} pixels: VAE factor x UNet downsampling)")
    _check_device(spec)
    return limits


def _check_device(spec: JobSpec) -> None:
    """The device must exist here when the job runs here (inline). A Ray job
    runs its workers on other machines: there the device is the workers'
    (a CPU-only driver may schedule GPU workers)."""
    device = spec.model.device
    if device in ("auto", "cpu") or spec.run.executor != "inline":
        return
    import torch

    kind, _, index = device.partition(":")
    n = 0
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    elif kind == "mps":
        n = 1 if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else 0
    elif kind == "xpu":
        n = torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    if int(index or 0) >= n:
        have = f"{n} {kind} device(s)" if n else f"no {kind} device"
        raise SpecError(f"model.device: {device!r} does not exist on this machine ({have}); use auto or cpu")
