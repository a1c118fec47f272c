"""Statistics of noise codes against native DDPM noise (paper Figs. 5, 6, 12).

Native sampling draws every z_t iid N(0, I): std 1, no correlation between
consecutive maps, and angles between consecutive maps distributed as for
independent vectors (uniform in 2-D, concentrated at 90 degrees in high
dimension). Edit-friendly codes are "imprinted" with the image: std above 1
and negatively correlated consecutive maps (angles beyond 90 degrees).

All statistics are per step of the code (index j = 0 is the first edit
step, the largest timestep), pooled over the codes of the batch:
- std[j]: sqrt of the mean over codes of each map's unbiased variance over
  its pixels and channels (pooling variances, not averaging stds, keeps the
  estimate unbiased for maps of a few values, e.g. the paper's 2-D example).
- corr[j]: Pearson correlation of z_j with z_{j+1} (z_t with z_{t-1}) over
  the flattened maps, each map centred on its own mean, sums pooled over
  codes: the mean per-code Pearson when codes have similar variances, and
  still meaningful for 2-value maps, where a per-code Pearson is always +-1.
- angle_hist: fraction of consecutive pairs (all steps and codes) whose
  angle between the uncentred flattened maps falls in each of `bins` equal
  bins over [0, 180] degrees.
Overall means (std_mean, corr_mean) average the per-step values; angle_mean
averages the angles of all pairs. The summary is JSON-able (floats and lists).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .inversion.common import NoiseCode

# codes per chunk: bounds the float64 working memory, not the result
_CHUNK = 16


def _maps(zs: torch.Tensor | NoiseCode) -> tuple[torch.Tensor, list[int] | None, str]:
    """[S, B, D] view of the noise maps, the timesteps if known, a label."""
    if isinstance(zs, NoiseCode):
        timesteps, label, maps = [int(t) for t in zs.timesteps.tolist()], zs.method, zs.zs
        if maps.numel() == 0:
            raise ValueError(f"the code has no noise maps (method {zs.method!r} is deterministic)")
    elif torch.is_tensor(zs):
        timesteps, label, maps = None, "code", zs
    else:
        raise ValueError(f"zs must be a NoiseCode or a tensor [S, B, ...], got {type(zs).__name__}")
    if maps.dim() < 3:
        raise ValueError(f"noise maps must be [S, B, ...] with at least one map dim, got shape {tuple(maps.shape)}")
    s, b = maps.shape[:2]
    if s < 2:
        raise ValueError(f"need at least 2 steps to relate consecutive maps, got {s}")
    if b < 1 or maps[0, 0].numel() < 2:
        raise ValueError(f"need at least one code of at least 2 values per map, got shape {tuple(maps.shape)}")
    return maps.flatten(2), timesteps, label


class _Accumulator:
    """Pooled sums over chunks of codes (float64)."""

    def __init__(self, steps: int, dim: int, bins: int):
        self.steps, self.dim, self.bins = steps, dim, bins
        self.sq = torch.zeros(steps, dtype=torch.float64)  # sum of centred squares per step
        self.cross = torch.zeros(steps - 1, dtype=torch.float64)  # centred cross products z_j . z_{j+1}
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.angle_sum = 0.0
        self.codes = 0

    def add(self, z: torch.Tensor) -> None:  # z [S, b, D]
        z = z.to(torch.float64)
        zc = z - z.mean(dim=-1, keepdim=True)
        self.sq += zc.square().sum(dim=(1, 2)).cpu()
        self.cross += (zc[:-1] * zc[1:]).sum(dim=(1, 2)).cpu()
        cos = torch.nn.functional.cosine_similarity(z[:-1], z[1:], dim=-1, eps=1e-30)
        angles = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0))).flatten().cpu()
        self.hist += torch.histc(angles, bins=self.bins, min=0.0, max=180.0)
        self.angle_sum += float(angles.sum())
        self.codes += z.shape[1]

    def summary(self) -> dict:
        std = (self.sq / (self.codes * (self.dim - 1))).sqrt()
        corr = self.cross / (self.sq[:-1] * self.sq[1:]).sqrt()
        pairs = self.codes * (self.steps - 1)
        return {
            "num_codes": self.codes,
            "num_steps": self.steps,
            "map_size": self.dim,
            "std": std.tolist(),
            "corr": corr.tolist(),
            "angle_edges": torch.linspace(0.0, 180.0, self.bins + 1, dtype=torch.float64).tolist(),
            "angle_hist": (self.hist / pairs).tolist(),
            "std_mean": float(std.mean()),
            "corr_mean": float(corr.mean()),
            "angle_mean": self.angle_sum / pairs,
        }


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")


@torch.no_grad()
def noise_statistics(zs: torch.Tensor | NoiseCode, *, bins: int = 36) -> dict:
    """Per-step std, consecutive correlation and the consecutive-angle
    histogram of a batch of noise maps [S, B, ...] or of a code's maps.

    Returns {"label", "timesteps" (or None for a bare tensor), "num_codes",
    "num_steps", "map_size", "std" [S], "corr" [S-1] (corr[j] relates step j
    and j+1), "angle_edges" [bins+1], "angle_hist" [bins] (fractions),
    "std_mean", "corr_mean", "angle_mean"}.
    """
    _check_bins(bins)
    maps, timesteps, label = _maps(zs)
    acc = _Accumulator(maps.shape[0], maps.shape[2], bins)
    for start in range(0, maps.shape[1], _CHUNK):
        acc.add(maps[:, start : start + _CHUNK])
    return {"label": label, "timesteps": timesteps, **acc.summary()}


@torch.no_grad()
def native_statistics(shape: Sequence[int], *, seed: int = 0, bins: int = 36) -> dict:
    """The same statistics for native sampling: iid N(0, I) maps of `shape`
    [S, B, ...] drawn from a CPU generator seeded with `seed` (codes drawn
    in fixed chunks, so the numbers depend only on shape and seed)."""
    _check_bins(bins)
    shape = [int(n) for n in shape]
    if len(shape) < 3 or shape[0] < 2 or shape[1] < 1 or math.prod(shape[2:]) < 2:
        raise ValueError(f"shape must be [S >= 2, B >= 1, ...] with at least 2 values per map, got {shape}")
    g = torch.Generator().manual_seed(int(seed))
    s, b, dim = shape[0], shape[1], math.prod(shape[2:])
    acc = _Accumulator(s, dim, bins)
    for start in range(0, b, _CHUNK):
        acc.add(torch.randn(s, min(_CHUNK, b - start), dim, generator=g))
    return {"label": "native", "timesteps": None, **acc.summary()}


def plot_statistics(stats: dict, native: dict, path: str | os.PathLike) -> str | os.PathLike:
    """Write a 3-panel PNG: std per step, consecutive correlation per step,
    and the angle histogram, code vs native. The x axis is the timestep
    (descending, as the sampler runs) when `stats` knows it, else the step
    index. Uses matplotlib's Agg canvas directly; no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for name, d in (("stats", stats), ("native", native)):
        missing = {"std", "corr", "angle_edges", "angle_hist"} - set(d)
        if missing:
            raise ValueError(f"{name} lacks {', '.join(sorted(missing))}: pass a noise_statistics() result")
    label = stats.get("label") or "code"
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_std, ax_corr, ax_ang = fig.subplots(1, 3)

    def xs(n: int) -> tuple[list, str]:
        ts = stats.get("timesteps")
        if ts is not None and len(ts) >= n:
            return ts[:n], "timestep t"
        return list(range(n)), "step index (0 = first edit step)"

    for d, style in ((stats, dict(color="tab:red", label=label)), (native, dict(color="tab:blue", label="native"))):
        x, xlabel = xs(len(d["std"]))
        ax_std.plot(x, d["std"], marker=".", **style)
        x, _ = xs(len(d["corr"]))
        ax_corr.plot(x, d["corr"], marker=".", **style)
        ax_ang.stairs(d["angle_hist"], d["angle_edges"], fill=False, linewidth=2, **style)
    for ax, title, ylabel in ((ax_std, "std of z_t", "std"), (ax_corr, "corr(z_t, z_{t-1})", "Pearson correlation")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xlabel.startswith("timestep"):
            ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    ax_std.axhline(1.0, color="gray", linewidth=0.8)
    ax_corr.axhline(0.0, color="gray", linewidth=0.8)
    ax_std.set_ylim(bottom=0)
    ax_ang.set_title("angle between consecutive z's")
    ax_ang.set_xlabel("degrees")
    ax_ang.set_ylabel("fraction of pairs")
    ax_ang.set_xlim(0, 180)
    ax_ang.legend()
    fig.savefig(os.fspath(path), format="png", dpi=100)
    return path


def inspect_codes(path: str, out_dir, *, limit: int = 256, bins: int = 36) -> dict:
    """Statistics of the stored codes under a job output (grouped by method
    and map shape), next to native draws of the same shape; writes
    noise_stats.png (first group) and noise_stats.json."""
    import json
    from pathlib import Path

    from .codes import code_shards, read_code_rows, row_to_code
    from .inversion.common import NoiseCode

    groups: dict[tuple, list] = {}
    seen = 0
    for url in code_shards(path):
        for row in read_code_rows(url):
            if seen >= limit:
                break
            code = row_to_code(row)
            groups.setdefault((code.method, tuple(code.x_start.shape[-2:]), code.num_steps, code.skip), []).append(code)
            seen += 1
    if not groups:
        raise ValueError(f"no codes found under {path!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, plotted = {}, False
    for (method, shape, steps, skip), codes in groups.items():
        if codes[0].zs.shape[0] < 2:  # deterministic methods store no noise maps
            continue
        code = NoiseCode.cat(codes)
        stats = noise_statistics(code, bins=bins)
        native = native_statistics(tuple(code.zs.shape), seed=0, bins=bins)
        label = f"{method} {'x'.join(map(str, shape))}"
        summary[label] = stats
        summary[f"native {'x'.join(map(str, shape))}"] = native
        if not plotted:
            plot_statistics(stats, native, out / "noise_stats.png")
            plotted = True
    if not summary:
        raise ValueError("the stored codes have no noise maps to analyse (deterministic method)")
    (out / "noise_stats.json").write_text(json.dumps(summary, indent=1))
    return summary
