"""What every inversion method shares: the schedule as explicit tensors, the
closed-form DDPM/DDIM helpers, the epsilon-model adapter with classifier-free
guidance, noise drawing, and the code object the methods return.

The math here takes tensors and returns tensors. Nothing is stored on the
UNet or on the scheduler: `Schedule.from_scheduler` reads the scheduler's
configuration once and never calls `set_timesteps` on it, so one scheduler
object can serve many concurrent requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


# --------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A descending inference schedule with its cumulative alphas.

    `timesteps[i]` is the i-th step of the generative direction (largest
    first). `ab[i]` is alphas_cumprod at `timesteps[i]` and `ab_prev[i]` the
    one at the step the sampler lands on (`timesteps[i+1]`, or the
    scheduler's final_alpha_cumprod after the last step). All float64 on CPU
    so that arithmetic on them is exact enough for the float64 methods; the
    helpers below cast scalars to the latent dtype.
    """

    timesteps: torch.Tensor  # long [S], descending
    ab: torch.Tensor  # float64 [S]
    ab_prev: torch.Tensor  # float64 [S]
    alphas_cumprod: torch.Tensor  # float64 [num_train_timesteps]
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int) -> "Schedule":
        """Build the schedule a diffusers DDIM-style scheduler would use for
        `num_steps`, without mutating the scheduler."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        cfg = scheduler.config
        n_train = int(cfg.num_train_timesteps)
        if num_steps > n_train:
            raise ValueError(f"num_steps={num_steps} exceeds the scheduler's {n_train} training steps")
        spacing = getattr(cfg, "timestep_spacing", "leading")
        offset = int(getattr(cfg, "steps_offset", 0))
        if spacing == "leading":
            ratio = n_train // num_steps
            ts = [i * ratio for i in range(num_steps)]
            ts = [t + offset for t in ts]
        elif spacing == "trailing":
            ratio = n_train / num_steps
            ts = [int(round(n_train - i * ratio)) - 1 for i in range(num_steps)][::-1]
        elif spacing == "linspace":
            ts = [int(round(v)) for v in torch.linspace(0, n_train - 1, num_steps, dtype=torch.float64).tolist()]
        else:
            raise ValueError(f"unsupported timestep_spacing {spacing!r}")
        timesteps = torch.tensor(sorted(ts, reverse=True), dtype=torch.long)
        ac = scheduler.alphas_cumprod.to(torch.float64).cpu()
        if bool(getattr(cfg, "set_alpha_to_one", False)):
            final = 1.0
        else:
            final = float(ac[0])
        ab = ac[timesteps]
        ab_prev = torch.cat([ac[timesteps[1:]], torch.tensor([final], dtype=torch.float64)])
        pred = getattr(cfg, "prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {pred!r}: expected 'epsilon' or 'v_prediction'")
        return cls(timesteps, ab, ab_prev, ac, final, pred)

    def variance(self, i: int) -> float:
        """DDIM/DDPM posterior variance of step i (Eq. 4 with eta = 1)."""
        ab, abp = float(self.ab[i]), float(self.ab_prev[i])
        return (1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)

    def sigma(self, i: int, eta: float) -> float:
        return eta * math.sqrt(max(self.variance(i), 0.0))

    def index_of(self, t: int) -> int:
        hits = (self.timesteps == int(t)).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"timestep {t} is not in the schedule")
        return int(hits[0])


# --------------------------------------------------------------------------
# Closed-form helpers (Eqs. 2-4). `ab`, `ab_prev`, `sigma` are python floats.
# --------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, ab: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) for a given noise draw (Eq. 2)."""
    return math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * noise


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, ab: float) -> torch.Tensor:
    return (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)


def predict_eps(x_t: torch.Tensor, x0: torch.Tensor, ab: float) -> torch.Tensor:
    return (x_t - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)


def ddim_mean(x_t: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float, sigma: float) -> torch.Tensor:
    """mu_t of Eq. 4: sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps.

    `sigma` already carries eta (sigma = eta * sqrt(var)), so the direction
    term uses eta^2 * var, the DDIM-correct form (the reference code used
    eta * var, its issue #12)."""
    x0 = predict_x0(x_t, eps, ab)
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma * sigma, 0.0)) * eps


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float) -> torch.Tensor:
    """Deterministic DDIM move from level `ab` to level `ab_prev` (either direction)."""
    return ddim_mean(x_t, eps, ab, ab_prev, 0.0)


# --------------------------------------------------------------------------
# Model adapter
# --------------------------------------------------------------------------


class EpsModel:
    """Adapts a denoiser to `eps(x, t, emb) -> eps` in float32.

    `net` is a diffusers UNet2DConditionModel or any callable
    `(x, t, encoder_hidden_states)`; outputs with `.sample` or tuples are
    unwrapped. v-prediction outputs are converted to epsilon, so the
    inversion math sees one parameterisation. Inputs are cast to the net's
    dtype and outputs back to float32: latent math stays in fp32 even when
    the net runs in half precision. Large batches are split into chunks of
    `max_batch` so callers can batch freely without exhausting memory.
    """

    def __init__(self, net: Callable, schedule: Schedule, max_batch: int | None = None):
        if isinstance(net, EpsModel):
            net = net.net
        self.net = net
        self.schedule = schedule
        self.max_batch = max_batch
        self.dtype = getattr(net, "dtype", None)

    def _call(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and isinstance(self.dtype, torch.dtype):
            x, emb = x.to(self.dtype), emb.to(self.dtype)
        out = self.net(x, t, emb)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def __call__(self, x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
        tt = torch.tensor(int(t), device=x.device, dtype=torch.long)
        n = x.shape[0]
        # equal chunks: 34 rows with a cap of 32 run as 17 + 17, not 32 + a tiny 2-row call
        chunks = -(-n // (self.max_batch or n))
        step = -(-n // chunks)
        if step >= n:
            out = self._call(x, tt, emb)
        else:
            out = torch.cat([self._call(x[s : s + step], tt, emb[s : s + step]) for s in range(0, n, step)])
        if self.schedule.prediction_type == "v_prediction":
            ab = float(self.schedule.alphas_cumprod[int(t)])
            out = math.sqrt(ab) * out + math.sqrt(1.0 - ab) * x.float()
        return out


def expand_rows(emb: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Text embeddings of 1 row (shared) or `batch` rows (paired)."""
    if emb.dim() != 3:
        raise ValueError(f"{name} must be [rows, tokens, dim], got shape {tuple(emb.shape)}")
    if emb.shape[0] == batch:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(batch, -1, -1)
    raise ValueError(f"{name} has {emb.shape[0]} rows; expected 1 or {batch} (one per latent)")


def guided_eps(
    model: EpsModel,
    x: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """Classifier-free guidance as one net call on [uncond; cond].

    `scale` is a number or a tensor [B] of per-row scales (so rows guided
    differently, e.g. edits and a reconstruction check, share one call).
    With a scalar scale of 1 (or no uncond) only the conditional half is
    evaluated."""
    b = x.shape[0]
    cond = expand_rows(cond, b, "cond")
    if torch.is_tensor(scale):
        if scale.numel() != b:
            raise ValueError(f"cfg_scale has {scale.numel()} entries for a batch of {b}")
        scale = scale.to(x.device, torch.float32).view(b, *([1] * (x.dim() - 1)))
    elif scale == 1.0 or uncond is None:
        return model(x, t, cond)
    if uncond is None:
        raise ValueError("per-row cfg_scale needs an unconditional embedding")
    uncond = expand_rows(uncond, b, "uncond")
    both = model(torch.cat([x, x]), t, torch.cat([uncond, cond.to(uncond.dtype)]))
    eps_u, eps_c = both[:b], both[b:]
    return eps_u + scale * (eps_c - eps_u)


def as_eps_model(unet: Callable, schedule: Schedule, max_batch: int | None = None) -> EpsModel:
    if isinstance(unet, EpsModel):
        return EpsModel(unet.net, schedule, max_batch or unet.max_batch)
    return EpsModel(unet, schedule, max_batch)


# --------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------


def draw_noise(
    shape: Sequence[int],
    generator: Generator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_dim: int = 0,
) -> torch.Tensor:
    """Gaussian noise of an explicit shape (never `randn_like`, which keeps
    the memory layout of its argument and so draws different numbers for a
    channels-last latent).

    `generator` may be a list with one generator per batch element (along
    `batch_dim`); each element's noise then depends only on its own
    generator, so results do not depend on how samples are batched. Noise is
    drawn on the generator's device and moved, so a CPU generator gives the
    same numbers on every device.
    """
    shape = list(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        out = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        return out.to(device=device, dtype=dtype).contiguous()
    gens = list(generator)
    if len(gens) != shape[batch_dim]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[batch_dim]}")
    one = shape[:batch_dim] + shape[batch_dim + 1 :]
    parts = [torch.randn(one, generator=g, device=g.device, dtype=torch.float32).to(device) for g in gens]
    return torch.stack(parts, dim=batch_dim).to(dtype=dtype).contiguous()


# --------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------


@dataclass
class NoiseCode:
    """What an inversion returns and an edit consumes.

    x_start:   [B, C, H, W] latent at the first edit step (schedule index `skip`).
    zs:        [S, B, C, H, W] per-step noise maps for the S = num_steps - skip
               steps an edit runs, ordered from the first edit step down to
               t = 1 (empty, S = 0, for deterministic methods).
    timesteps: [S] the descending timesteps of those steps.
    extra:     further batched tensors a method needs (batch on dim 0 unless
               listed in `extra_batch_dim`), e.g. EDICT's second sequence.
    params:    the method's parameters, recorded with the code.
    """

    x_start: torch.Tensor
    zs: torch.Tensor
    timesteps: torch.Tensor
    num_steps: int
    skip: int
    method: str = "edit-friendly"
    params: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_schedule(cls, schedule: "Schedule", skip: int, x_start: torch.Tensor, zs: torch.Tensor, method: str,
                      params: dict, extra: dict | None = None) -> "NoiseCode":
        """A code for the steps schedule[skip:] (what every method returns)."""
        return cls(x_start=x_start, zs=zs, timesteps=schedule.timesteps[skip:].clone(), num_steps=schedule.num_steps,
                   skip=skip, method=method, params=params, extra=extra or {})

    def __len__(self) -> int:
        return int(self.x_start.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)

    def __getitem__(self, idx) -> "NoiseCode":
        if isinstance(idx, int):
            idx = [idx]
        if not torch.is_tensor(idx):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        idx = idx.to(self.x_start.device)
        zs = self.zs[:, idx] if self.zs.numel() or self.zs.dim() == 5 else self.zs
        extra = {k: v[idx.to(v.device)] for k, v in self.extra.items()}
        return replace(self, x_start=self.x_start[idx], zs=zs, extra=extra)

    def to(self, device=None, dtype=None) -> "NoiseCode":
        return replace(
            self,
            x_start=self.x_start.to(device=device, dtype=dtype),
            zs=self.zs.to(device=device, dtype=dtype),
            extra={k: v.to(device=device, dtype=dtype) for k, v in self.extra.items()},
        )

    @staticmethod
    def cat(codes: Sequence["NoiseCode"]) -> "NoiseCode":
        """Concatenate codes of the same method and schedule along the batch."""
        first = codes[0]
        for c in codes[1:]:
            if (c.method, c.num_steps, c.skip) != (first.method, first.num_steps, first.skip) or not torch.equal(
                c.timesteps, first.timesteps
            ):
                raise ValueError("cannot concatenate codes of different methods or schedules")
        return replace(
            first,
            x_start=torch.cat([c.x_start for c in codes]),
            zs=torch.cat([c.zs for c in codes], dim=1),
            extra={k: torch.cat([c.extra[k] for c in codes]) for k in first.extra},
        )

    def check_schedule(self, schedule: Schedule) -> None:
        """Raise if this code was made under another schedule."""
        used = schedule.timesteps[self.skip :]
        if schedule.num_steps != self.num_steps or not torch.equal(used, self.timesteps.cpu()):
            raise ValueError(
                f"code was inverted with {self.num_steps} steps (timesteps {self.timesteps[:3].tolist()}...), "
                f"but the scheduler gives {schedule.num_steps} steps (timesteps {used[:3].tolist()}...)"
            )


def check_latents(x0: torch.Tensor) -> None:
    if not torch.is_tensor(x0) or x0.dim() != 4:
        raise ValueError(f"x0 must be a latent batch [B, C, H, W], got {getattr(x0, 'shape', type(x0))}")


def check_skip(skip: int, num_steps: int) -> None:
    if not isinstance(skip, int) or not 0 <= skip < num_steps:
        raise ValueError(f"skip must be an integer in [0, num_steps), got skip={skip!r} with num_steps={num_steps}")


def check_code_method(code: NoiseCode, *methods: str) -> None:
    """Raise if `code` was made by a method whose codes this edit cannot read
    (an EDICT code fed to a DDIM edit would silently drop its second sequence)."""
    if code.method not in methods:
        raise ValueError(f"code was made by method {code.method!r}; this edit reads codes of {', '.join(map(repr, methods))}")


def empty_zs(x: torch.Tensor) -> torch.Tensor:
    """The `zs` of a deterministic method: no noise maps, shape [0, B, C, H, W],
    so that batch indexing and concatenation along dim 1 still work."""
    return x.new_empty((0, *x.shape))


def prepare_inversion(scheduler: Any, x0: torch.Tensor, num_steps: int, skip: int) -> Schedule:
    """The checks every `invert` starts with, in one order (latents, steps,
    skip), and the schedule they run on."""
    check_latents(x0)
    schedule = Schedule.from_scheduler(scheduler, num_steps)
    check_skip(skip, num_steps)
    return schedule
