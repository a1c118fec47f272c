"""Working in the edit-friendly noise space (paper Sec. 5, App. A): the
noise code is a latent space, so geometric manipulations of the code move
the image, and a per-step nudge of the noise maps paints color strokes.

Geometric manipulations (`shift`, `flip`) act on every spatial map of a
`NoiseCode`: `x_start`, each z map, and every `extra` tensor whose last two
dims are the latent grid. They return a new code and record themselves in
`params["manipulations"]`; the input code is never modified.

Conventions:
- Maps are [..., H, W]; dx moves content along W (positive = right, to
  larger column indices), dy along H (positive = down, to larger rows).
- Shifting uncovers |d| columns (rows) at the border the content moves away
  from. They are filled with a contiguous block of |d| columns (rows) of the
  same, unshifted map starting at `fill_start(size, d)`: the paper copies
  columns 50..50+d-1 of a 64-wide map, scaled here to round(50/64 * size)
  (half up), moved left when needed so the block stays inside the map.
  Copying real noise keeps the border's statistics those of the code, where
  zeros or fresh Gaussian noise would not be.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .inversion import edit_friendly
from .inversion.common import NoiseCode, Prediction

# App. A: a shift by d copies columns 50..50+d-1 of the 64-wide SD latent.
PAPER_FILL_START, PAPER_MAP_SIZE = 50, 64
# Eq. 7 defaults: s = 0.05, strokes applied for t in [T1, T2] = [20, 70] of 100 steps.
STROKE_STRENGTH = 0.05
STROKE_T_RANGE = (20, 70)
STROKE_T_SCALE = 100


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# --------------------------------------------------------------------------
# Geometric manipulations
# --------------------------------------------------------------------------


def fill_start(size: int, d: int) -> int:
    """First column (row) of the block that fills the border uncovered by a
    shift of `d` along a map dimension of `size`."""
    return min(_round_half_up(PAPER_FILL_START / PAPER_MAP_SIZE * size), size - abs(d))


def shift_maps(x: torch.Tensor, d: int, dim: int) -> torch.Tensor:
    """Shift `x` by `d` along `dim`, filling the uncovered border with the
    block at `fill_start` of the unshifted map. Returns a new tensor."""
    n = x.shape[dim]
    k = abs(d)
    if k == 0:
        return x.clone()
    block = x.narrow(dim, fill_start(n, d), k)
    if d > 0:
        return torch.cat([block, x.narrow(dim, 0, n - k)], dim=dim)
    return torch.cat([x.narrow(dim, k, n - k), block], dim=dim)


def _check_code(code: NoiseCode) -> tuple[int, int]:
    if not isinstance(code, NoiseCode):
        raise ValueError(f"code must be a NoiseCode, got {type(code).__name__}")
    if code.x_start.dim() != 4:
        raise ValueError(f"code.x_start must be [B, C, H, W], got shape {tuple(code.x_start.shape)}")
    return int(code.x_start.shape[-2]), int(code.x_start.shape[-1])


def _map_code(code: NoiseCode, fn: Callable[[torch.Tensor], torch.Tensor], record: dict) -> NoiseCode:
    """Apply `fn` to every map of the code that lies on the latent grid."""
    hw = tuple(code.x_start.shape[-2:])

    def on_grid(t: torch.Tensor) -> bool:
        return t.dim() >= 2 and tuple(t.shape[-2:]) == hw

    zs = fn(code.zs) if on_grid(code.zs) else code.zs.clone()
    extra = {k: fn(v) if on_grid(v) else v.clone() for k, v in code.extra.items()}
    params = {**code.params, "manipulations": [*code.params.get("manipulations", []), record]}
    return replace(code, x_start=fn(code.x_start), zs=zs, extra=extra, params=params)


def shift(code: NoiseCode, dx: int = 0, dy: int = 0) -> NoiseCode:
    """Shift every map of `code` by dx latent pixels horizontally (positive =
    right) and dy vertically (positive = down). Editing the shifted code
    gives a correspondingly shifted image (paper Fig. 7)."""
    h, w = _check_code(code)
    for name, d, size, what in (("dx", dx, w, "width"), ("dy", dy, h, "height")):
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"{name} must be an integer number of latent pixels, got {d!r}")
        if abs(d) >= size:
            raise ValueError(f"{name}={d} must satisfy |{name}| < {size}, the latent {what}")

    def fn(x: torch.Tensor) -> torch.Tensor:
        # the two shifts act on different axes, so their order does not matter
        return shift_maps(shift_maps(x, dx, -1), dy, -2)

    return _map_code(code, fn, {"op": "shift", "dx": dx, "dy": dy})


def flip(code: NoiseCode, horizontal: bool = True) -> NoiseCode:
    """Mirror every map of `code` left-right (horizontal=True) or top-bottom."""
    _check_code(code)
    dim = -1 if horizontal else -2
    return _map_code(code, lambda x: torch.flip(x, dims=[dim]), {"op": "flip", "horizontal": bool(horizontal)})


# --------------------------------------------------------------------------
# Color strokes (Eq. 7)
# --------------------------------------------------------------------------


def mask_to_latent(mask: torch.Tensor, latent_hw: Sequence[int], *, mode: str = "max") -> torch.Tensor:
    """Bring an image-space mask [H, W] or [B, 1, H, W] to the latent grid.

    Pixels with value >= 0.5 are in the mask (bool, {0, 1} float and 0/255
    uint8 masks all work). mode "max": a latent cell is in the mask if any
    of its pixels is (max-pool; thin strokes survive, the mask grows by up to
    one cell); "nearest": the pixel at the cell's centre decides.
    Returns float {0, 1} of shape [B or 1, 1, h, w].
    """
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None, None]
    elif not (mask.dim() == 4 and mask.shape[1] == 1):
        raise ValueError(f"mask must be [H, W] or [B, 1, H, W], got shape {tuple(mask.shape)}")
    if len(latent_hw) != 2 or not all(isinstance(n, int) and n > 0 for n in latent_hw):
        raise ValueError(f"latent_hw must be two positive integers (h, w), got {latent_hw!r}")
    binary = (mask.float() >= 0.5).float()
    if mode == "max":
        return F.adaptive_max_pool2d(binary, tuple(latent_hw))
    if mode == "nearest":
        return F.interpolate(binary, size=tuple(latent_hw), mode="nearest-exact")
    raise ValueError(f"mode must be 'max' or 'nearest', got {mode!r}")


def stroke_steps(num_steps: int, t1: int = STROKE_T_RANGE[0], t2: int = STROKE_T_RANGE[1],
                 scale: int = STROKE_T_SCALE) -> range:
    """Schedule indices i (into `Schedule.timesteps`, 0 = noisiest) whose
    noise maps Eq. 7 modifies.

    The paper counts sampling steps t = T, ..., 1 (T = 100; step t maps x_t
    to x_{t-1} with z_t) and strokes steps T1 <= t <= T2. On a schedule of
    `num_steps` steps, t1 and t2 (given on a `scale`-step count) become
    round(t * num_steps / scale) (half up, at least 1), and step t is
    schedule index num_steps - t. For 100 steps and (20, 70): indices 30..80,
    i.e. timesteps 691 down to 191 on SD's schedule.
    """
    for name, v in (("num_steps", num_steps), ("scale", scale), ("t1", t1), ("t2", t2)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if num_steps < 1 or scale < 1:
        raise ValueError(f"num_steps and scale must be positive, got num_steps={num_steps}, scale={scale}")
    if not 1 <= t1 <= t2 <= scale:
        raise ValueError(f"need 1 <= t1 <= t2 <= scale, got t1={t1}, t2={t2}, scale={scale}")
    lo = max(1, _round_half_up(t1 * num_steps / scale))
    hi = max(lo, _round_half_up(t2 * num_steps / scale))
    return range(num_steps - hi, num_steps - lo + 1)


def _check_batched(x: torch.Tensor, name: str, b: int, channels: int | None, hw: tuple[int, int]) -> None:
    what = f"[1 or {b}, {'C' if channels is None else channels}, {hw[0]}, {hw[1]}]"
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"{name} must be a tensor {what}, got {getattr(x, 'shape', type(x))}")
    if x.shape[0] not in (1, b) or (channels is not None and x.shape[1] != channels) or tuple(x.shape[-2:]) != hw:
        raise ValueError(f"{name} must have shape {what} (the code's latent grid), got {tuple(x.shape)}")


@torch.no_grad()
def edit_with_strokes(
    unet: Callable,
    scheduler,
    code: NoiseCode,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    mask: torch.Tensor,
    stroke_latent: torch.Tensor,
    strength: float = STROKE_STRENGTH,
    t_range: tuple[int, int] = STROKE_T_RANGE,
    cfg_scale: float | torch.Tensor = 15.0,
    eta: float | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Edit-friendly editing with color strokes (Eq. 7): at the schedule
    indices `stroke_steps(code.num_steps, *t_range)` the sampler uses

        z_t + strength * mask * (stroke_latent - x0_hat(x_t))

    instead of z_t, where x0_hat is the guided x0 prediction
    the step already computed (no extra UNet call). Each step thus pulls the
    masked region toward the colored image M while the code fills in detail.

    mask:          [1 or B, 1, h, w] on the latent grid, values in [0, 1]
                   (binary in the paper; `mask_to_latent` makes one from an
                   image-space mask).
    stroke_latent: [1 or B, C, h, w], the colored image encoded like the
                   input images (VAE mean times the scaling factor).
    t_range:       (T1, T2) on the paper's 100-step count; steps before
                   `code.skip` are not run, so only the overlap takes effect.
    eta:           as in `edit_friendly.edit` (None: the code's own eta).
    Returns the edited latents [B, C, h, w] in float32; the code is unchanged.
    """
    _check_code(code)
    b, c, h, w = code.x_start.shape
    _check_batched(mask, "mask", b, 1, (h, w))
    _check_batched(stroke_latent, "stroke_latent", b, c, (h, w))
    if not ((mask >= 0) & (mask <= 1)).all():
        raise ValueError("mask values must lie in [0, 1]")
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    if eta is None:
        eta = float(code.params.get("eta", 1.0))
    if not eta > 0:
        raise ValueError(f"color strokes act through the noise maps and need eta > 0, got eta={eta}")
    if len(t_range) != 2:
        raise ValueError(f"t_range must be (T1, T2), got {t_range!r}")
    steps = set(stroke_steps(code.num_steps, *t_range))
    device = code.x_start.device
    mask = mask.to(device, torch.float32)
    target = stroke_latent.to(device, torch.float32)

    def strokes(i: int, x: torch.Tensor, pred: Prediction, z: torch.Tensor) -> torch.Tensor | None:
        if i not in steps:
            return None
        return z + strength * mask * (target - pred.x0)

    return edit_friendly.edit(unet, scheduler, code, cond, uncond, cfg_scale=cfg_scale, eta=eta,
                              max_batch=max_batch, on_step=strokes)
