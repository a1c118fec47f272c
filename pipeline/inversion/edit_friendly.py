"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov, Michaeli,
CVPR 2024, Algorithm 1) and editing from its noise maps.

invert: draw every x_t independently from q(x_t | x0) (Eq. 6, not a Markov
chain), then extract z_t = (x_{t-1} - mu_t(x_t)) / sigma_t (Eq. 5) so that
the DDPM sampler driven by those z's walks exactly through the x_t's and
lands on x0.

Departures from the public reference code, each on purpose:
- z_1 (the last step) is kept, so reconstruction is exact (its issue #13).
- x_{t-1} is re-set to mu_t + sigma_t z_t after each extraction so float
  rounding never accumulates (its issue #15).
- sigma_t carries eta and the direction term uses eta^2 var (its issue #12).
- Only the num_steps - skip steps an edit uses are computed; the z's of the
  first `skip` steps would never be read.
- Batches of images and of noise draws run together, guidance as one UNet
  call on [uncond; cond]; noise comes from explicit generators.
"""

from __future__ import annotations

from typing import Callable

import torch

from .common import (
    Generator,
    NoiseCode,
    Schedule,
    Prediction,
    as_eps_model,
    draw_noise,
    guided,
    mean_from,
    prepare_edit,
    prepare_inversion,
    q_sample,
    scale_on,
)

METHOD = "edit-friendly"
DEFAULTS: dict = {"eta": 1.0}
# Each seed draws its own noise: N seeds are N different codes.
SEED_INDEPENDENT = False

# on_step(schedule_index, x_t, prediction, z) -> replacement z or None (see `edit`)
StepHook = Callable[[int, torch.Tensor, Prediction, torch.Tensor], "torch.Tensor | None"]


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
    cfg_scale: float = 3.5,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """Invert latents `x0` [B, C, H, W] into an edit-friendly noise code.

    noise: optional Eq. 6 draws [num_steps, B, C, H, W]; index 0 belongs to
    the smallest timestep (t = 1) and the index grows with t. Without it the
    draws come from `generator` (one generator, or one per batch element):
    only the num_steps - skip draws the steps from T[skip] use (indices
    0 .. num_steps - skip - 1), bit-identical to those of the full draw.
    """
    schedule = prepare_inversion(scheduler, x0, num_steps, skip)
    if not eta > 0:
        raise ValueError(f"edit-friendly inversion needs eta > 0 (sigma_t divides), got eta={eta}; use method 'ddim' for eta = 0")
    x0 = x0.float().contiguous()
    b = x0.shape[0]
    shape = (num_steps, b, *x0.shape[1:])
    if noise is None:
        noise = draw_noise(shape, generator, device=x0.device, batch_dim=1, leading=num_steps - skip)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} (num_steps, B, C, H, W), got {tuple(noise.shape)}")
    noise = noise.to(device=x0.device, dtype=torch.float32)
    for i in range(skip, num_steps):
        if schedule.sigma(i, eta) <= 0:
            raise ValueError(
                f"step {i} (timestep {int(schedule.timesteps[i])}) has zero posterior variance, so its noise map is "
                "undefined; use a scheduler with steps_offset >= 1 or set_alpha_to_one=True"
            )

    model = as_eps_model(unet, schedule, max_batch)
    scale = scale_on(cfg_scale, b, x0.device)

    def x_at(i: int) -> torch.Tensor:
        # schedule index i (descending) <-> noise index num_steps - 1 - i (ascending t)
        return q_sample(x0, float(schedule.ab[i]), noise[num_steps - 1 - i])

    x_start = x_at(skip)
    x_t = x_start
    zs = torch.empty((num_steps - skip, *x0.shape), dtype=torch.float32, device=x0.device)
    for j, i in enumerate(range(skip, num_steps)):
        ab_prev = float(schedule.ab_prev[i])
        sigma = schedule.sigma(i, eta)
        x_prev = x_at(i + 1) if i + 1 < num_steps else x0
        pred = guided(model, x_t, i, cond, uncond, scale)
        mu = mean_from(pred.x0, pred.eps, ab_prev, sigma)
        z = (x_prev - mu) / sigma
        zs[j] = z
        # Step from the value the sampler will actually compute, so rounding
        # never accumulates between inversion and reconstruction.
        x_t = mu + sigma * z

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
    cfg_scale: float | torch.Tensor = 15.0,
    eta: float | None = None,
    max_batch: int | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Run the DDPM sampler from `code.x_start` with the code's noise maps
    and the target prompt embedding `cond` (1 row, or one per code latent).
    Returns the edited latents [B, C, H, W] in float32.

    on_step(i, x_t, pred, z): called at every step, before the step is taken,
    with the schedule index i (timestep `Schedule.timesteps[i]`), the current
    latent, the guided `Prediction` (x0, eps) at it and the code's noise map for the step;
    it may return a replacement z (a new tensor: z may be the code's own
    storage) or None to keep it. Manipulations that depend on the sampler's
    state (noise-space color strokes) hook in here.

    eta defaults to the one the code was inverted with."""
    if code.zs_kind != "noise":  # a turbo-edit code's residuals are not sigma-scaled noise maps
        raise ValueError(f"code of method {code.method!r} holds {code.zs_kind} maps; the DDPM sampler reads noise maps")
    if eta is None:
        eta = float(code.params.get("eta", 1.0))
    schedule = prepare_edit(scheduler, code)
    model = as_eps_model(unet, schedule, max_batch)
    x = code.x_start.float()
    scale = scale_on(cfg_scale, x.shape[0], x.device)
    for j, i in enumerate(range(code.skip, code.num_steps)):
        ab_prev = float(schedule.ab_prev[i])
        sigma = schedule.sigma(i, eta)
        pred = guided(model, x, i, cond, uncond, scale)
        z = code.zs[j].to(x.device, torch.float32)
        if on_step is not None:
            hooked = on_step(i, x, pred, z)
            z = z if hooked is None else hooked
        x = mean_from(pred.x0, pred.eps, ab_prev, sigma) + sigma * z
    return x


def sample(
    unet: Callable,
    scheduler,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    num_steps: int,
    cfg_scale: float = 7.5,
    eta: float = 1.0,
    generator: Generator = None,
    max_batch: int | None = None,
) -> tuple[torch.Tensor, NoiseCode]:
    """Native DDPM sampling from x_T with iid noise; returns the sample and
    the code of the draws used (the 'native' statistics the paper compares
    edit-friendly codes to)."""
    schedule = Schedule.from_scheduler(scheduler, num_steps)
    zs = draw_noise((num_steps, *x_T.shape), generator, device=x_T.device, batch_dim=1)
    code = NoiseCode.from_schedule(schedule, 0, x_T.float(), zs, "native", {"eta": float(eta)})
    return edit(unet, scheduler, code, cond, uncond, cfg_scale=cfg_scale, eta=eta, max_batch=max_batch), code
