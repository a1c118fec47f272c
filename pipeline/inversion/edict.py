"""EDICT: exact inversion with two coupled sequences (Wallace, Gokul, Naik,
arXiv 2211.12446).

Generative step i (t = T[i], a = sqrt(ab_prev / ab), b = sqrt(1 - ab_prev)
- a sqrt(1 - ab)) updates x and y affinely, each with eps evaluated at the
OTHER sequence, alternating which goes first (leapfrog), then mixes them:

    j even:  x <- a x + b eps(y, t);  y <- a y + b eps(x, t)
    j odd:   y <- a y + b eps(x, t);  x <- a x + b eps(y, t)
    then     x <- p x + (1 - p) y;    y <- p y + (1 - p) x

where j = i - skip counts the steps actually run, from 0 at the first one
(as salesforce/EDICT and the diffusers community pipeline count it; an
absolute index would make an odd `skip` a different method).

Every update changes one sequence using only the other, so each is undone
exactly by recomputing the same eps at the same input. Inversion starts
from x = y = x0 and undoes steps num_steps - 1, ..., skip in exact reverse
order; which update to undo first comes from the GENERATIVE parity j of the
step being undone, so reconstruction is exact up to float rounding for any
step count and any skip (taking it from the inversion's own loop index
instead is exact only when the number of steps run is even); with `float64` the latents
and coefficients are float64 (the UNet still runs in its own dtype: its
inputs round to the same values in both directions, so the same eps comes
back) and the error is about 1e-15 on the tiny model.

The code holds x in x_start and y in extra["y"]; zs is empty. No noise is
drawn (`generator` is ignored): one code per (image, source prompt).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .common import (
    EpsModel,
    Generator,
    NoiseCode,
    Schedule,
    as_eps_model,
    check_code_method,
    empty_zs,
    guided,
    prepare_edit,
    prepare_inversion,
    scale_on,
)

METHOD = "edict"
# mix: p of the mixing layer (paper: 0.93); float64: latent math in float64
# (the reference runs float64).
DEFAULTS: dict = {"mix": 0.93, "float64": True}
# No noise is drawn: every seed gives the same code, so a batch engine
# inverts and edits each image once and replicates the rows for its seeds.
SEED_INDEPENDENT = True


def step_coefficients(ab: float, ab_prev: float) -> tuple[float, float]:
    """(a, b) of the affine DDIM update x <- a x + b eps from level ab to ab_prev."""
    a = math.sqrt(ab_prev / ab)
    return a, math.sqrt(1.0 - ab_prev) - a * math.sqrt(1.0 - ab)


def _check_signal(schedule: Schedule, first: int) -> None:
    if float(schedule.ab[first]) <= 0.0:
        raise ValueError(
            f"timestep {int(schedule.timesteps[first])} has zero signal (alphas_cumprod = 0, a zero-terminal-SNR "
            "schedule): EDICT's step divides by sqrt(alphas_cumprod) there; use skip >= 1"
        )


def _eps(model: EpsModel, v: torch.Tensor, i: int, cond, uncond, cfg_scale) -> torch.Tensor:
    return guided(model, v, i, cond, uncond, cfg_scale).eps.to(v.dtype)


def denoise_step(model, schedule, i, x, y, cond, uncond, cfg_scale, mix, first=0):
    """Generative step i on the pair (x, y); `first` is the index of the
    first step run (the leapfrog parity is that of i - first)."""
    a, b = step_coefficients(float(schedule.ab[i]), float(schedule.ab_prev[i]))
    if (i - first) % 2 == 0:
        x = a * x + b * _eps(model, y, i, cond, uncond, cfg_scale)
        y = a * y + b * _eps(model, x, i, cond, uncond, cfg_scale)
    else:
        y = a * y + b * _eps(model, x, i, cond, uncond, cfg_scale)
        x = a * x + b * _eps(model, y, i, cond, uncond, cfg_scale)
    x = mix * x + (1.0 - mix) * y
    y = mix * y + (1.0 - mix) * x
    return x, y


def invert_step(model, schedule, i, x, y, cond, uncond, cfg_scale, mix, first=0):
    """Exact inverse of `denoise_step` for the same i and first."""
    a, b = step_coefficients(float(schedule.ab[i]), float(schedule.ab_prev[i]))
    y = (y - (1.0 - mix) * x) / mix
    x = (x - (1.0 - mix) * y) / mix
    if (i - first) % 2 == 0:
        y = (y - b * _eps(model, x, i, cond, uncond, cfg_scale)) / a
        x = (x - b * _eps(model, y, i, cond, uncond, cfg_scale)) / a
    else:
        x = (x - b * _eps(model, y, i, cond, uncond, cfg_scale)) / a
        y = (y - b * _eps(model, x, i, cond, uncond, cfg_scale)) / a
    return x, y


def _check_mix(mix: float) -> None:
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"mix must be in (0, 1], got mix={mix!r}")


@torch.no_grad()
def invert(
    unet: Callable,
    scheduler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    num_steps: int,
    skip: int = 0,
    cfg_scale: float = 3.0,
    mix: float = 0.93,
    float64: bool = True,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """Invert latents `x0` [B, C, H, W] up to T[skip] with the source prompt:
    2 guided UNet evaluations per step, num_steps - skip steps. The code's
    latents are float64 when `float64`, else float32."""
    schedule = prepare_inversion(scheduler, x0, num_steps, skip)
    _check_signal(schedule, skip)
    _check_mix(mix)
    model = as_eps_model(unet, schedule, max_batch)
    x = x0.to(torch.float64 if float64 else torch.float32).contiguous()
    y = x
    scale = scale_on(cfg_scale, x.shape[0], x.device)
    for i in range(num_steps - 1, skip - 1, -1):
        x, y = invert_step(model, schedule, i, x, y, cond, uncond, scale, mix, first=skip)
    return NoiseCode.from_schedule(schedule, skip, x, empty_zs(x), METHOD,
        {"mix": float(mix), "float64": bool(float64), "cfg_source": float(cfg_scale)}, extra={"y": y})


@torch.no_grad()
def edit(
    unet: Callable,
    scheduler,
    code: NoiseCode,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    cfg_scale: float | torch.Tensor = 3.0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Run the coupled sampler from the code's (x, y) with the target prompt
    and the code's mix. Returns the x sequence's final latents [B, C, H, W]
    in the code's precision (float64 for float64 codes, so reconstruction
    can be checked to the last digit; `.float()` for decoding)."""
    check_code_method(code, METHOD)
    if "y" not in code.extra:
        raise ValueError("EDICT code lacks its second sequence extra['y']")
    schedule = prepare_edit(scheduler, code)
    _check_signal(schedule, code.skip)
    model = as_eps_model(unet, schedule, max_batch)
    dtype = torch.float64 if code.params.get("float64", True) else torch.float32
    mix = float(code.params["mix"])
    x, y = code.x_start.to(dtype), code.extra["y"].to(code.x_start.device, dtype)
    scale = scale_on(cfg_scale, x.shape[0], x.device)
    for i in range(code.skip, code.num_steps):
        x, y = denoise_step(model, schedule, i, x, y, cond, uncond, scale, mix, first=code.skip)
    return x
