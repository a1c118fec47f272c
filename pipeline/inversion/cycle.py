"""CycleDiffusion inversion (Wu and De la Torre, arXiv 2210.05559): noise
maps from a Markov chain of forward-process posterior samples.

invert: x at T[skip] is drawn from q(x_t | x0); then each step draws
x_prev from the DDIM-eta posterior given the TRUE x0 (the DDIM mean with
eps = predict_eps(x_t, x0), plus sigma_t n with sigma_t = eta sqrt(var))
and extracts z_t = (x_prev - mu_theta(x_t; source prompt)) / sigma_t, as
edit-friendly's Eq. 5 does. The last step lands on x0 itself (as in
edit-friendly, not on a posterior sample at level final_alpha_cumprod), so
the sampler driven by the z's reconstructs x0 exactly with the source
prompt. Unlike edit-friendly's independent x_t's, the chain makes the z's
close to iid N(0, I) at high noise ("native" statistics, which is why they
edit worse: edit-friendly paper App. B); at low noise with a small eta they
grow and correlate, because sigma_t is small there.

edit: the edit-friendly sampler with the code's eta and z's
(`edit_friendly.edit`). Each inversion draws a new chain: diverse codes.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import edit_friendly
from .common import (
    Generator,
    NoiseCode,
    as_eps_model,
    check_code_method,
    draw_noise,
    guided,
    mean_from,
    predict_eps,
    prepare_inversion,
    q_sample,
    scale_on,
)

METHOD = "cycle"
# eta: sigma_t = eta * sqrt(posterior variance) of the chain and the sampler.
DEFAULTS: dict = {"eta": 0.1}
# Each seed draws its own chain: N seeds are N different codes.
SEED_INDEPENDENT = False


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
    eta: float = 0.1,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """Invert latents `x0` [B, C, H, W] into CycleDiffusion noise maps for
    the num_steps - skip steps from T[skip] (one guided UNet evaluation per
    step). The chain's draws come from `generator` (one, or one per latent)."""
    schedule = prepare_inversion(scheduler, x0, num_steps, skip)
    if not eta > 0:
        raise ValueError(f"cycle inversion needs eta > 0 (sigma_t divides), got eta={eta}; use method 'ddim' for eta = 0")
    for i in range(skip, num_steps):
        if schedule.sigma(i, eta) <= 0:
            raise ValueError(
                f"step {i} (timestep {int(schedule.timesteps[i])}) has zero posterior variance, so its noise map is "
                "undefined; use a scheduler with steps_offset >= 1 or set_alpha_to_one=True"
            )
    model = as_eps_model(unet, schedule, max_batch)
    x0 = x0.float().contiguous()
    scale = scale_on(cfg_scale, x0.shape[0], x0.device)
    steps = num_steps - skip
    # noise[0] starts the chain at T[skip]; noise[j] is the posterior draw of
    # edit step j - 1 (the last step lands on x0 and draws nothing).
    noise = draw_noise((steps, *x0.shape), generator, device=x0.device, batch_dim=1)
    x_start = q_sample(x0, float(schedule.ab[skip]), noise[0])
    x_t = x_start
    zs = torch.empty((steps, *x0.shape), dtype=torch.float32, device=x0.device)
    for j, i in enumerate(range(skip, num_steps)):
        ab, ab_prev = float(schedule.ab[i]), float(schedule.ab_prev[i])
        sigma = schedule.sigma(i, eta)
        if i + 1 < num_steps:
            # the posterior given the true x0 (no division by sqrt(ab): finite at a zero-SNR first step)
            x_prev = mean_from(x0, predict_eps(x_t, x0, ab), ab_prev, sigma) + sigma * noise[j + 1]
        else:
            x_prev = x0
        pred = guided(model, x_t, i, cond, uncond, scale)
        mu = mean_from(pred.x0, pred.eps, ab_prev, sigma)
        zs[j] = (x_prev - mu) / sigma
        # continue from what the sampler will compute, so rounding never accumulates
        x_t = mu + sigma * zs[j]
    return NoiseCode.from_schedule(schedule, skip, x_start, zs, METHOD,
        {"eta": float(eta), "cfg_source": float(cfg_scale)})


@torch.no_grad()
def edit(
    unet: Callable,
    scheduler,
    code: NoiseCode,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    cfg_scale: float = 2.0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """The edit-friendly sampler with the code's eta and noise maps and the
    target prompt. Returns latents [B, C, H, W] in float32."""
    check_code_method(code, METHOD)
    return edit_friendly.edit(
        unet, scheduler, code, cond, uncond, cfg_scale=cfg_scale, eta=code.params["eta"], max_batch=max_batch
    )
