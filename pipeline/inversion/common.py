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
from typing import Any, Callable, NamedTuple, Sequence

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
            ts = trailing_timesteps(n_train, num_steps)
        elif spacing == "linspace":
            ts = [int(round(v)) for v in torch.linspace(0, n_train - 1, num_steps, dtype=torch.float64).tolist()]
        else:
            raise ValueError(f"unsupported timestep_spacing {spacing!r}")
        final = 1.0 if bool(getattr(cfg, "set_alpha_to_one", False)) else float(scheduler.alphas_cumprod[0])
        return cls.at_timesteps(scheduler, sorted(ts, reverse=True), final)

    @classmethod
    def at_timesteps(cls, scheduler: Any, timesteps: Sequence[int], final_alpha_cumprod: float) -> "Schedule":
        """The schedule of explicit descending `timesteps`, landing on level
        `final_alpha_cumprod` after the last step (methods with their own
        timestep rule, e.g. turbo-edit's, use this)."""
        ts = [int(t) for t in timesteps]
        n_train = int(scheduler.config.num_train_timesteps)
        if not ts or any(not 0 <= t < n_train for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be distinct, descending and in [0, {n_train}), got {ts}")
        timesteps_t = torch.tensor(ts, dtype=torch.long)
        ac = scheduler.alphas_cumprod.to(torch.float64).cpu()
        ab = ac[timesteps_t]
        ab_prev = torch.cat([ac[timesteps_t[1:]], torch.tensor([float(final_alpha_cumprod)], dtype=torch.float64)])
        pred = getattr(scheduler.config, "prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {pred!r}: expected one of {', '.join(PREDICTION_TYPES)}")
        return cls(timesteps_t, ab, ab_prev, ac, float(final_alpha_cumprod), pred)

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


def trailing_timesteps(n_train: int, num_steps: int) -> list[int]:
    """diffusers' "trailing" spacing, ascending: the last step is the
    noisiest training timestep (1000 train steps, 5 steps: 199 ... 999)."""
    ratio = n_train / num_steps
    return [int(round(n_train - i * ratio)) - 1 for i in range(num_steps)][::-1]


# --------------------------------------------------------------------------
# Closed-form helpers (Eqs. 2-4). `ab`, `ab_prev`, `sigma` are python floats.
# --------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, ab: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) for a given noise draw (Eq. 2)."""
    return math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * noise


def _sqrt(v: "float | torch.Tensor") -> "float | torch.Tensor":
    """sqrt of a python float, or elementwise of a per-row level tensor (rows at different timesteps)."""
    return v.sqrt() if torch.is_tensor(v) else math.sqrt(v)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, ab: "float | torch.Tensor") -> torch.Tensor:
    return (x_t - _sqrt(1.0 - ab) * eps) / _sqrt(ab)


def predict_eps(x_t: torch.Tensor, x0: torch.Tensor, ab: "float | torch.Tensor") -> torch.Tensor:
    return (x_t - _sqrt(ab) * x0) / _sqrt(1.0 - ab)


def mean_from(x0: torch.Tensor, eps: torch.Tensor, ab_prev: float, sigma: float) -> torch.Tensor:
    """mu_t of Eq. 4 from a prediction: sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps.

    `sigma` already carries eta (sigma = eta * sqrt(var)), so the direction
    term uses eta^2 * var, the DDIM-correct form (the reference code used
    eta * var, its issue #12). Taking x0 from the model's own prediction
    (not recomputed from eps by dividing by sqrt(ab)) keeps it finite at a
    zero-SNR first step (ab = 0)."""
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma * sigma, 0.0)) * eps


def ddim_mean(x_t: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float, sigma: float) -> torch.Tensor:
    """mu_t of Eq. 4 from x_t and eps (x0 recomputed from eps; see `mean_from`)."""
    return mean_from(predict_x0(x_t, eps, ab), eps, ab_prev, sigma)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float) -> torch.Tensor:
    """Deterministic DDIM move from level `ab` to level `ab_prev` (either direction)."""
    return ddim_mean(x_t, eps, ab, ab_prev, 0.0)


# --------------------------------------------------------------------------
# Model adapter
# --------------------------------------------------------------------------

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Prediction(NamedTuple):
    """What the model says about x_t at one step, in both forms the math
    needs: the clean latent x0 and the noise eps (float32)."""

    x0: torch.Tensor
    eps: torch.Tensor


def to_prediction(out: torch.Tensor, x: torch.Tensor, ab: "float | torch.Tensor", prediction_type: str) -> Prediction:
    """(x0, eps) from a net output of `prediction_type` at x_t with level `ab`
    (a float, or float32 [rows, 1, 1, 1] for rows at different timesteps),
    each in closed form from the parameterisation, so nothing divides by
    sqrt(ab) unless the parameterisation itself needs it (epsilon's x0)."""
    if prediction_type == "epsilon":
        return Prediction(predict_x0(x, out, ab), out)
    if prediction_type == "v_prediction":
        xf = x.float()
        return Prediction(_sqrt(ab) * xf - _sqrt(1.0 - ab) * out, _sqrt(ab) * out + _sqrt(1.0 - ab) * xf)
    if prediction_type == "sample":
        return Prediction(out, predict_eps(x.float(), out, ab))
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


class Conditioning:
    """What a UNet is conditioned on, row by row: the text encoder's token
    embeddings [B, L, D] and, for models with added conditioning (SDXL's
    pooled text embedding and micro-conditioning ids), the UNet's
    `added_cond_kwargs` tensors, each with the same B rows.

    The methods treat it as they treat a batch of embeddings: index or slice
    rows, expand one row to many, concatenate (guidance doubles the rows),
    cast. A plain tensor is a Conditioning without added tensors
    (`as_conditioning`), and the UNet then gets exactly the call it always
    got: `net(x, t, tokens)`."""

    __slots__ = ("tokens", "added")

    def __init__(self, tokens: torch.Tensor, added: dict[str, torch.Tensor] | None = None):
        if not torch.is_tensor(tokens) or tokens.dim() != 3:
            raise ValueError(f"token embeddings must be [rows, tokens, dim], got {getattr(tokens, 'shape', type(tokens))}")
        added = dict(added or {})
        for k, v in added.items():
            if not torch.is_tensor(v) or v.shape[0] != tokens.shape[0]:
                raise ValueError(f"added conditioning {k!r} must have one row per token row ({tokens.shape[0]}), "
                                 f"got {getattr(v, 'shape', type(v))}")
        self.tokens = tokens
        self.added = added

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.added.items())
        return f"Conditioning(tokens={tuple(self.tokens.shape)}{', ' + extra if extra else ''})"

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The token embeddings' shape (rows first)."""
        return self.tokens.shape

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    def dim(self) -> int:
        return self.tokens.dim()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning(fn(self.tokens), {k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, idx) -> "Conditioning":
        """Rows `idx` (an int keeps its row dimension)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        if torch.is_tensor(idx):
            return self._map(lambda v: v[idx.to(v.device)])
        return self._map(lambda v: v[idx])

    def expand(self, batch: int, *rest: int) -> "Conditioning":
        """One row repeated `batch` times (a view); as `Tensor.expand`, the
        other sizes may be given as -1 (kept)."""
        if len(self) != 1:
            raise ValueError(f"only a 1-row conditioning expands, this one has {len(self)} rows")
        if any(r not in (-1, n) for r, n in zip(rest, self.tokens.shape[1:])):
            raise ValueError(f"a conditioning expands along its rows only, got sizes {(batch, *rest)}")
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        """Each row `repeats` times in a row (rows only)."""
        if dim != 0:
            raise ValueError("a conditioning repeats along its rows (dim 0) only")
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda v: v.to(*args, **kwargs))

    def split(self, size: int) -> tuple["Conditioning", ...]:
        return tuple(self[i : i + size] for i in range(0, len(self), size))

    def with_added(self, **added: torch.Tensor) -> "Conditioning":
        """The same rows with added tensors set or replaced."""
        return Conditioning(self.tokens, {**self.added, **added})

    def unet_kwargs(self) -> dict:
        """Keyword arguments of a UNet call besides (x, t, tokens): none
        without added tensors, so a plain UNet callable keeps working."""
        return {"added_cond_kwargs": dict(self.added)} if self.added else {}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # torch.cat of conditionings concatenates their rows, as it does for embedding tensors
        kwargs = kwargs or {}
        if func is torch.cat and kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0:
            return cls.cat(args[0])
        return NotImplemented

    @staticmethod
    def cat(items: Sequence["Conditioning | torch.Tensor"]) -> "Conditioning":
        """Rows of several conditionings, in order (all with the same added keys)."""
        items = [as_conditioning(c) for c in items]
        keys = set(items[0].added)
        if any(set(c.added) != keys for c in items[1:]):
            raise ValueError("cannot concatenate conditionings with different added tensors")
        return Conditioning(torch.cat([c.tokens for c in items]), {k: torch.cat([c.added[k] for c in items]) for k in items[0].added})


def as_conditioning(emb: "Conditioning | torch.Tensor") -> Conditioning:
    """A Conditioning from a Conditioning or a plain token-embedding tensor."""
    return emb if isinstance(emb, Conditioning) else Conditioning(emb)


Cond = Conditioning | torch.Tensor


class EpsModel:
    """Adapts a denoiser to the schedule: `predict(x, i, emb)` at schedule
    index i gives its float32 output, which `guided` turns into a
    `Prediction` (x0, eps) per the scheduler's parameterisation (epsilon,
    v_prediction or sample).

    `net` is a diffusers UNet2DConditionModel or any callable
    `(x, t, encoder_hidden_states, **kwargs)`; the conditioning's added
    tensors go as `added_cond_kwargs=` on every call (only when it has any);
    outputs with `.sample` or tuples are unwrapped. Inputs are cast to the net's dtype and outputs back to
    float32: latent math stays in fp32 even when the net runs in half
    precision. Large batches are split into chunks of `max_batch` so callers
    can batch freely without exhausting memory.

    The timesteps go to the latents' device once per chain (a [S] tensor,
    indexed per step on the device): no host-to-device copy, so no host
    sync, per UNet call.
    """

    def __init__(self, net: Callable, schedule: Schedule, max_batch: int | None = None):
        if isinstance(net, EpsModel):
            net = net.net
        self.net = net
        self.schedule = schedule
        self.max_batch = max_batch
        self.dtype = getattr(net, "dtype", None)
        self._timesteps: dict[torch.device, torch.Tensor] = {}

    def _call(self, x: torch.Tensor, t: torch.Tensor, emb: Cond) -> torch.Tensor:
        emb = as_conditioning(emb)
        if self.dtype is not None and isinstance(self.dtype, torch.dtype):
            x, emb = x.to(self.dtype), emb.to(self.dtype)
        out = self.net(x, t, emb.tokens, **emb.unet_kwargs())
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def timestep(self, i: int, device: torch.device) -> torch.Tensor:
        """Timestep of schedule index i as a 0-d long tensor on `device` (a
        view into the schedule's timesteps, copied there once)."""
        ts = self._timesteps.get(device)
        if ts is None:
            ts = self._timesteps[device] = self.schedule.timesteps.to(device)
        return ts[i]

    def output(self, x: torch.Tensor, t: torch.Tensor, emb: Cond) -> torch.Tensor:
        """The net's float32 output at timestep tensor `t` (0-d, or [rows]:
        one timestep per row), in chunks of at most `max_batch` rows."""
        n = x.shape[0]
        # equal chunks: 34 rows with a cap of 32 run as 17 + 17, not 32 + a tiny 2-row call
        chunks = -(-n // (self.max_batch or n))
        step = -(-n // chunks)
        if step >= n:
            return self._call(x, t, emb)
        per_row = t.dim() == 1 and t.numel() == n  # rows at different timesteps (turbo-edit's batched inversion)
        return torch.cat([self._call(x[s : s + step], t[s : s + step] if per_row else t, emb[s : s + step])
                          for s in range(0, n, step)])

    def predict(self, x: torch.Tensor, i: int, emb: Cond) -> torch.Tensor:
        """The net's float32 output at schedule index i."""
        return self.output(x, self.timestep(i, x.device), emb)

    def __call__(self, x: torch.Tensor, t: int, emb: Cond) -> torch.Tensor:
        """eps at timestep t (any training timestep; one host-to-device copy
        of t per call, for callers outside a chain)."""
        tt = torch.tensor(int(t), device=x.device, dtype=torch.long)
        ab = float(self.schedule.alphas_cumprod[int(t)])
        return to_prediction(self.output(x, tt, emb), x, ab, self.schedule.prediction_type).eps


def expand_rows(emb: Cond, batch: int, name: str) -> Conditioning:
    """A conditioning (or token embeddings) of 1 row (shared) or `batch` rows (paired), as `batch` rows."""
    if emb.dim() != 3:
        raise ValueError(f"{name} must be [rows, tokens, dim], got shape {tuple(emb.shape)}")
    emb = as_conditioning(emb)
    if len(emb) == batch:
        return emb
    if len(emb) == 1:
        return emb.expand(batch)
    raise ValueError(f"{name} has {len(emb)} rows; expected 1 or {batch} (one per latent)")


def scale_on(scale: float | torch.Tensor, batch: int, device: torch.device) -> float | torch.Tensor:
    """A guidance scale ready for `guided`: a number stays a number; a
    per-row tensor [B] becomes float32 [B, 1, 1, 1] on `device`. Called once
    per chain, so the chain makes no host-to-device copy per step."""
    if not torch.is_tensor(scale):
        return float(scale)
    if scale.numel() != batch:
        raise ValueError(f"cfg_scale has {scale.numel()} entries for a batch of {batch}")
    return scale.to(device, torch.float32).reshape(batch, 1, 1, 1)


def guided(
    model: EpsModel,
    x: torch.Tensor,
    i: int,
    cond: Cond,
    uncond: Cond | None,
    scale: float | torch.Tensor,
) -> Prediction:
    """The classifier-free-guided prediction at schedule index i, as one
    net call on [uncond; cond].

    `scale` is a number or a tensor [B] of per-row scales (so rows guided
    differently, e.g. edits and a reconstruction check, share one call);
    pass it through `scale_on` before the loop to keep it on the device.
    With a scalar scale of 1 (or no uncond) only the conditional half is
    evaluated. Guidance is applied to the net's output; x0 and eps are
    affine in it, so this equals guiding both."""
    b = x.shape[0]
    cond = expand_rows(cond, b, "cond")
    ab = float(model.schedule.ab[i])
    kind = model.schedule.prediction_type
    if torch.is_tensor(scale):
        scale = scale_on(scale, b, x.device) if scale.dim() != 4 else scale
    elif scale == 1.0 or uncond is None:
        return to_prediction(model.predict(x, i, cond), x, ab, kind)
    if uncond is None:
        raise ValueError("per-row cfg_scale needs an unconditional embedding")
    uncond = expand_rows(uncond, b, "uncond")
    both = model.predict(torch.cat([x, x]), i, Conditioning.cat([uncond, cond.to(uncond.dtype)]))
    out_u, out_c = both[:b], both[b:]
    return to_prediction(out_u + scale * (out_c - out_u), x, ab, kind)


def guided_eps(model, x, i, cond, uncond, scale) -> torch.Tensor:
    """eps of `guided`."""
    return guided(model, x, i, cond, uncond, scale).eps


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
    leading: int | None = None,
) -> torch.Tensor:
    """Gaussian noise of an explicit shape (never `randn_like`, which keeps
    the memory layout of its argument and so draws different numbers for a
    channels-last latent).

    `generator` may be a list with one generator per batch element (along
    `batch_dim`); each element's noise then depends only on its own
    generator, so results do not depend on how samples are batched. Noise is
    drawn on the generator's device and moved, so a CPU generator gives the
    same numbers on every device.

    leading: keep only the first `leading` entries along dim 0 of the
    shape (dim 0 must not be the batch dim). With CPU generators only those
    are drawn, and they are bit-identical to the same entries of the full
    draw (see `_randn_prefix`), so a caller that uses a prefix of the draw
    no longer pays for the rest.
    """
    shape = list(shape)
    if leading is not None:
        if batch_dim == 0 or not 0 <= leading <= shape[0]:
            raise ValueError(f"leading must be in [0, {shape[0]}] and dim 0 must not be the batch dim")
    if generator is None or isinstance(generator, torch.Generator):
        out = _randn_prefix(shape, leading, generator)
        return out.to(device=device, dtype=dtype).contiguous()
    gens = list(generator)
    if len(gens) != shape[batch_dim]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[batch_dim]}")
    one = shape[:batch_dim] + shape[batch_dim + 1 :]
    parts = [_randn_prefix(one, leading, g).to(device) for g in gens]
    return torch.stack(parts, dim=batch_dim).to(dtype=dtype).contiguous()


# torch's CPU normal sampler (float32, contiguous, >= 16 values) fills the
# tensor with uniforms in order, then Box-Muller-transforms blocks of 16; a
# size that is not a multiple of 16 has its last 16 values redrawn.
_NORMAL_BLOCK = 16


def _randn_prefix(shape: list[int], leading: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """torch.randn(shape, generator)[:leading], drawing only what is kept
    where that gives the same bits: a CPU generator's float32 draw of n
    values is a prefix of a longer draw when n is a multiple of 16 and stays
    clear of the longer draw's redrawn tail. Otherwise (other devices, tiny
    shapes) the full shape is drawn and sliced."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    full = math.prod(shape)
    if leading is None or leading == shape[0]:
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    inner = math.prod(shape[1:])
    need = leading * inner
    n = -(-need // _NORMAL_BLOCK) * _NORMAL_BLOCK
    prefix_safe = gen_device.type == "cpu" and full >= _NORMAL_BLOCK and (
        full % _NORMAL_BLOCK == 0 or n <= full - _NORMAL_BLOCK
    )
    if not prefix_safe or n >= full:
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)[:leading]
    flat = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float32)
    return flat[:need].view(leading, *shape[1:])


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
    zs_kind:   what `zs` holds: "noise", the sampler's noise maps z_t with
               x_{t-1} = mu_t + sigma_t z_t (every method but turbo-edit), or
               "residual", additive residuals r_t = x_{t-1} - mu_t (turbo-edit:
               its last step has sigma = 0 but r != 0, which no z can hold).
    """

    x_start: torch.Tensor
    zs: torch.Tensor
    timesteps: torch.Tensor
    num_steps: int
    skip: int
    method: str = "edit-friendly"
    params: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    zs_kind: str = "noise"

    @classmethod
    def from_schedule(cls, schedule: "Schedule", skip: int, x_start: torch.Tensor, zs: torch.Tensor, method: str,
                      params: dict, extra: dict | None = None, zs_kind: str = "noise") -> "NoiseCode":
        """A code for the steps schedule[skip:] (what every method returns)."""
        return cls(x_start=x_start, zs=zs, timesteps=schedule.timesteps[skip:].clone(), num_steps=schedule.num_steps,
                   skip=skip, method=method, params=params, extra=extra or {}, zs_kind=zs_kind)

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
            if (c.method, c.num_steps, c.skip, c.zs_kind) != (first.method, first.num_steps, first.skip, first.zs_kind) or not torch.equal(
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


def check_x0_defined(schedule: Schedule, first: int) -> None:
    """Raise if step `first` has zero SNR (ab = 0, a zero-terminal-SNR
    schedule's first step) and the model predicts epsilon: x0 = (x - eps) /
    sqrt(ab) is then undefined. v_prediction and sample models give x0
    directly and run such steps."""
    if schedule.prediction_type == "epsilon" and float(schedule.ab[first]) <= 0.0:
        raise ValueError(
            f"timestep {int(schedule.timesteps[first])} has zero signal (alphas_cumprod = 0, a zero-terminal-SNR "
            "schedule): an epsilon-prediction model cannot predict x0 there; use skip >= 1 or a v_prediction model"
        )


def prepare_inversion(scheduler: Any, x0: torch.Tensor, num_steps: int, skip: int) -> Schedule:
    """The checks every `invert` starts with, in one order (latents, steps,
    skip, a defined x0 at the first step), and the schedule they run on."""
    check_latents(x0)
    schedule = Schedule.from_scheduler(scheduler, num_steps)
    check_skip(skip, num_steps)
    check_x0_defined(schedule, skip)
    return schedule


def prepare_edit(scheduler: Any, code: "NoiseCode") -> Schedule:
    """The checks every `edit` starts with and the schedule it runs on."""
    schedule = Schedule.from_scheduler(scheduler, code.num_steps)
    code.check_schedule(schedule)
    check_x0_defined(schedule, code.skip)
    return schedule
