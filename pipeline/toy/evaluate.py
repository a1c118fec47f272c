"""End-to-end checks of the paper's claims on the toy model, measured with
the scene oracle (`oracle`), through the plain Python API: `load_models`,
`encode_images`, `encode_text`, an inversion method's `invert`/`edit`,
`decode_latents`.

    python -m pipeline.toy.evaluate --out toy-eval      # JSON + trade-off plot

Every function takes the loaded `Models` and fixed-seed scenes and returns
plain numbers, so the tests assert on them and the script records them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import noise_space, noise_stats, p2p
from ..inversion import edit_friendly, get_method
from ..p2p import P2PConfig
from . import oracle
from .scenes import COLORS, Scene, random_scene, scene_batch


@dataclass(frozen=True)
class Setting:
    """Inversion/edit parameters; the default is the paper's trade-off point
    (cfg_target, skip) = (9, 36) (its main setting has cfg_target 15, which
    swells the toy model's shapes further)."""

    steps: int = 100
    skip: int = 36
    cfg_source: float = 3.5
    cfg_target: float = 9.0


PAPER = Setting()
# The demo's setting (jobs/demo.toml, README "The toy model"): what
# `choose_setting` picked from `setting_sweep` on the shipped weights (12
# scenes x 2 codes; skips 36/50/64, source guidance 1/3.5, target guidance
# 3/5/7.5/9): success 24/24, mask IoU 0.83, background change 1.5/255, two
# codes' edits differing by 0.018 (skip 64 kept outlines as well but its codes
# gave near-identical edits, 0.004 to 0.007).
DEMO = Setting(steps=100, skip=36, cfg_source=3.5, cfg_target=3.0)
# Each method at its own customary source guidance (DDIM inversion and
# CycleDiffusion invert without guidance; edit-friendly with 3.5).
METHOD_CFG_SOURCE = {"edit-friendly": 3.5, "ddim": 1.0, "cycle": 1.0, "edict": 3.0}


def colour_edit_scenes(n: int, seed: int = 0) -> tuple[list[Scene], list[str]]:
    """n random scenes and, for each, a target colour different from its own
    (cycled over the palette so every colour is a target)."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    scenes, targets = [], []
    for k in range(n):
        s = random_scene(rng)
        others = [c for c in names if c != s.color]
        scenes.append(s)
        targets.append(others[k % len(others)])
    return scenes, targets


def _embed(models, prompts: list[str]) -> torch.Tensor:
    return models.encode_text(prompts)


@torch.no_grad()
def invert_scenes(models, scenes: list[Scene], *, method: str = "edit-friendly", setting: Setting = PAPER,
                  cfg_source: float | None = None, seed: int = 0, **method_kw):
    """Invert the scenes' images with their own captions; returns the code."""
    images, _, captions = scene_batch(scenes)
    x0 = models.encode_images(images)
    cond, uncond = _embed(models, captions), _embed(models, [""])
    gens = [torch.Generator().manual_seed(seed * 100003 + k) for k in range(len(scenes))]
    return get_method(method).invert(
        models.unet, models.scheduler, x0, cond, uncond, num_steps=setting.steps, skip=setting.skip,
        cfg_scale=setting.cfg_source if cfg_source is None else cfg_source, generator=gens, **method_kw)


@torch.no_grad()
def edit_code(models, code, prompts: list[str], *, method: str = "edit-friendly", cfg_target: float = PAPER.cfg_target,
              **kw) -> torch.Tensor:
    """Edit a code with one target prompt per latent; returns images [B, 3, R, R] in [-1, 1]."""
    cond, uncond = _embed(models, prompts), _embed(models, [""])
    lat = get_method(method).edit(models.unet, models.scheduler, code, cond, uncond, cfg_scale=cfg_target, **kw)
    return models.decode_latents(lat.float())


# The targets for colour edits on toy scenes (README "The toy model").
TARGET_SUCCESS, TARGET_IOU, TARGET_BACKGROUND_255 = 0.85, 0.6, 10.0
# Two edit-friendly codes of one image, edited with the same prompt, differ
# visibly when their mean absolute pixel difference (pixels in [-1, 1]) is at
# least this: the shape's shading and edges differ, not just invisible noise.
TARGET_DIVERSITY = 0.01


def colour_edit_metrics(scenes: list[Scene], targets: list[str], edits: torch.Tensor) -> dict:
    """Oracle verdicts on colour edits: the colour inside the source shape's
    mask, the IoU of the edited image's segmentation with that mask, and how
    much the background away from the shape changed (`oracle.background_change`,
    in 8-bit units)."""
    images, masks, _ = scene_batch(scenes)
    got = oracle.region_color(edits, masks)
    ious = oracle.iou(oracle.segment(edits, [s.background for s in scenes]), masks)
    bg = oracle.background_change(images, edits, masks)
    hits = [g == t for g, t in zip(got, targets)]
    return {"n": len(scenes), "success": float(np.mean(hits)), "iou_mean": float(ious.mean()),
            "iou_median": float(ious.median()), "iou_min": float(ious.min()),
            "structure_kept": float((ious >= TARGET_IOU).float().mean()),
            "success_and_kept": float(np.mean([h and i >= TARGET_IOU for h, i in zip(hits, ious.tolist())])),
            "background_change_255": float(bg.mean()), "background_change_max_255": float(bg.max()),
            "colours": got, "ious": [round(float(i), 4) for i in ious],
            "background_changes_255": [round(float(b), 2) for b in bg]}


def meets_targets(m: dict) -> bool:
    """Whether colour-edit metrics meet all three of the issue's targets."""
    return (m["success"] >= TARGET_SUCCESS and m["iou_mean"] >= TARGET_IOU
            and m["background_change_255"] <= TARGET_BACKGROUND_255)


@torch.no_grad()
def edit_code_p2p(models, code, sources: list[str], prompts: list[str], *, method: str = "edit-friendly",
                  cfg_source: float = PAPER.cfg_source, cfg_target: float = PAPER.cfg_target,
                  config: P2PConfig = P2PConfig()) -> torch.Tensor:
    """Edit a code under Prompt-to-Prompt control: row k's edit with
    prompts[k] receives the attention maps of row k edited with sources[k]
    at the source guidance (its reconstruction), in one batched chain."""
    n = len(prompts)
    rows = list(range(n)) * 2
    text = list(sources) + list(prompts)
    cond, uncond = _embed(models, text), _embed(models, [""])
    cfg = torch.tensor([cfg_source] * n + [cfg_target] * n)
    lat = p2p.edit(method, models.unet, models.scheduler, code[rows], cond, uncond, prompts=text, source_of=rows,
                   tokenizer=models.tokenizer, config=config, cfg_scale=cfg)
    return models.decode_latents(lat[n:].float())


def colour_edits(models, n: int = 24, *, method: str = "edit-friendly", setting: Setting = PAPER, seed: int = 0,
                 cfg_source: float | None = None, control: P2PConfig | None = None) -> dict:
    """Text edit of colour (`a red circle ...` -> `a green circle ...`) on n
    scenes; with `control`, under Prompt-to-Prompt attention control."""
    scenes, targets = colour_edit_scenes(n, seed)
    code = invert_scenes(models, scenes, method=method, setting=setting, cfg_source=cfg_source, seed=seed)
    prompts = [s.with_color(t).caption for s, t in zip(scenes, targets)]
    if control is None:
        edits = edit_code(models, code, prompts, method=method, cfg_target=setting.cfg_target)
    else:
        edits = edit_code_p2p(models, code, [s.caption for s in scenes], prompts, method=method,
                              cfg_source=setting.cfg_source if cfg_source is None else cfg_source,
                              cfg_target=setting.cfg_target, config=control)
    return {"method": method, "setting": asdict(setting), "cfg_source": cfg_source,
            "control": control.as_params() if control else None, **colour_edit_metrics(scenes, targets, edits)}


# Prompt-to-Prompt's setting in the paper (Table 3): 100 steps, skip 12, target
# guidance 9, cross-attention injected for 60% and self-attention for 20% of the steps.
P2P_SETTING = Setting(steps=100, skip=12, cfg_source=3.5, cfg_target=9.0)
P2P_CONTROL = P2PConfig(cross_until=0.6, self_until=0.2)


def p2p_versus_plain(models, n: int = 16, *, setting: Setting = P2P_SETTING, control: P2PConfig = P2P_CONTROL,
                     seed: int = 0) -> dict:
    """Colour edits of the same edit-friendly codes with and without P2P
    control, at the same guidance (the paper's Table 1 comparison)."""
    return {"setting": asdict(setting), "control": control.as_params(),
            "plain": colour_edits(models, n, setting=setting, seed=seed),
            "p2p": colour_edits(models, n, setting=setting, seed=seed, control=control)}


def diversity(models, n_scenes: int = 4, n_codes: int = 3, *, methods=("edit-friendly", "ddim", "edict"),
              setting: Setting = PAPER, seed: int = 0) -> dict:
    """N inversions of each scene edited with the same target prompt: mean
    absolute pixel difference between the N edits (per scene, pairs
    averaged), per method; with the oracle's colour verdict of every edit."""
    scenes, targets = colour_edit_scenes(n_scenes, seed)
    rep = [s for s in scenes for _ in range(n_codes)]
    rep_targets = [t for t in targets for _ in range(n_codes)]
    out = {}
    for method in methods:
        # different seeds per copy: only methods with a random code can differ
        images, _, captions = scene_batch(rep)
        x0 = models.encode_images(images)
        cond, uncond = _embed(models, captions), _embed(models, [""])
        gens = [torch.Generator().manual_seed(seed * 100003 + k) for k in range(len(rep))]
        code = get_method(method).invert(models.unet, models.scheduler, x0, cond, uncond, num_steps=setting.steps,
                                         skip=setting.skip, cfg_scale=METHOD_CFG_SOURCE[method]
                                         if method != "edit-friendly" else setting.cfg_source, generator=gens)
        prompts = [s.with_color(t).caption for s, t in zip(rep, rep_targets)]
        edits = edit_code(models, code, prompts, method=method, cfg_target=setting.cfg_target)
        e = edits.view(n_scenes, n_codes, *edits.shape[1:])
        pair = [float((e[:, a] - e[:, b]).abs().mean()) for a, b in itertools.combinations(range(n_codes), 2)]
        m = colour_edit_metrics(rep, rep_targets, edits)
        out[method] = {"mean_abs_diff": float(np.mean(pair)), "max_abs_diff": float(max(
            float((e[:, a] - e[:, b]).abs().max()) for a, b in itertools.combinations(range(n_codes), 2))),
            "success": m["success"], "iou_mean": m["iou_mean"]}
    return out


def setting_sweep(models, n: int = 12, *, steps=(100,), skips=(36, 50, 64), cfg_sources=(1.0, 3.5),
                  cfg_targets=(3.0, 5.0, 7.5, 9.0), seed: int = 0) -> dict:
    """Edit-friendly colour edits over a grid of settings (steps, skip,
    cfg_source, cfg_target) on n scenes, each inverted twice (two codes): the
    oracle's success, IoU and background change over both codes' edits, and
    the diversity (mean absolute pixel difference of the two edits of each
    scene) at each point, and the point `choose_setting` picks. One pair of
    inversions per (steps, skip, cfg_source) serves every target guidance."""
    scenes, targets = colour_edit_scenes(n, seed)
    prompts = [s.with_color(t).caption for s, t in zip(scenes, targets)]
    points = []
    for st, sk, cs in itertools.product(steps, skips, cfg_sources):
        setting = Setting(steps=st, skip=sk, cfg_source=cs)
        codes = [invert_scenes(models, scenes, setting=setting, seed=seed + k) for k in range(2)]
        for ct in cfg_targets:
            edits = [edit_code(models, code, prompts, cfg_target=ct) for code in codes]
            m = colour_edit_metrics(scenes * 2, targets * 2, torch.cat(edits))
            div = float((edits[0] - edits[1]).abs().mean())
            points.append({"steps": st, "skip": sk, "cfg_source": cs, "cfg_target": ct, "success": m["success"],
                           "iou_mean": round(m["iou_mean"], 4), "structure_kept": m["structure_kept"],
                           "background_change_255": round(m["background_change_255"], 2),
                           "diversity": round(div, 4),
                           "meets": meets_targets(m) and div >= TARGET_DIVERSITY})
    return {"n": n, "seed": seed, "points": points, "chosen": choose_setting(points),
            "targets": {"success": TARGET_SUCCESS, "iou_mean": TARGET_IOU, "background_change_255": TARGET_BACKGROUND_255,
                        "diversity": TARGET_DIVERSITY}}


def choose_setting(points: list[dict]) -> dict:
    """The demo's point of a sweep: among the points that meet the three
    colour-edit targets and give visibly different edits (diversity >=
    TARGET_DIVERSITY), the one with the best edit success, then the best IoU
    (a demo must first edit, then keep the shape); if none meets them all,
    the one closest to meeting them."""
    def shortfall(p: dict) -> float:  # 0 when every target is met
        return (max(0.0, TARGET_SUCCESS - p["success"]) + max(0.0, TARGET_IOU - p["iou_mean"])
                + max(0.0, p["background_change_255"] - TARGET_BACKGROUND_255) / 100
                + max(0.0, TARGET_DIVERSITY - p["diversity"]) * 10)

    return min(points, key=lambda p: (shortfall(p), -p["success"], -p["iou_mean"]))


def tradeoff(models, n: int = 16, cfg_targets=(3.0, 5.0, 7.5, 9.0, 12.0, 15.0), *,
             methods=("edit-friendly", "ddim", "cycle"), setting: Setting = PAPER, seed: int = 0) -> dict:
    """The paper's Fig. 15 on toy scenes: for each method (at its own source
    guidance) and target guidance, the oracle's edit success and structure
    (mask IoU). One inversion per method serves every guidance value."""
    scenes, targets = colour_edit_scenes(n, seed)
    prompts = [s.with_color(t).caption for s, t in zip(scenes, targets)]
    curves = {}
    for method in methods:
        code = invert_scenes(models, scenes, method=method, setting=setting,
                             cfg_source=METHOD_CFG_SOURCE[method], seed=seed)
        points = []
        for g in cfg_targets:
            m = colour_edit_metrics(scenes, targets, edit_code(models, code, prompts, method=method, cfg_target=g))
            points.append({"cfg_target": g, "success": m["success"], "iou_mean": m["iou_mean"],
                           "background_change_255": m["background_change_255"]})
        curves[method] = points
    return {"n": n, "skip": setting.skip, "steps": setting.steps, "cfg_source": METHOD_CFG_SOURCE, "curves": curves,
            "dominance": tradeoff_dominance(curves)}


def best_iou_at(points: list[dict], success: float) -> float:
    """Best mean IoU a curve reaches among its points with at least `success` (NaN if none)."""
    ok = [p["iou_mean"] for p in points if p["success"] >= success - 1e-9]
    return max(ok) if ok else float("nan")


def tradeoff_dominance(curves: dict) -> dict:
    """For every point of the other methods: edit-friendly's best IoU at
    equal or higher success minus that point's IoU (positive = edit-friendly
    keeps structure better at equal success). NaN where edit-friendly never
    reaches that success."""
    ef = curves["edit-friendly"]
    return {m: [round(best_iou_at(ef, p["success"]) - p["iou_mean"], 4) for p in pts]
            for m, pts in curves.items() if m != "edit-friendly"}


def plot_tradeoff(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for method, pts in result["curves"].items():
        ax.plot([p["iou_mean"] for p in pts], [p["success"] for p in pts], "o-", label=method)
        for p in pts:
            ax.annotate(f"{p['cfg_target']:g}", (p["iou_mean"], p["success"]), fontsize=7)
    ax.set_xlabel("structure kept: mask IoU with the source")
    ax.set_ylabel("edit success: target colour (oracle)")
    ax.set_title(f"toy model, {result['steps']} steps, skip {result['skip']}; labels: cfg_target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def shift_check(models, n: int = 8, shifts=(1, 2), *, setting: Setting = PAPER, seed: int = 0) -> dict:
    """Shifting codes (paper Sec. 5 / Fig. 11).

    1. Toy scenes, edit-friendly codes shifted by d latent pixels and edited
       with the source prompt: the segmented shape's centroid moves by
       d * factor image pixels (error reported in image pixels).
    2. Images sampled by the model with native DDPM noise (full 100 steps):
       shift that native noise by d and re-sample, versus edit-friendly
       inversion of the sample, shifted by d and re-sampled; MSE against the
       sample itself shifted by d * factor pixels (border excluded)."""
    factor = models.vae_scale_factor
    scenes, _ = colour_edit_scenes(n, seed)
    _, masks, captions = scene_batch(scenes)
    code = invert_scenes(models, scenes, setting=setting, seed=seed)
    moves = {}
    for d in shifts:
        img = edit_code(models, noise_space.shift(code, dx=d), captions, cfg_target=setting.cfg_source)
        seg = oracle.segment(img, [s.background for s in scenes])
        delta = oracle.centroid(seg) - oracle.centroid(masks)
        err = (delta - torch.tensor([d * factor, 0.0])).abs()
        moves[d] = {"dx_mean": float(delta[:, 0].mean()), "dy_mean": float(delta[:, 1].mean()),
                    "err_max_px": float(err.max()), "err_mean_px": float(err.mean()),
                    "iou_with_shifted_mask": float(oracle.iou(seg, torch.stack([
                        torch.from_numpy(s.shifted(d * factor, 0).mask()) for s in scenes])).mean())}
    # Fig. 11: native noise vs edit-friendly noise on the model's own samples
    cond, uncond = _embed(models, captions), _embed(models, [""])
    g = torch.Generator().manual_seed(seed + 7)
    lat_shape = (n, *code.x_start.shape[1:])
    x_T = torch.randn(lat_shape, generator=g)
    full = Setting(steps=setting.steps, skip=0, cfg_source=setting.cfg_source, cfg_target=setting.cfg_source)
    sample_lat, native_code = edit_friendly.sample(models.unet, models.scheduler, x_T, cond, uncond,
                                                   num_steps=full.steps, cfg_scale=full.cfg_source, generator=g)
    samples = models.decode_latents(sample_lat)
    gens = [torch.Generator().manual_seed(seed * 100003 + 50 + k) for k in range(n)]
    ef_code = edit_friendly.invert(models.unet, models.scheduler, models.encode_images(samples), cond, uncond,
                                   num_steps=full.steps, skip=0, cfg_scale=full.cfg_source, generator=gens)
    mse = {}
    for d in shifts:
        px = d * factor
        target = samples[..., :, :-px]  # the sample's content, moved right by px: compare columns px..end
        out = {}
        for name, c in (("native", native_code), ("edit-friendly", ef_code)):
            img = edit_code(models, noise_space.shift(c, dx=d), captions, cfg_target=full.cfg_source)
            out[name] = float(F.mse_loss(img[..., :, px:], target))
        mse[d] = out
    return {"n": n, "factor": factor, "moves": moves, "fig11_mse": mse}


@torch.no_grad()
def stroke_check(models, n: int = 8, *, setting: Setting = PAPER, strength: float = noise_space.STROKE_STRENGTH,
                 t_range=noise_space.STROKE_T_RANGE, seed: int = 0) -> dict:
    """Colour strokes (Eq. 7): paint the left half of each shape in another
    colour in the stroke image M, edit with the source prompt; the oracle
    reads the stroked half (should take the stroke colour) and the other
    half (should keep the shape's colour)."""
    scenes, targets = colour_edit_scenes(n, seed + 1)
    images, masks, captions = scene_batch(scenes)
    xs = torch.arange(images.shape[-1], dtype=torch.float32) + 0.5
    left = torch.stack([m & (xs[None, :] < s.cx) for m, s in zip(masks, scenes)])
    right = masks & ~left
    painted = images.clone()
    for k, t in enumerate(targets):
        painted[k][:, left[k]] = torch.from_numpy(np.asarray(
            [c / 127.5 - 1 for c in COLORS[t]], dtype=np.float32))[:, None]
    code = invert_scenes(models, scenes, setting=setting, seed=seed)
    lat_hw = tuple(code.x_start.shape[-2:])
    mask_lat = noise_space.mask_to_latent(left[:, None].float(), lat_hw, mode="nearest")
    cond, uncond = _embed(models, captions), _embed(models, [""])
    lat = noise_space.edit_with_strokes(models.unet, models.scheduler, code, cond, uncond, mask=mask_lat,
                                        stroke_latent=models.encode_images(painted), strength=strength,
                                        t_range=t_range, cfg_scale=setting.cfg_source)
    out = models.decode_latents(lat)
    got_left = oracle.region_color(out, left, erode_px=1)
    got_right = oracle.region_color(out, right, erode_px=1)
    return {"n": n, "strength": strength, "t_range": list(t_range),
            "stroked_recoloured": float(np.mean([g == t for g, t in zip(got_left, targets)])),
            "rest_kept": float(np.mean([g == s.color for g, s in zip(got_right, scenes)])),
            "left": got_left, "targets": targets}


@torch.no_grad()
def noise_statistics_check(models, n: int = 8, *, setting: Setting = PAPER, seed: int = 0) -> dict:
    """Per-step statistics of edit-friendly and CycleDiffusion codes of toy
    scenes (all 100 steps, skip 0) against native DDPM noise (Figs. 6, 12)."""
    full = Setting(steps=setting.steps, skip=0, cfg_source=setting.cfg_source, cfg_target=setting.cfg_target)
    scenes, _ = colour_edit_scenes(n, seed + 2)
    ef = invert_scenes(models, scenes, setting=full, seed=seed)
    cyc = invert_scenes(models, scenes, method="cycle", setting=full, cfg_source=METHOD_CFG_SOURCE["cycle"], seed=seed)
    s_ef, s_cyc = noise_stats.noise_statistics(ef), noise_stats.noise_statistics(cyc)
    s_nat = noise_stats.native_statistics(list(ef.zs.shape[:2]) + list(ef.zs.shape[2:]), seed=seed)

    def brief(s: dict) -> dict:
        return {"std_mean": round(s["std_mean"], 4), "corr_mean": round(s["corr_mean"], 4),
                "angle_mean": round(s["angle_mean"], 2), "std": [round(v, 3) for v in s["std"]],
                "corr": [round(v, 3) for v in s["corr"]]}

    return {"n": n, "edit-friendly": brief(s_ef), "cycle": brief(s_cyc), "native": brief(s_nat)}


@torch.no_grad()
def toy_clip_check(n: int = 48, seed: int = 5) -> dict:
    """toy-clip through the scorer API: how often a scene's caption scores
    above the same caption with another colour (and shape), and top-1
    retrieval of the caption among all captions of the toy vocabulary."""
    from ..scoring import ScoreConfig, Scorers
    from .scenes import BACKGROUNDS, SHAPES, caption, random_batch

    sc = Scorers.load(ScoreConfig(clip_model="toy-clip", lpips_pretrained=False), "cpu", "float32")
    images, _, captions, scenes = random_batch(np.random.default_rng(seed), n)
    img = sc.embed_images(images)
    right = (img * sc.embed_texts(captions)).sum(1)
    wrong_colour = [s.with_color(next(c for c in COLORS if c != s.color)).caption for s in scenes]
    wrong_shape = [caption(s.color, next(x for x in SHAPES if x != s.shape), s.background) for s in scenes]
    vocab = sorted({caption(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS})
    best = (img @ sc.embed_texts(vocab).T).argmax(1)
    return {"n": n,
            "beats_wrong_colour": float((right > (img * sc.embed_texts(wrong_colour)).sum(1)).float().mean()),
            "beats_wrong_shape": float((right > (img * sc.embed_texts(wrong_shape)).sum(1)).float().mean()),
            "retrieval_top1": float(np.mean([vocab[int(i)] == c for i, c in zip(best, captions)])),
            "vocabulary": len(vocab)}


def main(argv: list[str] | None = None) -> None:
    from ..models import load_models

    p = argparse.ArgumentParser(description="Measure the paper's claims on the toy model (oracle-scored).")
    p.add_argument("--out", type=Path, default=Path("toy-eval"))
    p.add_argument("--model", default="toy")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*",
                   default=["clip", "sweep", "colour", "diversity", "tradeoff", "shift", "stroke", "stats", "p2p"])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    models = load_models(a.model, device="cpu")
    runs = {"clip": toy_clip_check, "sweep": lambda: setting_sweep(models, max(8, a.n // 2)),
            "colour": lambda: colour_edits(models, a.n, setting=DEMO), "diversity": lambda: diversity(models, 12, 2, setting=DEMO),
            "tradeoff": lambda: tradeoff(models, max(8, a.n // 2), setting=DEMO), "shift": lambda: shift_check(models),
            "stroke": lambda: stroke_check(models), "stats": lambda: noise_statistics_check(models),
            "p2p": lambda: p2p_versus_plain(models, max(8, a.n // 2))}
    result = {"model": a.model}
    for name in a.only:
        t0 = time.time()
        result[name] = runs[name]()
        result[name]["wall_s"] = round(time.time() - t0, 1)
        brief = {k: v for k, v in result[name].items() if k not in ("colours", "ious", "std", "corr")}
        print(name, json.dumps(brief, default=str)[:1500], flush=True)
        (a.out / "toy-eval.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    if "tradeoff" in result:
        plot_tradeoff(result["tradeoff"], a.out / "tradeoff.png")


if __name__ == "__main__":
    main()
