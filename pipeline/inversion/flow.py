"""What the rectified-flow methods share (SD3/SD3.5, FLUX.1): the sigma
schedule as an explicit tensor, the closed-form helpers of the flow's
noising process, the velocity-model adapter with its guidance, and the
posterior noise scale of the stochastic flow sampler.

The flow's forward process is linear interpolation,

    x_sigma = (1 - sigma) x0 + sigma eps,          sigma in [0, 1],

and the network predicts the velocity v = eps - x0 (the derivative of
x_sigma in sigma). From one prediction v_hat at x_sigma both endpoints are
affine in it:

    x0_hat  = x - sigma v_hat
    eps_hat = x + (1 - sigma) v_hat

(substitute x = (1 - sigma) x0 + sigma eps: x - sigma v = x0 and
x + (1 - sigma) v = eps). The deterministic Euler step of the samplers,
x' = x + (sigma' - sigma) v_hat, is exactly a' x0_hat + sigma' eps_hat with
a' = 1 - sigma'.

Stochastic flow sampler. The forward process is Gaussian and Markov in
sigma: from sigma' < sigma, x_sigma = (a/a') x_sigma' + sqrt(sigma^2 -
(a/a')^2 sigma'^2) xi with a = 1 - sigma. Its posterior q(x_sigma' |
x_sigma, x0) (Bayes on two Gaussians, as DDPM's Eq. 7) has variance

    s_post^2 = (sigma'^2 / sigma^2) (sigma^2 - (a/a')^2 sigma'^2)

and mean a' x0 + sqrt(sigma'^2 - s_post^2) eps with eps = (x_sigma - a x0) /
sigma. Every member of the family

    x' = a' x0_hat + sqrt(sigma'^2 - s^2) eps_hat + s z,   s = eta s_post,

keeps the marginal of x' at sigma' (a' x0 plus noise of variance
sigma'^2 - s^2 + s^2); eta = 1 is the DDPM posterior of the flow's noising
process (DDPM's analogue), eta = 0 the deterministic Euler step. At the last
step sigma' = 0, a' = 1 and s = 0: x' = x0_hat.

Nothing is stored on the transformer or the scheduler: `FlowSchedule`
reads the scheduler's sigmas from a copy, so one scheduler object serves
every request.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .common import Cond, Conditioning, NoiseCode, as_conditioning, expand_rows

# Edit-friendly flow codes hold noise maps z for steps with s > 0 and, at the
# last step (sigma' = 0, s = 0), the additive residual x0 - x0_hat.
ZS_FLOW = "flow"
# Codes keep integer "timesteps" (the noise table's column is int64): for a
# flow code they are sigma x 10^6, rounded (exact enough to tell schedules apart).
SIGMA_UNITS = 1_000_000


@dataclass(frozen=True)
class FlowSchedule:
    """Descending sigmas of one inference run, ending at 0.

    `sigmas[i]` is the level the model sees at step i (i < num_steps) and
    `sigmas[i + 1]` the level the step lands on; the values are exactly the
    scheduler's float32 ones (what diffusers' pipelines feed the model),
    held in float64 for the arithmetic."""

    sigmas: torch.Tensor  # float64 [S + 1], descending, sigmas[S] = 0

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def timesteps(self) -> torch.Tensor:
        """Integer labels of the steps (sigma x 10^6), as codes store them."""
        return torch.round(self.sigmas[:-1] * SIGMA_UNITS).long()

    def sigma(self, i: int) -> float:
        return float(self.sigmas[i])

    def posterior_std(self, i: int, eta: float) -> float:
        """s of step i: eta x the posterior std of q(x_sigma' | x_sigma, x0) (0 at the last step)."""
        sig, sig_n = float(self.sigmas[i]), float(self.sigmas[i + 1])
        a, a_n = 1.0 - sig, 1.0 - sig_n
        if sig <= 0.0 or sig_n <= 0.0:
            return 0.0
        var = (sig_n * sig_n / (sig * sig)) * (sig * sig - (a / a_n) ** 2 * sig_n * sig_n)
        return eta * math.sqrt(max(var, 0.0))

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, latent_hw: tuple[int, int]) -> "FlowSchedule":
        """The sigmas a diffusers pipeline runs for `num_steps` on latents of
        `latent_hw`: SD3's static shift, or FLUX's resolution-dependent one
        (mu linear in the token count of the 2x2-patched latent, with
        linspace(1, 1/N, N) as FluxPipeline passes). Computed on a copy of the
        scheduler, so the caller's is never mutated."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        cfg = scheduler.config
        s = copy.deepcopy(scheduler)
        if bool(getattr(cfg, "use_dynamic_shifting", False)):
            h, w = (int(v) for v in latent_hw)
            mu = calculate_shift((h // 2) * (w // 2), cfg)
            import numpy as np

            s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
        else:
            s.set_timesteps(num_steps)
        sig = s.sigmas.detach().to("cpu", torch.float64)
        if sig.numel() != num_steps + 1 or float(sig[-1]) != 0.0:
            raise ValueError(f"scheduler gave {sig.numel()} sigmas ending at {float(sig[-1])}; expected "
                             f"{num_steps} steps and a terminal 0")
        return cls(sig)


def calculate_shift(image_seq_len: int, cfg) -> float:
    """FLUX's mu: linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = int(cfg.base_image_seq_len), int(cfg.max_image_seq_len)
    base, top = float(cfg.base_shift), float(cfg.max_shift)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + (base - m * base_len)


# --------------------------------------------------------------------------
# Closed-form helpers (sigma a python float, or a per-row tensor [B, 1, 1, 1])
# --------------------------------------------------------------------------


def flow_sample(x0: torch.Tensor, sigma: "float | torch.Tensor", noise: torch.Tensor) -> torch.Tensor:
    """x_sigma of the forward process for a given noise draw."""
    return (1.0 - sigma) * x0 + sigma * noise


def predict_x0(x: torch.Tensor, v: torch.Tensor, sigma: "float | torch.Tensor") -> torch.Tensor:
    return x - sigma * v


def predict_eps(x: torch.Tensor, v: torch.Tensor, sigma: "float | torch.Tensor") -> torch.Tensor:
    return x + (1.0 - sigma) * v


def step_mean(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, s: float) -> torch.Tensor:
    """mu of the stochastic step: a' x0_hat + sqrt(sigma'^2 - s^2) eps_hat (add s z for x')."""
    direction = math.sqrt(max(sigma_next * sigma_next - s * s, 0.0))
    return (1.0 - sigma_next) * predict_x0(x, v, sigma) + direction * predict_eps(x, v, sigma)


# --------------------------------------------------------------------------
# Velocity-model adapter
# --------------------------------------------------------------------------


class VelocityModel:
    """Adapts a flow network to the schedule: `output(x, sigma, cond)` gives
    its float32 velocity at level `sigma` (a 0-d tensor, or one per row).

    `net` is a callable `(x, sigma, tokens, added_cond_kwargs=...)` on
    unpacked latents [B, C, H, W] (the flow family's `FlowNet`: it knows the
    transformer's timestep units and FLUX's packing); its attribute
    `guidance_embeds` says whether guidance goes in through an embedding
    (FLUX-dev) instead of classifier-free guidance. Inputs are cast to the
    net's dtype and outputs back to float32; batches split into chunks of
    `max_batch` rows."""

    def __init__(self, net: Callable, schedule: FlowSchedule, max_batch: int | None = None):
        self.net = net
        self.schedule = schedule
        self.max_batch = max_batch
        self.dtype = getattr(net, "dtype", None)
        self.guidance_embeds = bool(getattr(net, "guidance_embeds", False))
        self._sigmas: dict[torch.device, torch.Tensor] = {}

    def sigma_on(self, i: int, device: torch.device) -> torch.Tensor:
        """sigma of step i as a 0-d float32 tensor on `device` (the schedule is copied there once)."""
        sig = self._sigmas.get(device)
        if sig is None:
            sig = self._sigmas[device] = self.schedule.sigmas.to(device, torch.float32)
        return sig[i]

    def _call(self, x: torch.Tensor, sigma: torch.Tensor, emb: Conditioning) -> torch.Tensor:
        if isinstance(self.dtype, torch.dtype):
            x, emb = x.to(self.dtype), emb.to(self.dtype)
        out = self.net(x, sigma, emb.tokens, **emb.unet_kwargs())
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def output(self, x: torch.Tensor, sigma: torch.Tensor, emb: Cond) -> torch.Tensor:
        emb = as_conditioning(emb)
        n = x.shape[0]
        chunks = -(-n // (self.max_batch or n))
        step = -(-n // chunks)
        if step >= n:
            return self._call(x, sigma, emb)
        per_row = sigma.dim() == 1 and sigma.numel() == n
        return torch.cat([self._call(x[a : a + step], sigma[a : a + step] if per_row else sigma, emb[a : a + step])
                          for a in range(0, n, step)])


def scale_rows(scale: "float | torch.Tensor", batch: int, device: torch.device) -> "float | torch.Tensor":
    """A guidance scale as a number, or float32 [B] on `device` for per-row scales (checked once per chain)."""
    if not torch.is_tensor(scale):
        return float(scale)
    if scale.numel() != batch:
        raise ValueError(f"cfg_scale has {scale.numel()} entries for a batch of {batch}")
    return scale.to(device, torch.float32).reshape(batch)


def velocity(model: VelocityModel, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, uncond: Cond | None,
             scale: "float | torch.Tensor") -> torch.Tensor:
    """The guided velocity at level `sigma` (0-d, or [B] per row), float32.

    Embedded guidance (FLUX-dev): one call with `scale` as each row's
    guidance value. Otherwise classifier-free guidance as one call on
    [uncond; cond], v_u + scale (v_c - v_u); a scalar scale of 1 (or no
    uncond) evaluates the conditional rows only."""
    b = x.shape[0]
    cond = expand_rows(cond, b, "cond")
    if model.guidance_embeds:
        g = scale if torch.is_tensor(scale) else torch.full((b,), float(scale), device=x.device)
        return model.output(x, sigma, cond.with_added(guidance=g.to(x.device, torch.float32).reshape(b)))
    if not torch.is_tensor(scale) and (scale == 1.0 or uncond is None):
        return model.output(x, sigma, cond)
    if uncond is None:
        raise ValueError("per-row cfg_scale needs an unconditional embedding")
    uncond = expand_rows(uncond, b, "uncond")
    sig2 = torch.cat([sigma, sigma]) if sigma.dim() == 1 else sigma
    both = model.output(torch.cat([x, x]), sig2, Conditioning.cat([uncond, cond.to(uncond.dtype)]))
    v_u, v_c = both[:b], both[b:]
    s = scale.view(b, *([1] * (x.dim() - 1))) if torch.is_tensor(scale) else scale
    return v_u + s * (v_c - v_u)


# --------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------


def code_schedule(scheduler, code: NoiseCode) -> FlowSchedule:
    """The schedule a flow code was made under, recomputed for its latent
    size; raises when the scheduler gives other sigmas (another shift or
    step count)."""
    schedule = FlowSchedule.from_scheduler(scheduler, code.num_steps, tuple(code.x_start.shape[-2:]))
    used = schedule.timesteps[code.skip:]
    if not torch.equal(used, code.timesteps.cpu().long()):
        raise ValueError(f"code was made with {code.num_steps} steps at sigmas x1e6 {code.timesteps[:3].tolist()}..., "
                         f"but the scheduler gives {used[:3].tolist()}... for this latent size")
    return schedule
