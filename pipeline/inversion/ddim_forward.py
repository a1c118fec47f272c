"""DDIM inversion with a forward-noise start ("There and Back Again",
Staniszewski et al., arXiv 2410.23530).

DDIM inversion is least accurate in its first steps, near the clean image.
This method replaces the first K of them with one closed-form jump onto the
level those K steps would reach, x_K = sqrt(ab[t_K]) x0 + sqrt(1 - ab[t_K]) n,
with its own noise n, and continues with DDIM inversion up to T[skip]
(`ddim.invert_steps`). Editing is DDIM (eta = 0) from the result, exactly as
for `ddim` (`ddim.edit` reads these codes). Different draws of n give
different codes, so repeated inversions of one image give diverse edits.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import ddim
from .common import (
    Generator,
    NoiseCode,
    Schedule,
    as_eps_model,
    check_code_method,
    draw_noise,
    empty_zs,
    prepare_inversion,
    q_sample,
)

METHOD = "ddim-forward"
# forward_steps: the K inversion steps replaced by the jump; None scales the
# paper's 3 of 100 steps with the step count (see `default_forward_steps`).
DEFAULTS: dict = {"forward_steps": None}
# Each seed draws its own jump noise: N seeds are N different codes.
SEED_INDEPENDENT = False


def default_forward_steps(num_steps: int) -> int:
    """K = 3 per 100 steps, rounded half up, at least 1 (2 of 50, 1 of 20)."""
    return max(1, math.floor(3 * num_steps / 100 + 0.5))


def jump_index(num_steps: int, forward_steps: int) -> int:
    """Schedule index of the level K DDIM-inversion steps from x0 reach: the
    first undoes generative step num_steps - 1, the K-th step num_steps - K."""
    return num_steps - forward_steps


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
    forward_steps: int | None = None,
    generator: Generator = None,
    max_batch: int | None = None,
) -> NoiseCode:
    """Jump from `x0` [B, C, H, W] to level T[num_steps - K] with noise drawn
    from `generator` (one, or one per latent), then DDIM-invert up to T[skip]
    (num_steps - K - skip guided UNet evaluations).

    forward_steps: K, 1 <= K <= num_steps - skip. When None, the scaled
    default, capped at num_steps - skip for very large skips."""
    schedule = prepare_inversion(scheduler, x0, num_steps, skip)
    if forward_steps is None:
        forward_steps = min(default_forward_steps(num_steps), num_steps - skip)
    elif not isinstance(forward_steps, int) or not 1 <= forward_steps <= num_steps - skip:
        raise ValueError(
            f"forward_steps must be an integer in [1, num_steps - skip] = [1, {num_steps - skip}], got {forward_steps!r}"
        )
    model = as_eps_model(unet, schedule, max_batch)
    x0 = x0.float().contiguous()
    k = jump_index(num_steps, forward_steps)
    noise = draw_noise(x0.shape, generator, device=x0.device)
    x = q_sample(x0, float(schedule.ab[k]), noise)
    x_start = ddim.invert_steps(model, schedule, x, k - 1, skip, cond, uncond, cfg_scale)
    return NoiseCode.from_schedule(schedule, skip, x_start, empty_zs(x0), METHOD,
        {"forward_steps": int(forward_steps), "cfg_source": float(cfg_scale)})


@torch.no_grad()
def edit(
    unet: Callable,
    scheduler,
    code: NoiseCode,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    cfg_scale: float = 7.5,
    max_batch: int | None = None,
) -> torch.Tensor:
    """DDIM-sample (eta = 0) from the code, as `ddim.edit`."""
    check_code_method(code, METHOD)
    return ddim.edit(unet, scheduler, code, cond, uncond, cfg_scale=cfg_scale, max_batch=max_batch)
