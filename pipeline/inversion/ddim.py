"""Deterministic DDIM inversion and DDIM (eta = 0) editing.

invert: walk the schedule upwards from x0, x_next = sqrt(ab_next) x0_hat(x) +
sqrt(1 - ab_next) eps_hat(x), with eps evaluated at the CURRENT latent and
the destination timestep. The exact inverse would need eps at the
destination latent, which is unknown; the approximation drifts with few
steps and large guidance (ALGORITHMS.md section 3). Only the
num_steps - skip steps an edit runs are inverted; the code's x_start is the
latent at T[skip] and its zs are empty ([0, B, C, H, W]): the sampler is
deterministic, so one image has one code and `generator` is ignored.

edit: DDIM sampling (eta = 0) from x_start with the target prompt.

`invert_steps` and `denoise_steps` are the two walks, shared with
`ddim_forward`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .common import (
    EpsModel,
    Generator,
    NoiseCode,
    Schedule,
    as_eps_model,
    check_code_method,
    ddim_step,
    empty_zs,
    guided,
    mean_from,
    prepare_edit,
    prepare_inversion,
    scale_on,
)

METHOD = "ddim"
DEFAULTS: dict = {}
# No noise is drawn: every seed gives the same code, so a batch engine
# inverts and edits each image once and replicates the rows for its seeds.
SEED_INDEPENDENT = True


def invert_steps(
    model: EpsModel,
    schedule: Schedule,
    x: torch.Tensor,
    first: int,
    last: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg_scale: float | torch.Tensor,
) -> torch.Tensor:
    """Undo generative steps first, first - 1, ..., last (schedule indices,
    so timesteps ascend): `x` is at level ab_prev[first], the result at
    level ab[last]. No steps when first < last. Only eps is used (x0 is
    re-derived at the current level ab_prev[i] > 0), so a zero-SNR last
    level (ab = 0) is reached finitely."""
    scale = scale_on(cfg_scale, x.shape[0], x.device)
    for i in range(first, last - 1, -1):
        eps = guided(model, x, i, cond, uncond, scale).eps
        x = ddim_step(x, eps, float(schedule.ab_prev[i]), float(schedule.ab[i]))
    return x


def denoise_steps(
    model: EpsModel,
    schedule: Schedule,
    x: torch.Tensor,
    first: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    cfg_scale: float | torch.Tensor,
) -> torch.Tensor:
    """DDIM (eta = 0) generative steps first, ..., num_steps - 1, from the
    model's (x0, eps)."""
    scale = scale_on(cfg_scale, x.shape[0], x.device)
    for i in range(first, schedule.num_steps):
        pred = guided(model, x, i, cond, uncond, scale)
        x = mean_from(pred.x0, pred.eps, float(schedule.ab_prev[i]), 0.0)
    return x


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
    cfg_scale: float = 1.0,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """DDIM-invert latents `x0` [B, C, H, W] up to timestep T[skip] with the
    source prompt (num_steps - skip guided UNet evaluations). `generator` is
    accepted for a uniform API and ignored: the inversion is deterministic."""
    schedule = prepare_inversion(scheduler, x0, num_steps, skip)
    model = as_eps_model(unet, schedule, max_batch)
    x0 = x0.float().contiguous()
    x_start = invert_steps(model, schedule, x0, num_steps - 1, skip, cond, uncond, cfg_scale)
    return NoiseCode.from_schedule(schedule, skip, x_start, empty_zs(x0), METHOD,
        {"cfg_source": float(cfg_scale)})


@torch.no_grad()
def edit(
    unet: Callable,
    scheduler,
    code: NoiseCode,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    cfg_scale: float | torch.Tensor = 7.5,
    max_batch: int | None = None,
) -> torch.Tensor:
    """DDIM-sample (eta = 0) from `code.x_start` with the target prompt
    `cond` (1 row, or one per code latent). Reads codes of `ddim` and
    `ddim-forward`. Returns latents [B, C, H, W] in float32."""
    check_code_method(code, METHOD, "ddim-forward")
    schedule = prepare_edit(scheduler, code)
    model = as_eps_model(unet, schedule, max_batch)
    return denoise_steps(model, schedule, code.x_start.float(), code.skip, cond, uncond, cfg_scale)
