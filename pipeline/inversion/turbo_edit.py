"""TurboEdit (Deutch, Gal, Garibi, Patashnik, Cohen-Or, arXiv 2408.00735):
edit-friendly DDPM inversion for few-step models (SDXL-Turbo, 3-4 steps).

invert: the model runs at N timesteps (default 799, 599, 399, 199 for 4
steps); every input x_t is drawn independently from q(x_t | x0) as in
edit-friendly inversion, but at a noise level `noise_shift` training
timesteps earlier than the timestep the model is told (the edit-friendly
x_t are noisier than the schedule expects; their statistics match it about
200 steps earlier). A level <= 0 means the clean latent: with the default
shift the last input is x0 itself. Since the x_t are independent, the N
UNet evaluations have no order: they run as ONE batch with one timestep per
row. What is stored are additive residuals r_t = x_{t-1} - mu_t(x_t, c_src)
(x_{t-1} the next input, x0 after the last step), where mu_t is the DDPM
posterior mean at the labelled timestep; after the last step the level is 1
(sigma = 0, mu = the predicted x0) and r is still nonzero, so residuals are
not divided by any sigma.

edit: from x_start (the first input) with the target prompt c_tgt and the
source prompt c_src, per step one UNet call on [x_hat with c_src ; x_hat
with c_tgt] (no unconditional pass; the model is guidance-free):

    x_hat_{t-1} = mu(x_hat, c_src) + k_t r_t + w [mu(x_hat, c_tgt) - mu(x_hat, c_src)]

w is the pseudo-guidance (1.5; w = 1 is a plain edit-friendly edit); k_t
clips the norm of r_t (over the whole latent) to `max_norm` (default: only
on the last step, 15.5). With c_tgt = c_src and no clipping the edit walks
back through the x_t to x0 exactly (the reconstruction rows).

Departures from the public reference code (GiilDe/turbo-edit), on purpose:
- The reference evaluates the source prompt on the inversion's x_t anew in
  every edit call (its first of three rows) only to form r_t; here r_t is
  stored by the inversion, so an edit costs 2 rows per step, not 3, and one
  inversion serves every target prompt and seed. Where `max_norm` clips an
  earlier step than the last, the reference's first row continues from the
  clipped value mu + k r instead of the drawn x_{t-1}; here every x_t stays
  the independent draw (what the paper describes; the defaults clip only
  the last step, where both agree).
- Codes are returned, never kept on a scheduler; any batch of images and
  noise draws (one generator per latent) runs together.
- The x0 clamp of the posterior mean (`clip_sample`: x0 clamped to [-1, 1]
  in the scaled latent space) is an explicit parameter, not a setting of the
  scheduler class. Default false, as the reference runs: it builds its
  DDPMScheduler from SDXL-Turbo's scheduler config, which sets clip_sample
  false. true is an option (DDPMScheduler's class default).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .common import (
    Conditioning,
    Generator,
    NoiseCode,
    Schedule,
    as_eps_model,
    check_code_method,
    check_latents,
    check_x0_defined,
    draw_noise,
    expand_rows,
    q_sample,
    to_prediction,
    trailing_timesteps,
)

METHOD = "turbo-edit"
DEFAULTS: dict = {"noise_shift": 200, "noise_levels": None, "timesteps": None, "max_norm": 15.5, "clip_sample": False}
SEED_INDEPENDENT = False
# the code holds additive residuals, not sigma-scaled noise maps
ZS_KIND = "residual"
# edit() needs the source prompt's embedding (`source=`) and which rows reconstruct (`reconstruct=`)
EDIT_NEEDS_SOURCE = True
# no classifier-free guidance: cfg_source and cfg_target must be 1 (w is the pseudo-guidance)
GUIDANCE = False
# the clip range of `clip_sample` (DDPMScheduler's clip_sample_range default)
CLIP_RANGE = 1.0
# the reference's 4-step schedule: trailing spacing of 5 steps without its pure-noise first step (999)
_SPAN_STEPS = 5


def model_timesteps(n_train: int, num_steps: int) -> list[int]:
    """The timesteps the model is told, largest first: `num_steps` evenly
    spaced steps over the span of the trailing spacing of 5 steps without
    its pure-noise step (1000 train steps: 799 .. 199). 4 steps give the
    trailing schedule itself (799, 599, 399, 199, the reference's default),
    3 steps 799, 499, 199 (the reference's 3-step configuration)."""
    span = trailing_timesteps(n_train, _SPAN_STEPS)[::-1][1:]  # 799, 599, 399, 199
    first, last = span[0], span[-1]
    if num_steps == 1:
        return [first]
    return [int(round(first - i * (first - last) / (num_steps - 1))) for i in range(num_steps)]


def turbo_schedule(scheduler, num_steps: int, timesteps: Sequence[int] | None = None) -> Schedule:
    """The turbo-edit schedule: its own timesteps (or explicit ones), and
    level 1 after the last step (the DDPM posterior's previous timestep -1:
    sigma = 0, mu = the predicted x0)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if timesteps is None:
        timesteps = model_timesteps(int(scheduler.config.num_train_timesteps), num_steps)
    elif len(timesteps) != num_steps:
        raise ValueError(f"timesteps lists {len(timesteps)} steps for num_steps={num_steps}")
    return Schedule.at_timesteps(scheduler, timesteps, 1.0)


def code_timesteps(scheduler, num_steps: int, params: dict) -> list[int]:
    """The timesteps a code with these recorded params was made at (stored-code checks)."""
    return turbo_schedule(scheduler, num_steps, params.get("timesteps")).timesteps.tolist()


def check_params(params: dict, num_steps: int) -> None:
    """Raise ValueError if the per-step params do not fit `num_steps` (job validation)."""
    ts = params.get("timesteps")
    if ts is not None and len(ts) != num_steps:
        raise ValueError(f"timesteps lists {len(ts)} steps for {num_steps} steps (inversion.steps)")
    if ts is not None and any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be distinct and descending, got {ts}")
    levels = params.get("noise_levels")
    if levels is not None:
        noise_levels_for([0] * num_steps, 0, levels)
    max_norms(params.get("max_norm", DEFAULTS["max_norm"]), num_steps)


def noise_levels_for(timesteps: Sequence[int], noise_shift: int, noise_levels: Sequence[int] | None) -> list[int]:
    """The level each input x_t is drawn at: the model timestep minus
    `noise_shift`, or the explicit list; a level <= 0 is the clean latent
    (and so is every later one)."""
    if noise_levels is None:
        if not isinstance(noise_shift, int) or isinstance(noise_shift, bool) or noise_shift < 0:
            raise ValueError(f"noise_shift must be an integer >= 0, got {noise_shift!r}")
        levels = [int(t) - noise_shift for t in timesteps]
    else:
        levels = [int(v) for v in noise_levels]
        if len(levels) != len(timesteps):
            raise ValueError(f"noise_levels lists {len(levels)} levels for {len(timesteps)} steps")
    if any(b > a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"noise_levels must not increase from step to step, got {levels}")
    return [max(v, 0) for v in levels]


def max_norms(max_norm: float | Sequence[float] | None, num_steps: int) -> list[float]:
    """Per-step residual norm limits (0 = no clipping): a number clips the
    last step only (the reference's default), a list gives every step's."""
    if max_norm is None:
        return [0.0] * num_steps
    if isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool):
        return [0.0] * (num_steps - 1) + [max(float(max_norm), 0.0)]
    out = [float(v) for v in max_norm]
    if len(out) != num_steps:
        raise ValueError(f"max_norm lists {len(out)} limits for {num_steps} steps")
    return [max(v, 0.0) for v in out]


def posterior_coefficients(ab, ab_prev):
    """(c_x0, c_xt) of the DDPM posterior mean of q(x_prev | x_t, x0) (Ho et
    al., Eq. 7): mu = c_x0 x0 + c_xt x_t, c_x0 = sqrt(ab_prev) beta / (1 - ab),
    c_xt = sqrt(alpha) (1 - ab_prev) / (1 - ab), alpha = ab / ab_prev,
    beta = 1 - alpha. Levels are python floats (the result too) or float64
    tensors (elementwise)."""
    alpha = ab / ab_prev
    sqrt = (lambda v: v.sqrt()) if torch.is_tensor(alpha) else math.sqrt
    return sqrt(ab_prev) * (1.0 - alpha) / (1.0 - ab), sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab)


def _mean(out: torch.Tensor, x: torch.Tensor, ab, coeffs, kind: str, clip: bool) -> torch.Tensor:
    """mu from a net output at x: x0 from the parameterisation (clamped when
    `clip`), then the posterior mean. `ab` and `coeffs` are floats, or per-row
    float32 tensors [R, 1, 1, 1] already on x's device (no copy in the loop)."""
    x0 = to_prediction(out, x, ab, kind).x0
    if clip:
        x0 = x0.clamp(-CLIP_RANGE, CLIP_RANGE)
    c_x0, c_xt = coeffs
    return c_x0 * x0 + c_xt * x


def clip_coefficient(r: torch.Tensor, limit: float) -> torch.Tensor:
    """k [B, 1, 1, 1] scaling each row's residual to norm at most `limit` (0 = none)."""
    if limit <= 0:
        return torch.ones((r.shape[0], 1, 1, 1), device=r.device)
    norm = r.flatten(1).norm(dim=1)
    return torch.where(norm > limit, limit / norm, torch.ones_like(norm)).view(-1, 1, 1, 1)


@torch.no_grad()
def invert(
    unet: Callable,
    scheduler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    num_steps: int = 4,
    skip: int = 0,
    cfg_scale: float = 1.0,
    noise_shift: int = 200,
    noise_levels: Sequence[int] | None = None,
    timesteps: Sequence[int] | None = None,
    max_norm: float | Sequence[float] | None = 15.5,
    clip_sample: bool = False,
    noise: torch.Tensor | None = None,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """Invert latents `x0` [B, C, H, W] with the source prompt `cond`.

    noise: optional draws [K, B, C, H, W] for the K steps whose level is
    above 0, first step first (the reference's `torch.randn((K, C, H, W))`
    per image). Without it they come from `generator` (one, or one per
    latent). `uncond` is not used: the method runs without guidance
    (cfg_scale must be 1). `max_norm` and `clip_sample` are recorded in the
    code for its edits."""
    check_latents(x0)
    if float(cfg_scale) != 1.0:
        raise ValueError(f"turbo-edit runs without classifier-free guidance (w is its pseudo-guidance); "
                         f"set cfg_source and cfg_target to 1, got cfg_scale={cfg_scale}")
    schedule = turbo_schedule(scheduler, num_steps, timesteps)
    if not isinstance(skip, int) or not 0 <= skip < num_steps:
        raise ValueError(f"skip must be an integer in [0, num_steps), got skip={skip!r} with num_steps={num_steps}")
    check_x0_defined(schedule, skip)
    ts = [int(t) for t in schedule.timesteps]
    levels = noise_levels_for(ts, noise_shift, noise_levels)
    limits = max_norms(max_norm, num_steps)
    x0 = x0.float().contiguous()
    b = x0.shape[0]
    noisy = sum(1 for v in levels if v > 0)
    shape = (noisy, b, *x0.shape[1:])
    if noise is None:
        noise = draw_noise(shape, generator, device=x0.device, batch_dim=1)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} (steps drawn, B, C, H, W), got {tuple(noise.shape)}")
    noise = noise.to(device=x0.device, dtype=torch.float32)
    ac = schedule.alphas_cumprod
    # the inputs of every step, then x0 (what the last step lands on)
    xs = [q_sample(x0, float(ac[v]), noise[i]) if v > 0 else x0 for i, v in enumerate(levels)] + [x0]

    steps = list(range(skip, num_steps))
    model = as_eps_model(unet, schedule, max_batch)
    x_in = torch.cat([xs[i] for i in steps])
    t_rows = schedule.timesteps[steps].repeat_interleave(b).to(x0.device)
    emb = Conditioning.cat([expand_rows(cond, b, "cond")] * len(steps))
    ab_rows, abp_rows = (v[steps].repeat_interleave(b).view(-1, 1, 1, 1) for v in (schedule.ab, schedule.ab_prev))
    on_device = (lambda v: v.to(x0.device, torch.float32))
    coeffs = tuple(on_device(c) for c in posterior_coefficients(ab_rows, abp_rows))
    ab_dev = on_device(ab_rows)
    out = model.output(x_in, t_rows, emb)  # every step in one call: the x_t do not depend on each other
    mu = _mean(out, x_in, ab_dev, coeffs, schedule.prediction_type, clip_sample)
    residuals = torch.cat([xs[i + 1] for i in steps]) - mu
    zs = residuals.view(len(steps), b, *x0.shape[1:])
    params = {"noise_shift": int(noise_shift), "noise_levels": levels, "timesteps": ts, "max_norm": limits,
              "clip_sample": bool(clip_sample), "cfg_source": 1.0}
    return NoiseCode.from_schedule(schedule, skip, xs[skip], zs.contiguous(), METHOD, params, zs_kind=ZS_KIND)


def code_schedule(scheduler, code: NoiseCode) -> Schedule:
    """The schedule of a turbo-edit code's steps (from the timesteps it records)."""
    check_code_method(code, METHOD)
    if code.zs_kind != ZS_KIND:
        raise ValueError(f"a turbo-edit code holds residuals; this one says its maps are {code.zs_kind!r}")
    return Schedule.at_timesteps(scheduler, code.timesteps.tolist(), 1.0)


@torch.no_grad()
def edit(
    unet: Callable,
    scheduler,
    code: NoiseCode,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    cfg_scale: float | torch.Tensor = 1.0,
    w: float = 1.5,
    source: torch.Tensor | None = None,
    reconstruct: torch.Tensor | Sequence[bool] | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Edit code rows with the target prompts `cond` (1 row or one per code
    row); `source` is the source prompt's embedding (1 row or one per code
    row). Rows marked in `reconstruct` are edited with the source prompt
    only, without clipping: they give back the inverted latent (the
    reconstruction check). Per step ONE UNet call on [every row with
    c_src; the other rows with c_tgt]. Returns float32 latents [B, C, H, W]."""
    if source is None:
        raise ValueError("turbo-edit edits need the source prompt's embedding (source=)")
    scales = cfg_scale if torch.is_tensor(cfg_scale) else torch.tensor([float(cfg_scale)])
    if not bool((scales == 1).all()):
        raise ValueError("turbo-edit runs without classifier-free guidance (w is its pseudo-guidance); "
                         "set cfg_source and cfg_target to 1")
    schedule = code_schedule(scheduler, code)
    check_x0_defined(schedule, 0)
    model = as_eps_model(unet, schedule, max_batch)
    x = code.x_start.float()
    n = x.shape[0]
    recon = torch.zeros(n, dtype=torch.bool) if reconstruct is None else torch.as_tensor(reconstruct, dtype=torch.bool).cpu()
    if recon.numel() != n:
        raise ValueError(f"reconstruct has {recon.numel()} entries for {n} code rows")
    edit_rows = (~recon).nonzero().flatten().to(x.device)
    src, tgt = expand_rows(source, n, "source"), expand_rows(cond, n, "cond")
    emb = Conditioning.cat([src, tgt[edit_rows.to(tgt.device)].to(src.dtype)])
    limits = [float(v) for v in code.params.get("max_norm", [0.0] * code.zs.shape[0])][code.skip:]
    clip = bool(code.params.get("clip_sample", DEFAULTS["clip_sample"]))
    keep = recon.to(x.device).view(-1, 1, 1, 1)
    for j in range(code.zs.shape[0]):
        ab, ab_prev = float(schedule.ab[j]), float(schedule.ab_prev[j])
        both = torch.cat([x, x[edit_rows]])
        out = model.predict(both, j, emb)
        mu = _mean(out, both, ab, posterior_coefficients(ab, ab_prev), schedule.prediction_type, clip)
        mu_src, mu_tgt = mu[:n], mu[n:]
        r = code.zs[j].to(x.device, torch.float32)
        k = torch.where(keep, torch.ones_like(r[:, :1, :1, :1]), clip_coefficient(r, limits[j]))
        x = mu_src + k * r
        x[edit_rows] += w * (mu_tgt - mu_src[edit_rows])
    return x
