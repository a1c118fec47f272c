"""Train the toy model (and the toy CLIP scorer) from a fixed seed.

    python -m pipeline.toy.train --out pipeline/toy/weights      # = make toy-model

The UNet and the CLIP text encoder are trained jointly on freshly drawn toy
scenes (an endless stream from one seeded generator): v-prediction MSE under
SD's noise schedule, 10% of captions dropped to "" so classifier-free
guidance works, the loss weighted to count errors of the predicted clean
image in pixel units (see `loss_weights`), AdamW with linear warmup and a
cosine decay to a tenth of the rate, EMA weights (what ships). Then the toy CLIP
scorer is trained contrastively on the same scenes and captions. Progress,
wall time and CPU time go to stdout; EMA checkpoints are written every
`--ckpt-every` steps (none by default: `make toy-model` writes into the
package) so a long run can be inspected while it trains.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import clip_tokenizer, sd_scheduler_config
from .model import FACTOR, PREDICTION_TYPE, SCALING_FACTOR, TOY, TOY_CLIP, build_untrained, save_pipeline
from .scenes import random_batch

DEFAULTS = dict(seed=0, steps=3000, batch=48, lr=5e-4, warmup=200, ema=0.999, caption_dropout=0.1,
                clip_steps=800, clip_batch=128, clip_lr=1e-3, threads=2, prediction_type=PREDICTION_TYPE)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


class _Clock:
    def __init__(self):
        self.wall0, self.cpu0 = time.time(), time.process_time()

    def __str__(self) -> str:
        return f"wall {time.time() - self.wall0:7.1f}s cpu {time.process_time() - self.cpu0:7.1f}s"

    def dict(self) -> dict:
        return {"wall_s": round(time.time() - self.wall0, 1), "cpu_s": round(time.process_time() - self.cpu0, 1)}


def _checkpoint(folder: Path, step: int, unet, text_encoder, scheduler_config: dict, keep: int = 3) -> None:
    """EMA weights after `step` steps, written under a temporary name and
    renamed, so a reader never sees half a checkpoint."""
    import shutil

    tmp = folder / f".tmp-{step:05d}"
    save_pipeline(tmp / TOY, unet, text_encoder, scheduler_config)
    tmp.rename(folder / f"step-{step:05d}")
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def _cosine(step: int, steps: int, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def loss_weights(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-sample weights of the v-prediction MSE: 1 + (1 - alpha_bar) / scale^2.

    The predicted clean latent is x0 = sqrt(ab) x_t - sqrt(1 - ab) v, so a v
    error e is a pixel error sqrt(1 - ab) e / SCALING_FACTOR. Plain v-MSE is
    dominated by the noise part of v: the scaled-down image is ~2% of the
    target's variance, and the first 3,000-step run with it (loss 0.02 at best)
    predicted no better x0 than a constant (samples were noise). The second
    term counts x0 errors in pixel units (up to 31x at high t, where the
    colour and place are decided); the 1 keeps low-t denoising trained."""
    return 1 + (1 - alpha_bar) / SCALING_FACTOR**2


def toy_scheduler_config(prediction_type: str = PREDICTION_TYPE) -> dict:
    """SD's DDIM schedule with the toy model's parameterisation."""
    if prediction_type not in ("v_prediction", "sample"):
        raise ValueError(f"prediction_type must be v_prediction or sample, got {prediction_type!r}")
    return {**sd_scheduler_config(), "prediction_type": prediction_type}


def train_diffusion(out: Path, *, seed: int, steps: int, batch: int, lr: float, warmup: int, ema: float,
                    caption_dropout: float, ckpt_every: int, log_every: int, prediction_type: str = PREDICTION_TYPE,
                    **_) -> dict:
    from diffusers import DDIMScheduler

    scheduler_config = toy_scheduler_config(prediction_type)  # refuses an unknown type before any training
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet, text_encoder = build_untrained(seed)
    unet.train()
    text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    # a constant 1e-3 diverged at step ~1,900 of the first 3,000-step run (loss 0.02 -> 0.38)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, _cosine(s, steps)))
    ab = DDIMScheduler(**scheduler_config).alphas_cumprod.float()
    tok = clip_tokenizer()
    ids_cache: dict[str, torch.Tensor] = {}

    def token_ids(captions: list[str]) -> torch.Tensor:
        for c in set(captions) - ids_cache.keys():
            ids_cache[c] = tok(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([ids_cache[c] for c in captions])

    clock, smooth, log = _Clock(), None, []
    for step in range(1, steps + 1):
        images, _, captions, _ = random_batch(rng, batch)
        captions = ["" if rng.random() < caption_dropout else c for c in captions]
        x0 = F.pixel_unshuffle(images, FACTOR) * SCALING_FACTOR  # = Models.encode_images on the toy "VAE"
        t = torch.randint(0, len(ab), (batch,))
        noise = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(token_ids(captions))[0]
        pred = unet(xt, t, emb).sample
        if prediction_type == "sample":  # x0 itself; its error in pixel units
            loss = (pred - x0).pow(2).mean() / SCALING_FACTOR**2
        else:
            v = a.sqrt() * noise - (1 - a).sqrt() * x0  # the v-prediction target
            loss = (loss_weights(a.flatten()) * (pred - v).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % log_every == 0 or step == steps:
            print(f"unet step {step:5d}/{steps} loss {smooth:.4f} lr {sched.get_last_lr()[0]:.2e} {clock}", flush=True)
            log.append({"step": step, "loss": round(smooth, 5), **clock.dict()})
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            _checkpoint(out / "checkpoints", step, ema_unet, ema_text, scheduler_config)
    save_pipeline(out / TOY, ema_unet, ema_text, scheduler_config)
    return {"steps": steps, "final_loss": round(smooth, 5), **clock.dict(), "log": log}


def train_clip(out: Path, *, seed: int, clip_steps: int, clip_batch: int, clip_lr: float, log_every: int = 50, **_) -> dict:
    """Contrastive (CLIP) training of the toy scorer. Captions repeat within
    a batch (the world has few of them), so every image whose caption equals
    a text counts as its positive (soft targets), as in SupCon-style CLIP."""
    from ..scoring import toy_clip_create, toy_clip_save

    torch.manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    model, tokenizer = toy_clip_create()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=clip_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    clock, smooth, log = _Clock(), None, []
    for step in range(1, clip_steps + 1):
        images, _, captions, _ = random_batch(rng, clip_batch)
        pixels = ((images + 1) / 2 - mean) / std
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % log_every == 0 or step == clip_steps:
            print(f"clip step {step:5d}/{clip_steps} loss {smooth:.4f} {clock}", flush=True)
            log.append({"step": step, "loss": round(smooth, 5), **clock.dict()})
    toy_clip_save(model.eval(), out / TOY_CLIP)
    return {"steps": clip_steps, "final_loss": round(smooth, 5), **clock.dict(), "log": log}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between EMA checkpoints under OUT/checkpoints (0: none)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--only", choices=("all", "unet", "clip"), default="all")
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args["threads"])
    out: Path = args.pop("out")
    out.mkdir(parents=True, exist_ok=True)
    only = args.pop("only")
    record = {"args": {k: v for k, v in args.items()}, "machine": {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args["threads"]}}
    if only in ("all", "unet"):
        record["unet"] = train_diffusion(out, **args)
    if only in ("all", "clip"):
        record["clip"] = train_clip(out, **args)
    name = "training.json" if only == "all" else f"training-{only}.json"
    (out / name).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "log"} if isinstance(v, dict) else v
                      for k, v in record.items()}), flush=True)


if __name__ == "__main__":
    main()
