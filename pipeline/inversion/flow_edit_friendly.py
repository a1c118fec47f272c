"""Edit-friendly inversion for rectified-flow models (SD3/SD3.5, FLUX.1): the
paper's Eq. 6 with the flow's marginal, so a real image gets stored noise
maps that reconstruct it exactly and N inversions give N different codes.

The sampler it inverts is the stochastic flow step (see `flow`):

    x' = a' x0_hat + sqrt(sigma'^2 - s^2) eps_hat + s z,
    x0_hat = x - sigma v_hat,  eps_hat = x + (1 - sigma) v_hat,  a' = 1 - sigma',

with s = eta x the posterior std of the flow's noising process (eta = 1 is
DDPM's analogue).

invert: draw every x_sigma_i = (1 - sigma_i) x0 + sigma_i eps_i
independently from the image (as edit-friendly inversion does; not a
chain). Since no x depends on a model output, the model calls of all steps
have no order and run as ONE batch (rows = steps x latents, one sigma per
row, chunked by max_batch). Then per step

    z_i = (x_sigma_{i+1} - mu_i) / s_i,

and at the last step (sigma' = 0, where s = 0) the additive residual
x0 - x0_hat is stored instead of a z, as TurboEdit does, so the sampler
driven by the stored maps walks through the x_sigma's and lands on x0.

edit: run the sampler from x_start with the stored maps under the target
prompt (1 row, or one per code row); skip and N codes behave as for SD.
"""

from __future__ import annotations

from typing import Callable

import torch

from .common import Conditioning, Generator, NoiseCode, check_latents, check_skip, draw_noise, expand_rows
from .flow import (ZS_FLOW, FlowSchedule, VelocityModel, code_schedule, flow_sample, scale_rows,
                   step_mean, velocity)

METHOD = "edit-friendly"
DEFAULTS: dict = {"eta": 1.0}
SEED_INDEPENDENT = False
FAMILIES = ("flow",)
ZS_KIND = ZS_FLOW


@torch.no_grad()
def invert(
    net: Callable,
    scheduler,
    x0: torch.Tensor,
    cond,
    uncond,
    *,
    num_steps: int,
    skip: int = 0,
    cfg_scale: "float | torch.Tensor" = 1.0,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """Invert latents `x0` [B, C, H, W] into an edit-friendly flow code.

    noise: optional draws [num_steps - skip, B, C, H, W] of the eps_i of
    x_sigma_i for the steps skip .. num_steps - 1 (in schedule order: index 0
    is the first edit step, the noisiest). Without it they come from
    `generator` (one, or one per latent). cfg_scale: the source guidance
    (CFG, or FLUX-dev's embedded guidance)."""
    check_latents(x0)
    schedule = FlowSchedule.from_scheduler(scheduler, num_steps, tuple(x0.shape[-2:]))
    check_skip(skip, num_steps)
    if not eta > 0:
        raise ValueError(f"edit-friendly inversion needs eta > 0 (s divides), got eta={eta}")
    x0 = x0.float().contiguous()
    b, n = x0.shape[0], num_steps - skip
    shape = (n, b, *x0.shape[1:])
    if noise is None:
        noise = draw_noise(shape, generator, device=x0.device, batch_dim=1)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} (num_steps - skip, B, C, H, W), got {tuple(noise.shape)}")
    noise = noise.to(x0.device, torch.float32)
    for i in range(skip, num_steps - 1):
        if schedule.posterior_std(i, eta) <= 0:
            raise ValueError(f"step {i} (sigma {schedule.sigma(i):.6f} -> {schedule.sigma(i + 1):.6f}) has zero "
                             "posterior variance, so its noise map is undefined")

    model = VelocityModel(net, schedule, max_batch)
    sig = schedule.sigmas[skip:num_steps].to(x0.device, torch.float32)  # [n]
    xs = flow_sample(x0[None], sig.view(n, 1, 1, 1, 1), noise)  # [n, B, C, H, W], independent draws
    # every step's model call in one batch: row (j, k) = step j, latent k
    rows = xs.reshape(n * b, *x0.shape[1:])
    sig_rows = sig.repeat_interleave(b)
    cond_rows = Conditioning.cat([expand_rows(cond, b, "cond")] * n)
    uncond_rows = None if uncond is None else Conditioning.cat([expand_rows(uncond, b, "uncond")] * n)
    scale = scale_rows(cfg_scale, b, x0.device)
    scale = scale.repeat(n) if torch.is_tensor(scale) else scale
    v = velocity(model, rows, sig_rows, cond_rows, uncond_rows, scale).view(n, b, *x0.shape[1:])

    zs = torch.empty_like(xs)
    for j, i in enumerate(range(skip, num_steps)):
        sigma, sigma_next = schedule.sigma(i), schedule.sigma(i + 1)
        s = schedule.posterior_std(i, eta)
        mu = step_mean(xs[j], v[j], sigma, sigma_next, s)
        target = xs[j + 1] if j + 1 < n else x0
        # s = 0 only at the last step (sigma' = 0): keep the residual itself
        zs[j] = (target - mu) / s if s > 0 else target - mu
    return NoiseCode(x_start=xs[0].contiguous(), zs=zs, timesteps=schedule.timesteps[skip:].clone(),
                     num_steps=num_steps, skip=skip, method=METHOD,
                     params={"eta": float(eta), "cfg_source": float(cfg_scale) if not torch.is_tensor(cfg_scale)
                             else float(cfg_scale.flatten()[0])},
                     zs_kind=ZS_FLOW)


@torch.no_grad()
def edit(
    net: Callable,
    scheduler,
    code: NoiseCode,
    cond,
    uncond,
    *,
    cfg_scale: "float | torch.Tensor" = 1.0,
    eta: float | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Run the stochastic flow sampler from `code.x_start` with the code's
    maps under `cond` (1 row, or one per code row). Returns float32 latents.
    eta defaults to the one the code was inverted with."""
    if code.zs_kind != ZS_FLOW:
        raise ValueError(f"code of method {code.method!r} holds {code.zs_kind} maps; the flow sampler reads "
                         "edit-friendly flow codes (made on a flow model)")
    eta = float(code.params.get("eta", 1.0)) if eta is None else float(eta)
    schedule = code_schedule(scheduler, code)
    model = VelocityModel(net, schedule, max_batch)
    x = code.x_start.float()
    scale = scale_rows(cfg_scale, x.shape[0], x.device)
    for j, i in enumerate(range(code.skip, code.num_steps)):
        sigma, sigma_next = schedule.sigma(i), schedule.sigma(i + 1)
        s = schedule.posterior_std(i, eta)
        v = velocity(model, x, model.sigma_on(i, x.device), cond, uncond, scale)
        z = code.zs[j].to(x.device, torch.float32)
        x = step_mean(x, v, sigma, sigma_next, s) + (s * z if s > 0 else z)
    return x
