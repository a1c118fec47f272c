"""Train the toy model (autoencoder, UNet + text encoder, and the toy CLIP
scorer) from fixed seeds.

    python -m pipeline.toy.train --out pipeline/toy/weights      # = make toy-model

Stages, each on an endless stream of freshly drawn toy scenes from its own
seeded generator:
1. `ae`: a small AutoencoderKL (64x64x3 <-> 4x16x16) trained on pixel MSE +
   L1, its decoder also fed latents perturbed by noise (10% of their spread)
   so that the small errors a diffusion model leaves in a latent decode to
   clean scenes; its scaling factor is then measured (1 / std of the scaled
   latents, as SD's 0.18215 was) so latents have unit variance.
2. `unet`: UNet and CLIP text encoder trained jointly on the frozen encoder's
   latents: v-prediction MSE under SD's noise schedule, 10% of captions
   dropped to "" so classifier-free guidance works, half of the timesteps
   drawn from the range edits run in (t < 700: the paper's edit starts at
   t ~ 640), AdamW with linear warmup and cosine decay to a tenth, EMA weights
   (what ships).
3. `clip`: the toy CLIP scorer, trained contrastively on scenes and captions.

Every stage writes a resumable checkpoint (weights, EMA, optimiser, learning
rate schedule, generator states) every `--ckpt-minutes` under
OUT/checkpoints/ and continues from it when rerun with the same OUT, so a run
cut off by a session's end resumes where it stopped; `--stop-at K` ends the
UNet stage at step K of the `--steps` schedule (a shipped intermediate
checkpoint is reproducible). Progress, wall time and CPU time go to stdout and
OUT/training*.json.
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
from ..models.toy import PREDICTION_TYPE, TOY, TOY_CLIP, build_autoencoder, build_untrained, save_pipeline
from .scenes import random_batch

DEFAULTS = dict(seed=0, ae_steps=600, ae_batch=32, ae_lr=1e-3, ae_latent_noise=0.1,
                steps=4500, stop_at=0, batch=48, lr=5e-4, warmup=200, ema=0.999, caption_dropout=0.1,
                edit_t_max=700, edit_t_share=0.5,
                clip_steps=800, clip_batch=128, clip_lr=1e-3, threads=1, prediction_type=PREDICTION_TYPE,
                ckpt_minutes=10.0)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


class _Clock:
    """Wall and CPU time since the start of a stage, including the time of
    earlier runs it resumed from (`before`)."""

    def __init__(self, before: dict | None = None):
        before = before or {}
        self.wall0 = time.time() - before.get("wall_s", 0.0)
        self.cpu0 = time.process_time() - before.get("cpu_s", 0.0)

    def __str__(self) -> str:
        return f"wall {time.time() - self.wall0:7.1f}s cpu {time.process_time() - self.cpu0:7.1f}s"

    def dict(self) -> dict:
        return {"wall_s": round(time.time() - self.wall0, 1), "cpu_s": round(time.process_time() - self.cpu0, 1)}


class _Resumable:
    """A stage's state in one file, OUT/checkpoints/<stage>.pt, written under
    a temporary name and renamed (a reader never sees half a checkpoint), at
    most every `minutes`."""

    def __init__(self, out: Path, stage: str, minutes: float):
        self.path = out / "checkpoints" / f"{stage}.pt"
        self.every = minutes * 60.0
        self.last = time.time()

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        print(f"resuming {self.path} at step {state['step']}", flush=True)
        return state

    def due(self) -> bool:
        return self.every > 0 and time.time() - self.last >= self.every

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.last = time.time()


def _cosine(step: int, steps: int, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def toy_scheduler_config(prediction_type: str = PREDICTION_TYPE) -> dict:
    """SD's DDIM schedule with the toy model's parameterisation."""
    if prediction_type not in ("v_prediction", "sample", "epsilon"):
        raise ValueError(f"prediction_type must be v_prediction, epsilon or sample, got {prediction_type!r}")
    return {**sd_scheduler_config(), "prediction_type": prediction_type}


def train_autoencoder(out: Path, *, seed: int, ae_steps: int, ae_batch: int, ae_lr: float, ae_latent_noise: float,
                      ckpt_minutes: float, log_every: int, **_) -> dict:
    """Stage 1: the toy AutoencoderKL; writes OUT/toy/vae with its measured scaling factor."""
    vae = build_autoencoder(seed + 2)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=ae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 50, _cosine(s, ae_steps)))
    rng = np.random.default_rng(seed + 2)
    gen = torch.Generator().manual_seed(seed + 2)
    ckpt, start, log, before = _Resumable(out, "ae", ckpt_minutes), 0, [], None
    state = ckpt.load()
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        start, log, before = state["step"], state["log"], state["clock"]
    clock, smooth = _Clock(before), (log[-1]["loss"] if log else None)
    for step in range(start + 1, ae_steps + 1):
        images = random_batch(rng, ae_batch)[0]
        z = vae.encode(images).latent_dist.mean
        # half the batch decodes its latent exactly, half a perturbed one
        noise = torch.randn(z.shape, generator=gen) * ae_latent_noise * z.detach().std()
        noise[: ae_batch // 2] = 0
        recon = vae.decode(z + noise).sample
        loss = F.mse_loss(recon, images) + F.l1_loss(recon, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % log_every == 0 or step == ae_steps:
            print(f"ae step {step:5d}/{ae_steps} loss {smooth:.4f} {clock}", flush=True)
            log.append({"step": step, "loss": round(smooth, 5), **clock.dict()})
        if ckpt.due() or step == ae_steps:
            ckpt.save({"step": step, "model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "rng": rng.bit_generator.state, "gen": gen.get_state(), "log": log, "clock": clock.dict()})
    vae.eval()
    with torch.no_grad():
        images = random_batch(np.random.default_rng(seed + 3), 512)[0]
        z = torch.cat([vae.encode(images[k:k + 64]).latent_dist.mean for k in range(0, 512, 64)])
        err = torch.cat([(vae.decode(z[k:k + 64]).sample - images[k:k + 64]).abs() for k in range(0, 512, 64)])
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out / TOY / "vae", safe_serialization=True)
    return {"steps": ae_steps, "final_loss": round(smooth, 5), "scaling_factor": round(scaling, 5),
            "recon_abs_error_255": round(float(err.mean()) * 127.5, 3), **clock.dict(), "log": log}


def train_diffusion(out: Path, *, seed: int, steps: int, stop_at: int, batch: int, lr: float, warmup: int, ema: float,
                    caption_dropout: float, edit_t_max: int, edit_t_share: float, ckpt_minutes: float,
                    log_every: int, prediction_type: str = PREDICTION_TYPE, **_) -> dict:
    """Stage 2: UNet + text encoder on the trained autoencoder's latents; writes OUT/toy."""
    from diffusers import AutoencoderKL, DDIMScheduler

    scheduler_config = toy_scheduler_config(prediction_type)  # refuses an unknown type before any training
    vae_dir = out / TOY / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SystemExit(f"no trained autoencoder in {vae_dir}: run the `ae` stage first (--only ae)")
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    unet, text_encoder = build_untrained(seed)
    unet.train()
    text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, _cosine(s, steps)))
    ckpt, start, log, before = _Resumable(out, "unet", ckpt_minutes), 0, [], None
    state = ckpt.load()
    if state is not None:
        for mod, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            mod.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        start, log, before = state["step"], state["log"], state["clock"]
    ab = DDIMScheduler(**scheduler_config).alphas_cumprod.float()
    tok = clip_tokenizer()
    ids_cache: dict[str, torch.Tensor] = {}

    def token_ids(captions: list[str]) -> torch.Tensor:
        for c in set(captions) - ids_cache.keys():
            ids_cache[c] = tok(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([ids_cache[c] for c in captions])

    def snapshot(step: int) -> dict:
        return {"step": step, "unet": unet.state_dict(), "text": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(), "log": log,
                "clock": clock.dict()}

    last = min(steps, stop_at) if stop_at else steps
    clock, smooth = _Clock(before), (log[-1]["loss"] if log else None)
    for step in range(start + 1, last + 1):
        images, _, captions, _ = random_batch(rng, batch)
        captions = ["" if rng.random() < caption_dropout else c for c in captions]
        with torch.no_grad():
            x0 = vae.encode(images).latent_dist.mean * scaling  # = Models.encode_images
        # half the timesteps from the range edits run in, half from the whole schedule
        edit_range = torch.rand(batch, generator=gen) < edit_t_share
        t = torch.where(edit_range, torch.randint(0, edit_t_max, (batch,), generator=gen),
                        torch.randint(0, len(ab), (batch,), generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(token_ids(captions))[0]
        pred = unet(xt, t, emb).sample
        if prediction_type == "sample":
            target = x0
        elif prediction_type == "epsilon":
            target = noise
        else:
            target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % log_every == 0 or step == last:
            print(f"unet step {step:5d}/{steps} loss {smooth:.4f} lr {sched.get_last_lr()[0]:.2e} {clock}", flush=True)
            log.append({"step": step, "loss": round(smooth, 5), **clock.dict()})
        if ckpt.due() or step == last:
            ckpt.save(snapshot(step))
            # the EMA weights so far as a loadable pipeline, for evaluation while training goes on
            save_pipeline(out / "checkpoints" / "latest", ema_unet, ema_text, vae, scheduler_config)
            (out / "checkpoints" / "latest" / "step.txt").write_text(f"{step}\n")
    save_pipeline(out / TOY, ema_unet, ema_text, vae, scheduler_config)
    return {"steps": steps, "stopped_at": last, "final_loss": round(smooth, 5), "scaling_factor": scaling,
            **clock.dict(), "log": log}


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
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--only", choices=("all", "ae", "unet", "clip"), default="all")
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args["threads"])
    out: Path = args.pop("out")
    out.mkdir(parents=True, exist_ok=True)
    only = args.pop("only")
    record = {"args": {k: v for k, v in args.items()}, "machine": {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args["threads"]}}
    if only in ("all", "ae"):
        record["ae"] = train_autoencoder(out, **args)
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
