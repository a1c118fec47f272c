"""The engine: one batch of decoded samples in, edits and codes out.

Per group of same-sized images: VAE-encode together, invert all images x N
seeds in one batched call chain, then run every (image, target prompt, seed)
edit, plus one reconstruction row per image, in one batched edit chain
(chunked by the max UNet batch), decode, and hand back tensors. Scoring and
writing happen downstream in the worker. Nothing here touches files.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .data import Sample
from .inversion import get_method
from .inversion.common import NoiseCode
from .models import Models
from .spec import JobSpec


def derive_seed(job_seed: int, key: str, seed_index: int) -> int:
    """Seed of one code: a function of (job seed, sample key, seed index)
    only, so outputs do not depend on sharding, worker count or order."""
    h = hashlib.blake2b(f"{job_seed}\x00{key}\x00{seed_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


class CallCounter:
    """Counts UNet calls (batched forward passes) and rows."""

    def __init__(self, net):
        self.net = net
        self.dtype = getattr(net, "dtype", None)
        self.calls = 0
        self.rows = 0

    def __call__(self, x, t, emb):
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.net(x, t, emb)


@dataclass
class EditOut:
    target_index: int
    target_prompt: str
    seed_index: int
    seed: int
    image: torch.Tensor  # [3, H, W] in [-1, 1], on CPU


@dataclass
class SampleOut:
    sample: Sample
    edits: list[EditOut] = field(default_factory=list)
    code: NoiseCode | None = None  # the sample's N codes (when noise output is on)
    seeds: list[int] = field(default_factory=list)
    recon_error_max: float | None = None
    recon_error_mean: float | None = None
    recon_image: torch.Tensor | None = None  # decoded reconstruction (only when asked)
    recon_psnr: float | None = None


class Engine:
    def __init__(self, models: Models, spec: JobSpec):
        self.models = models
        self.spec = spec
        self.method = get_method(spec.inversion.method)
        self.unet = CallCounter(models.unet)
        self.timings: dict[str, float] = defaultdict(float)

    @property
    def unet_calls(self) -> int:
        return self.unet.calls

    def _timed(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[stage] += now - t0
        return now

    def params(self) -> dict:
        """Every parameter that defines an edit, for the output rows."""
        inv, ed = self.spec.inversion, self.spec.edit
        defaults = dict(getattr(self.method, "DEFAULTS", {}))
        return {
            "method": inv.method,
            "num_steps": inv.steps,
            "skip": inv.skip,
            "cfg_source": inv.cfg_source,
            "cfg_target": ed.cfg_target,
            **{**defaults, **inv.params},
            **({"edit": ed.params} if ed.params else {}),
        }

    @torch.inference_mode()
    def run(self, samples: list[Sample], *, decode_recon: bool = False) -> list[SampleOut]:
        by_shape: dict[tuple, list[Sample]] = defaultdict(list)
        for s in samples:
            by_shape[tuple(s.image.shape)].append(s)
        out: dict[int, SampleOut] = {}
        for group in by_shape.values():
            for s, o in zip(group, self._run_group(group, decode_recon)):
                out[id(s)] = o
        return [out[id(s)] for s in samples]

    def _run_group(self, group: list[Sample], decode_recon: bool) -> list[SampleOut]:
        spec, m = self.spec, self.models
        n_seeds, mb = spec.edit.seeds, spec.batch.max_unet_batch
        t0 = time.perf_counter()

        images = torch.stack([s.image for s in group])
        x0 = torch.cat([m.encode_images(images[i : i + mb]) for i in range(0, len(group), mb)])
        t0 = self._timed("vae_encode", t0)

        prompts = list(dict.fromkeys([""] + [s.source_prompt for s in group] + [p for s in group for p in s.target_prompts]))
        emb_all = m.encode_text(prompts)
        row = {p: i for i, p in enumerate(prompts)}
        uncond = emb_all[0:1]

        seeds = [[derive_seed(spec.run.seed, s.key, n) for n in range(n_seeds)] for s in group]
        gens = [torch.Generator("cpu").manual_seed(sd) for per in seeds for sd in per]
        x0_rep = x0.repeat_interleave(n_seeds, dim=0)
        src_rows = torch.tensor([row[s.source_prompt] for s in group]).repeat_interleave(n_seeds)
        code = self.method.invert(
            self.unet, m.scheduler, x0_rep, emb_all[src_rows], uncond,
            num_steps=spec.inversion.steps, skip=spec.inversion.skip, cfg_scale=spec.inversion.cfg_source,
            generator=gens, max_batch=mb, **spec.inversion.params,
        )
        t0 = self._timed("invert", t0)

        # One edit chain for all (image, target, seed) rows plus, per image,
        # one reconstruction row (code 0, source prompt, cfg_source).
        code_idx, cond_idx, cfgs, plan = [], [], [], []
        for g, s in enumerate(group):
            for k, tp in enumerate(s.target_prompts):
                for n in range(n_seeds):
                    code_idx.append(g * n_seeds + n)
                    cond_idx.append(row[tp])
                    cfgs.append(spec.edit.cfg_target)
                    plan.append(("edit", g, k, n))
            if spec.output.reconstruction_check:
                code_idx.append(g * n_seeds)
                cond_idx.append(row[s.source_prompt])
                cfgs.append(spec.inversion.cfg_source)
                plan.append(("recon", g, 0, 0))
        scale = spec.edit.cfg_target if len(set(cfgs)) == 1 else torch.tensor(cfgs)
        latents = self.method.edit(
            self.unet, m.scheduler, code[code_idx], emb_all[torch.tensor(cond_idx)], uncond,
            cfg_scale=scale, max_batch=mb, **spec.edit.params,
        )
        t0 = self._timed("edit", t0)

        outs = [SampleOut(sample=s, seeds=seeds[g]) for g, s in enumerate(group)]
        decode_rows = [i for i, p in enumerate(plan) if p[0] == "edit" or decode_recon]
        decoded = {}
        for c in range(0, len(decode_rows), mb):
            idx = decode_rows[c : c + mb]
            imgs = m.decode_latents(latents[idx]).cpu()
            decoded.update(zip(idx, imgs))
        t0 = self._timed("vae_decode", t0)

        for i, (kind, g, k, n) in enumerate(plan):
            o = outs[g]
            if kind == "edit":
                o.edits.append(EditOut(k, group[g].target_prompts[k], n, seeds[g][n], decoded[i]))
            else:
                err = (latents[i] - x0[g]).abs()
                o.recon_error_max, o.recon_error_mean = float(err.max()), float(err.mean())
                o.recon_image = decoded.get(i)
        if spec.output.noise:
            for g, o in enumerate(outs):
                o.code = code[list(range(g * n_seeds, (g + 1) * n_seeds))].to("cpu")
        return outs
