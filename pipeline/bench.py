"""`imprint bench`: measure the engine on this machine, next to a baseline
that follows the public reference implementation's call pattern.

Both paths run on the same model weights and the same inputs (synthetic
JPEG images at the model resolution, decoded by the pipeline's own decoder):

- ours: `pipeline.engine.Engine` as the batch pipeline runs it: the
  `steps - skip` inversion steps an edit needs, all images x N seeds in one
  call chain, every (image, target, seed) edit plus one reconstruction row
  per image in one edit chain, CFG as one call on [uncond; cond], chunked by
  `max_unet_batch`, in the chosen dtype.
- reference: what the reference code does per image: full inversion over
  all `steps` (skip ignored), one seed at a time (N seeds = N inversions),
  then K x N edits one by one, each UNet evaluation a batch-1 call with the
  unconditional and conditional halves as separate calls, fp32. The math is
  the same closed-form helpers (and the same noise draws), so the two paths
  produce the same edits up to float rounding: the difference is the call
  pattern only. It is a baseline, not a strawman: no sleeps, same threads,
  inference mode, no extra copies.

Reported per path: edits/s, images/s, UNet calls and image-evaluations,
time per stage, achieved UNet TFLOP/s (FLOPs of one image-evaluation counted
once with torch's FlopCounterMode on a meta-device copy of the UNet, times
the counted evaluations) and on CUDA its fraction of the device's dense bf16
peak, and peak memory. The speed-up is edits/s ours / edits/s reference.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer

SD15_RANDOM = "sd15-random"  # built by pipeline.models.build_random (kept as a string: no torch import here)
CFG_SOURCE = 3.5  # the paper's defaults; fixed so the closed-form counts hold (cfg 1 would skip the uncond half)
CFG_TARGET = 15.0
OUTPUT_FORMAT, OUTPUT_QUALITY = "webp", 90  # the pipeline's default output encoding ("write" stage)
# what `imprint bench --method` measures (see BenchConfig.method); "flow": FlowEdit against edit-friendly on a flow model
METHODS = ("edit-friendly", "turbo-edit", "flow")
STAGES = ("decode", "vae_encode", "invert", "edit", "vae_decode", "score", "write")
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s. Matched in order on
# the CUDA device name: every substring of an entry must occur in it.
BF16_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("GH200",), 989.0),
    (("H200",), 989.0),
    (("H100",), 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (("H800",), 989.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("L40S",), 362.0),
    (("L4",), 121.0),
)


@dataclass
class BenchConfig:
    model: str = "tiny"  # tiny | tiny-sdxl | sd15-random | sdxl-random | a diffusers SD or SDXL checkpoint id or folder
    steps: int = 100
    skip: int = 36
    prompts: int = 4  # K target prompts per image
    seeds: int = 4  # N codes (and edits per target) per image
    images: int = 1
    batch: int = 64  # ours: max rows per UNet call (batch.max_unet_batch; the job default)
    decode_batch: int = 8  # ours: rows per VAE call (batch.max_decode_batch; the job default)
    dtype: str = "auto"  # ours; the reference always runs fp32
    device: str = "auto"
    compile: bool = False  # torch.compile the UNet (ours)
    channels_last: bool = False  # channels-last UNet and VAE (ours)
    sdpa: bool = True  # False: classic AttnProcessor instead of diffusers' SDPA one (both paths)
    reference: bool = True
    repeats: int = 1
    warmup: bool = True
    score: bool = False  # ours: CLIP/LPIPS scoring with random-weight scorers (offline)
    recon: bool = True  # ours: the engine's reconstruction row per image (output.reconstruction_check)
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    seed: int = 0
    # "edit-friendly": ours against the reference call pattern. "turbo-edit": turbo-edit at `turbo_steps`
    # against edit-friendly at `steps`/`skip`, both through the engine, same model and inputs, one run.
    # "flow": on a flow model (tiny-sd3, tiny-flux, SD3, FLUX), FlowEdit against edit-friendly at `steps`/`skip`
    method: str = "edit-friendly"
    turbo_steps: int = 4

    def validate(self) -> None:
        for name in ("steps", "prompts", "seeds", "images", "batch", "decode_batch", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.skip, int) or not 0 <= self.skip < self.steps:
            raise ValueError(f"skip must be an integer in [0, steps) = [0, {self.steps}), got {self.skip!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        if not self.model:
            raise ValueError("model must be tiny, tiny-sdxl, sd15-random, sdxl-random or a checkpoint id")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.turbo_steps, bool) or not isinstance(self.turbo_steps, int) or self.turbo_steps < 1:
            raise ValueError(f"turbo_steps must be a positive integer, got {self.turbo_steps!r}")


# ---------------------------------------------------------------------------
# Closed-form counts
# ---------------------------------------------------------------------------


def evals_ours(steps: int, skip: int, prompts: int, seeds: int, images: int = 1, recon: bool = True) -> int:
    """UNet image-evaluations of the engine (guidance on both sides): per
    image, (steps - skip) inversion steps x 2 halves x N rows, and
    (steps - skip) edit steps x 2 x (K N edit rows + 1 reconstruction row)."""
    s = steps - skip
    return images * (s * 2 * seeds + s * 2 * (prompts * seeds + int(recon)))


def evals_turbo(steps: int, prompts: int, seeds: int, images: int = 1, recon: bool = True) -> int:
    """UNet image-evaluations of turbo-edit in the engine (no guidance): per
    image, one inversion call of `steps` x N rows, then per step the source
    prompt on every row (K N edits + 1 reconstruction) and the target on the
    K N edit rows."""
    return images * (steps * seeds + steps * (2 * prompts * seeds + int(recon)))


def evals_flow(method: str, steps: int, skip: int, prompts: int, seeds: int, images: int = 1, recon: bool = True,
               halves: int = 2) -> int:
    """Transformer image-evaluations of a flow method in the engine, `halves`
    rows per guided row (2 with SD3's classifier-free guidance, 1 with
    FLUX-dev's embedded guidance). edit-friendly: (steps - skip) inversion
    rows x N, in one batched call chain, then (steps - skip) edit steps x
    (K N + 1 reconstruction) rows. flowedit: no inversion call; per edit step
    a source and a target row (n_avg = 1) for each of the K N edit rows (its
    reconstruction row is x_src by construction, without a call)."""
    s = steps - skip
    rows = prompts * seeds + int(recon)
    if method == "flowedit":
        return images * s * 2 * prompts * seeds * halves
    return images * (s * seeds * halves + s * rows * halves)


def evals_reference(steps: int, skip: int, prompts: int, seeds: int, images: int = 1) -> int:
    """Per image: N full inversions of `steps` x 2 batch-1 calls, then K x N
    edits of (steps - skip) x 2 batch-1 calls. Calls = image-evaluations."""
    return images * (seeds * 2 * steps + prompts * seeds * 2 * (steps - skip))


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def load_bench_models(model_id: str, device, dtype):
    from .models import load_models

    return load_models(model_id, device=device, dtype=dtype)


def _ours_models(ref, dtype, channels_last: bool, compile_unet: bool):
    """The engine's copy of the reference (fp32) models: cast, laid out and
    compiled as asked; the reference's own modules are left untouched."""
    import copy

    import torch

    m = ref
    if getattr(ref, "family", "") == "flow":  # the transformer and VAE cast (a new FlowNet wraps the copy)
        if dtype != torch.float32:
            m = replace(ref, transformer=copy.deepcopy(ref.transformer).to(dtype=dtype),
                        vae=copy.deepcopy(ref.vae).to(dtype=dtype), dtype=dtype)
        return replace(m, transformer=torch.compile(m.transformer)) if compile_unet else m
    if dtype != torch.float32 or channels_last:
        unet = copy.deepcopy(ref.unet).to(dtype=dtype)
        vae = copy.deepcopy(ref.vae).to(dtype=dtype)
        text = copy.deepcopy(ref.text_encoder).to(dtype=dtype) if dtype != torch.float32 else ref.text_encoder
        if channels_last:
            unet, vae = unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
        m = replace(ref, unet=unet, vae=vae, text_encoder=text, dtype=dtype)
    if compile_unet:
        m = replace(m, unet=torch.compile(m.unet))
    return m


def _classic_attention(models) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    for net in (models.unet, models.vae):
        net.set_attn_processor(AttnProcessor())


def flops_per_eval(models, latent_hw: tuple[int, int]) -> int:
    """FLOPs of one denoiser image-evaluation (batch 1): the UNet's, or a flow transformer's."""
    if getattr(models, "family", "") == "flow":
        return transformer_flops_per_eval(models, latent_hw)
    return unet_flops_per_eval(models.unet, latent_hw)


def transformer_flops_per_eval(models, latent_hw: tuple[int, int]) -> int:
    """FLOPs of one flow-transformer evaluation (batch 1) through `FlowNet`
    (FLUX's packing included) at latent size `latent_hw` with the model's
    own text length, counted on a meta-device copy built from its config."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models.flow import FlowNet

    tr = getattr(models.transformer, "_orig_mod", models.transformer)
    cfg = tr.config
    with torch.device("meta"):
        net = FlowNet(type(tr).from_config(cfg), models.kind)
    width = int(cfg.joint_attention_dim)
    tokens = models.sequence_length + (77 if models.kind == "sd3" else 0)
    added = {"pooled_projections": torch.empty(1, int(cfg.pooled_projection_dim), device="meta")}
    if net.guidance_embeds:
        added["guidance"] = torch.empty(1, device="meta")
    channels = int(models.vae.config.latent_channels)
    x = torch.empty(1, channels, *latent_hw, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.tensor(0.5, device="meta"), torch.empty(1, tokens, width, device="meta"), added_cond_kwargs=added)
    return int(counter.get_total_flops())


def unet_flops_per_eval(unet, latent_hw: tuple[int, int], tokens: int = 77) -> int:
    """FLOPs of one UNet image-evaluation (batch 1) at latent size `latent_hw`,
    counted with FlopCounterMode on a meta-device copy built from the UNet's
    config: nothing is computed, so this is cheap even for SD-sized models."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile wrapper
    cfg = unet.config
    with torch.device("meta"):
        net = type(unet).from_config(cfg)
    x = torch.empty(1, cfg.in_channels, *latent_hw, device="meta")
    emb = torch.empty(1, tokens, cfg.cross_attention_dim, device="meta")
    kwargs = {}
    if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: 6 time ids + the pooled text embedding
        per_id, n = int(cfg.addition_time_embed_dim), 6
        pooled = int(net.add_embedding.linear_1.in_features) - n * per_id
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, device="meta"),
                                       "time_ids": torch.empty(1, n, device="meta")}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.tensor(1, device="meta"), emb, **kwargs)
    return int(counter.get_total_flops())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_peak_tflops(device_name: str) -> float | None:
    for needles, peak in BF16_PEAK_TFLOPS:
        if all(n in device_name for n in needles):
            return peak
    return None


# ---------------------------------------------------------------------------
# Inputs and timing
# ---------------------------------------------------------------------------


def synthetic_raw_samples(images: int, prompts: int, resolution: int, seed: int = 0) -> list[dict]:
    """Raw WebDataset-style samples: a smooth random RGB image at the model
    resolution, JPEG-encoded (decoding costs what a photo's does), with a
    source prompt and K target prompts."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(images):
        small = (rng.random((max(1, resolution // 8),) * 2 + (3,)) * 255).astype(np.uint8)
        img = Image.fromarray(small, "RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append({
            "__key__": f"bench{i:04d}",
            "jpg": buf.getvalue(),
            "json": json.dumps({"source_prompt": f"a photo of object {i}",
                                "target_prompts": [f"a painting of object {i} in style {k}" for k in range(prompts)]}).encode(),
        })
    return out


def _decode(raw: dict, resolution: int):
    from .data import decode_sample
    from .spec import ImageSpec, InputSpec

    s = decode_sample(raw, "bench", InputSpec(), ImageSpec(resize="square"), resolution)
    if s.error:
        raise RuntimeError(f"synthetic sample {s.key} did not decode: {s.error}")
    return s


class Stopwatch:
    """Accumulates wall and process CPU seconds per stage; on CUDA it
    synchronises at the stage edges so queued kernels are charged to the
    stage that launched them. CPU seconds (all threads of this process) do
    not count time spent waiting for a core on a shared machine, so on CPU
    they compare two paths with less noise than wall time."""

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.seconds[stage] += time.perf_counter() - t0
            self.cpu_seconds[stage] += time.process_time() - c0


def _peak_memory_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    import resource

    # Linux reports KiB. A process high-water mark: it includes the weights and
    # every earlier path of this process, and cannot be reset.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


# ---------------------------------------------------------------------------
# The two paths
# ---------------------------------------------------------------------------


def _ours_spec(cfg: BenchConfig, steps: int, skip: int, method: str = "edit-friendly",
               cfg_pair: tuple[float, float] = (CFG_SOURCE, CFG_TARGET)):
    from .spec import load_spec

    guided = method != "turbo-edit"  # turbo-edit is guidance-free: cfg 1 on both sides
    return load_spec(raw={
        "input": {"shards": ["bench"]},
        "model": {"id": cfg.model},
        "inversion": {"method": method, "steps": steps, "skip": skip, "cfg_source": cfg_pair[0] if guided else 1.0},
        "edit": {"cfg_target": cfg_pair[1] if guided else 1.0, "seeds": cfg.seeds},
        # a compiled UNet gets padded rows (few batch shapes, no recompiles), as a job with model.compile does
        "batch": {"images": cfg.images, "max_unet_batch": cfg.batch, "max_decode_batch": cfg.decode_batch,
                  "pad_rows": 8 if cfg.compile else 0},
        "output": {"reconstruction_check": cfg.recon},
        "score": {"enabled": False},  # scoring is timed here, with offline scorers
        "run": {"seed": cfg.seed},
    })


def run_ours(models, spec, raws: list[dict], scorers=None) -> dict:
    """One run of the engine over `raws`. Returns seconds (without scoring),
    stage seconds, counts, the edits {(key, target, seed): image} and the
    reconstruction error."""
    import torch

    from .data import encode_image
    from .engine import Engine

    sw = Stopwatch(models.device)
    _peak_memory_reset(models.device)
    sw.sync()
    t_start, c_start = time.perf_counter(), time.process_time()
    with sw("decode"):
        samples = [_decode(r, models.resolution) for r in raws]
    engine = Engine(models, spec, timed=True)
    with sw("engine"):
        outs = engine.run(samples)
    unet_busy = engine.unet.busy_seconds()
    if scorers is not None:
        with sw("score"):
            _score(scorers, outs)
    with sw("write"):
        for o in outs:
            for e in o.edits:
                encode_image(e.image, OUTPUT_FORMAT, OUTPUT_QUALITY)
    seconds = time.perf_counter() - t_start - sw.seconds.get("score", 0.0)
    cpu_seconds = time.process_time() - c_start - sw.cpu_seconds.get("score", 0.0)
    stages = dict(sw.seconds)
    engine_wall = stages.pop("engine")
    stages.update(engine.timings)  # vae_encode, invert (incl. text encoding), edit, vae_decode
    stages["engine_other"] = max(0.0, engine_wall - sum(engine.timings.values()))
    edits = {(o.sample.key, e.target_index, e.seed_index): e.image for o in outs for e in o.edits}
    recon = [o for o in outs if o.recon_error_max is not None]
    return {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "stages": stages, "edits": edits, "images": len(outs),
        "unet_calls": engine.unet.calls, "unet_image_evals": engine.unet.rows,
        "recon_error_max": max((float(o.recon_error_max) for o in recon), default=None),
        "recon_error_mean": statistics.fmean(float(o.recon_error_mean) for o in recon) if recon else None,
        "peak_memory": _peak_memory(models.device),
        "nonfinite_edits": sum(int(not torch.isfinite(e.image).all()) for o in outs for e in o.edits),
        "engine_seconds": engine_wall, "unet_busy_seconds": unet_busy,
    }


def host_syncs_per_step(models, steps: int = 4, rows: int = 2) -> dict:
    """Host syncs per denoising step of the edit-friendly inversion and of
    an edit with per-row guidance scales (as the engine runs it), counted
    from the first UNet call to the end of the chain (`pipeline.syncs`):
    on CUDA with torch.cuda.set_sync_debug_mode, elsewhere by counting the
    operations that would synchronise on a GPU."""
    import torch

    from .inversion import edit_friendly
    from .syncs import count_host_syncs, gate_net

    dev = models.device
    hw = models.resolution // models.vae_scale_factor
    x0 = torch.randn(rows, int(models.unet.config.in_channels), hw, hw, generator=torch.Generator().manual_seed(0)).to(dev)
    from .models import ImageGeometry

    geo = [ImageGeometry.plain(models.resolution, models.resolution)] * rows  # SDXL: the time ids of square images
    cond = models.for_images(models.encode_text(["a photo"] * rows), geo)
    uncond = models.for_images(models.unconditional(), geo, unconditional=True)
    gens = [torch.Generator().manual_seed(k) for k in range(rows)]
    with torch.inference_mode():
        # once uncounted: a compiled UNet compiles for these shapes here, not inside the count
        code = edit_friendly.invert(models.unet, models.scheduler, x0, cond, uncond, num_steps=2, cfg_scale=CFG_SOURCE,
                                    generator=[torch.Generator().manual_seed(k) for k in range(rows)])
        edit_friendly.edit(models.unet, models.scheduler, code, cond, uncond,
                           cfg_scale=torch.tensor([CFG_TARGET] * (rows - 1) + [CFG_SOURCE]))
        with count_host_syncs(dev, started=False) as inv:
            code = edit_friendly.invert(gate_net(models.unet, inv), models.scheduler, x0, cond, uncond, num_steps=steps,
                                        cfg_scale=CFG_SOURCE, generator=gens)
        scales = torch.tensor([CFG_TARGET] * (rows - 1) + [CFG_SOURCE])
        with count_host_syncs(dev, started=False) as ed:
            edit_friendly.edit(gate_net(models.unet, ed), models.scheduler, code, cond, uncond, cfg_scale=scales)
    return {"invert": inv.count / steps, "edit": ed.count / steps, "steps": steps,
            "how": "cuda_sync_debug_mode" if dev.type == "cuda" else "dispatch_counter",
            "events": (inv.events + ed.events)[:10]}


def physical_limit_edits_per_s(peak_tflops: float | None, flops_per_eval: int | None, evals_per_edit: float) -> float | None:
    """Edits/s if every FLOP of the UNet ran at the device's dense bf16 peak
    (UNet only: VAE, text encoder and scores not counted). 989 TFLOP/s,
    803.3 GFLOP per SD-1.5 evaluation at 512 px and 168 evaluations per
    edit give about 7.3 edits/s."""
    if not peak_tflops or not flops_per_eval or not evals_per_edit:
        return None
    return peak_tflops * 1e12 / (flops_per_eval * evals_per_edit)


def _score(scorers, outs) -> None:
    from .worker import score_outs

    score_outs(scorers, outs, scorers.device)


def run_reference(models, raws: list[dict], *, steps: int, skip: int, seeds: int, run_seed: int = 0) -> dict:
    """The reference implementation's call pattern on the same math: per
    image, per seed a full `steps` inversion, then per target an edit over
    the last `steps - skip` steps; every UNet evaluation is a batch-1 call,
    unconditional and conditional separately. Noise comes from the engine's
    per-(image, seed) seeds, so the edits equal the engine's."""
    import torch

    from .data import encode_image
    from .engine import CallCounter, derive_seed
    from .inversion.common import Schedule, as_eps_model, ddim_mean, q_sample

    dev = models.device
    sw = Stopwatch(dev)
    schedule = Schedule.from_scheduler(models.scheduler, steps)
    unet = CallCounter(models.unet)
    eps_model = as_eps_model(unet, schedule)
    ts = schedule.timesteps.tolist()
    ab, ab_prev = schedule.ab.tolist(), schedule.ab_prev.tolist()
    sigma = [schedule.sigma(i, 1.0) for i in range(steps)]

    def guided(x, i, uncond, cond, scale):
        eps_u = eps_model(x, ts[i], uncond)
        eps_c = eps_model(x, ts[i], cond)
        return eps_u + scale * (eps_c - eps_u)

    def prompt_pair(s, prompt):
        # (unconditional, conditional), as the engine conditions them: an SDXL
        # model's zero unconditional embedding and the image's time ids
        from .models import image_geometry
        from .spec import ImageSpec

        emb = models.encode_text(["", prompt])
        geo = [image_geometry(s.orig_size, tuple(s.image.shape[1:]), ImageSpec(resize="square"), models.resolution)]
        return (models.for_images(models.unconditional(emb[0:1]), geo, unconditional=True),
                models.for_images(emb[1:2], geo))

    edits = {}
    _peak_memory_reset(dev)
    sw.sync()
    t_start, c_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for raw in raws:
            with sw("decode"):
                s = _decode(raw, models.resolution)
            with sw("vae_encode"):
                x0 = models.encode_images(s.image[None])
            for n in range(seeds):
                with sw("invert"):
                    uncond, cond = prompt_pair(s, s.source_prompt)
                    g = torch.Generator("cpu").manual_seed(derive_seed(run_seed, s.key, n))
                    noise = torch.randn((steps, *x0.shape[1:]), generator=g).to(dev)  # index 0 = t smallest
                    xts = [q_sample(x0, ab[i], noise[steps - 1 - i][None]) for i in range(steps)] + [x0]
                    zs = []
                    x_t = xts[0]
                    for i in range(steps):
                        eps = guided(x_t, i, uncond, cond, CFG_SOURCE)
                        mu = ddim_mean(x_t, eps, ab[i], ab_prev[i], sigma[i])
                        z = (xts[i + 1] - mu) / sigma[i]
                        zs.append(z)
                        x_t = mu + sigma[i] * z
                for k, target in enumerate(s.target_prompts):
                    with sw("edit"):
                        uncond, cond = prompt_pair(s, target)
                        x = xts[skip]
                        for i in range(skip, steps):
                            eps = guided(x, i, uncond, cond, CFG_TARGET)
                            x = ddim_mean(x, eps, ab[i], ab_prev[i], sigma[i]) + sigma[i] * zs[i]
                    with sw("vae_decode"):
                        img = models.decode_latents(x)[0].cpu()
                    with sw("write"):
                        encode_image(img, OUTPUT_FORMAT, OUTPUT_QUALITY)
                    edits[(s.key, k, n)] = img
    seconds = time.perf_counter() - t_start
    return {
        "seconds": seconds, "cpu_seconds": time.process_time() - c_start, "stages": dict(sw.seconds), "edits": edits, "images": len(raws),
        "unet_calls": unet.calls, "unet_image_evals": unet.rows, "peak_memory": _peak_memory(dev),
        "nonfinite_edits": sum(int(not torch.isfinite(v).all()) for v in edits.values()),
    }


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def _summary(runs: list[dict], flops_per_eval: int | None, peak_tflops: float | None, closed_form: int, k_n: int) -> dict:
    """Medians over repeats of one path, with derived rates."""
    secs = [r["seconds"] for r in runs]
    seconds = statistics.median(secs)
    first = runs[0]
    edits, images = len(first["edits"]), first["images"]
    stage_names = [s for s in STAGES if any(s in r["stages"] for r in runs)]
    stage_names += sorted({s for r in runs for s in r["stages"]} - set(stage_names))
    stages = {s: statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in stage_names}
    evals = first["unet_image_evals"]
    cpu_seconds = statistics.median(r["cpu_seconds"] for r in runs)
    out = {
        "seconds": seconds,
        "seconds_all": secs,
        "cpu_seconds": cpu_seconds,
        "cpu_seconds_all": [r["cpu_seconds"] for r in runs],
        "edits": edits,
        "images": images,
        "edits_per_s": edits / seconds,
        "images_per_s": images / seconds,
        "edits_per_cpu_s": edits / cpu_seconds if cpu_seconds > 0 else None,
        "unet_calls": first["unet_calls"],
        "unet_image_evals": evals,
        "unet_image_evals_per_edit": evals / max(1, edits),
        "unet_image_evals_closed_form": closed_form,
        "unet_rows_per_call": evals / max(1, first["unet_calls"]),
        "stages_s": stages,
        "unet_tflop": None, "tflops": None, "tflops_unet_stages": None, "bf16_peak_fraction": None,
        "peak_memory_bytes": max(r["peak_memory"][0] for r in runs),
        "peak_memory_kind": first["peak_memory"][1],
        "nonfinite_edits": first["nonfinite_edits"],
        "unet_busy_s": None, "unet_busy_fraction": None, "edits_per_s_physical_limit": None,
    }
    if "unet_busy_seconds" in first:
        out["unet_busy_s"] = statistics.median(r["unet_busy_seconds"] for r in runs)
        out["unet_busy_fraction"] = statistics.median(r["unet_busy_seconds"] / r["engine_seconds"] for r in runs
                                                      if r["engine_seconds"] > 0)
    out["edits_per_s_physical_limit"] = physical_limit_edits_per_s(peak_tflops, flops_per_eval,
                                                                   out["unet_image_evals_per_edit"])
    if flops_per_eval:
        total = flops_per_eval * evals
        unet_s = stages.get("invert", 0.0) + stages.get("edit", 0.0)
        out["unet_tflop"] = total / 1e12
        out["tflops"] = total / seconds / 1e12
        out["tflops_unet_stages"] = total / unet_s / 1e12 if unet_s > 0 else None
        if peak_tflops:
            out["bf16_peak_fraction"] = out["tflops"] / peak_tflops
    assert edits == k_n, (edits, k_n)
    return out


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the benchmark and return the result (the JSON document)."""
    import torch

    cfg.validate()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_bench(cfg, log)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's setting as it was


def _setup(cfg: BenchConfig, log) -> dict:
    """Device, dtype, models (the fp32 reference copy and ours), FLOPs per
    evaluation and the environment both kinds of bench report."""
    import diffusers
    import torch
    import transformers

    from .models import default_device, parse_dtype

    device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)
    load0 = os.getloadavg()

    t0 = time.perf_counter()
    ref_models = load_bench_models(cfg.model, device, torch.float32)  # the reference runs fp32
    if not cfg.sdpa and getattr(ref_models, "family", "") != "flow":
        _classic_attention(ref_models)
    models = _ours_models(ref_models, dtype, cfg.channels_last, cfg.compile)
    load_s = time.perf_counter() - t0
    res = models.resolution
    latent_hw = (res // models.vae_scale_factor,) * 2
    try:
        flops = flops_per_eval(ref_models, latent_hw)
    except Exception as exc:  # a UNet the meta device cannot build: report without TFLOP/s
        log(f"imprint bench: FLOP count unavailable ({type(exc).__name__}: {exc})")
        flops = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    peak = bf16_peak_tflops(device_name) if device.type == "cuda" else None

    def env() -> dict:
        return {
            "device": str(device), "device_name": device_name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
            "bf16_peak_tflops": peak, "model_load_s": load_s,
            # what fp32 means for the reference on a GPU: TF32 tensor cores or not
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        }

    model = {"id": cfg.model, "resolution": res, "latent_shape": [int(ref_models.vae.config.latent_channels), *latent_hw],
             "family": getattr(ref_models, "family", "sd"),
             "random_weights": bool(ref_models.random_weights),
             "unet_parameters": sum(p.numel() for p in ref_models.unet.parameters())}
    return {"device": device, "dtype": dtype, "ref_models": ref_models, "models": models, "flops": flops,
            "peak": peak, "env": env, "model": model}


def _run_bench(cfg: BenchConfig, log) -> dict:
    import torch

    if cfg.method in ("turbo-edit", "flow"):
        return _run_method_bench(cfg, log)
    su = _setup(cfg, log)
    device, dtype, ref_models, models, flops, peak = (su[k] for k in ("device", "dtype", "ref_models", "models", "flops", "peak"))
    res = models.resolution

    scorers = None
    if cfg.score:
        from .scoring import TINY_CLIP, ScoreConfig, Scorers

        clip = TINY_CLIP if cfg.model == "tiny" else "ViT-L-14"
        scorers = Scorers.load(ScoreConfig(clip_model=clip, clip_pretrained="none", lpips_net="alex",
                                           lpips_pretrained=False), device, dtype)

    raws = synthetic_raw_samples(cfg.images, cfg.prompts, res, cfg.seed)
    spec = _ours_spec(cfg, cfg.steps, cfg.skip)
    if cfg.warmup:
        # Same batch shapes, two steps: first-call costs (allocator, kernel
        # selection, torch.compile) stay out of the measurement.
        log("imprint bench: warm-up")
        run_ours(models, _ours_spec(cfg, 2, 0), raws, scorers)
        if cfg.reference:
            run_reference(ref_models, raws[:1], steps=2, skip=0, seeds=1, run_seed=cfg.seed)

    ours_runs, ref_runs = [], []
    for r in range(cfg.repeats):
        log(f"imprint bench: repeat {r + 1}/{cfg.repeats}: ours")
        ours_runs.append(run_ours(models, spec, raws, scorers))
        if cfg.reference:
            log(f"imprint bench: repeat {r + 1}/{cfg.repeats}: reference")
            ref_runs.append(run_reference(ref_models, raws, steps=cfg.steps, skip=cfg.skip, seeds=cfg.seeds,
                                          run_seed=cfg.seed))

    log("imprint bench: host syncs per step")
    syncs = host_syncs_per_step(models)
    k_n = cfg.images * cfg.prompts * cfg.seeds
    ours = _summary(ours_runs, flops, peak, evals_ours(cfg.steps, cfg.skip, cfg.prompts, cfg.seeds, cfg.images, cfg.recon), k_n)
    if scorers is not None:
        ours["edits_per_s_with_score"] = ours["edits"] / (ours["seconds"] + ours["stages_s"].get("score", 0.0))
    ours["recon_error_max"] = ours_runs[0]["recon_error_max"] if cfg.recon else None
    ours["recon_error_mean"] = ours_runs[0]["recon_error_mean"] if cfg.recon else None
    result = {
        "bench_version": 2,
        "params": {**asdict(cfg), "cfg_source": CFG_SOURCE, "cfg_target": CFG_TARGET, "method": "edit-friendly",
                   "dtype_ours": str(dtype).removeprefix("torch."), "dtype_reference": "float32",
                   "output_format": OUTPUT_FORMAT},
        "env": su["env"](),
        "model": su["model"],
        "unet_flops_per_image_eval": flops,
        "host_syncs_per_step": syncs,
        "paths": {"ours": ours},
        "speedup": None,
        "speedup_cpu_time": None,
        "speedup_per_repeat": None,
        "checks": {
            "recon_error_max": ours["recon_error_max"],
            "counts_match_closed_form": ours["unet_image_evals"] == ours["unet_image_evals_closed_form"],
        },
    }
    if cfg.reference:
        ref = _summary(ref_runs, flops, peak, evals_reference(cfg.steps, cfg.skip, cfg.prompts, cfg.seeds, cfg.images), k_n)
        result["paths"]["reference"] = ref
        result["speedup"] = ours["edits_per_s"] / ref["edits_per_s"]
        if ours["edits_per_cpu_s"] and ref["edits_per_cpu_s"]:
            result["speedup_cpu_time"] = ours["edits_per_cpu_s"] / ref["edits_per_cpu_s"]
        # each repeat runs ours then the reference back to back: these pairs share the machine's conditions
        result["speedup_per_repeat"] = [r["seconds"] / o["seconds"] for o, r in zip(ours_runs, ref_runs)]
        a, b = ours_runs[0]["edits"], ref_runs[0]["edits"]
        if set(a) != set(b):
            raise RuntimeError("the two paths produced different sets of edits")
        diff = max(float((a[key] - b[key]).abs().max()) for key in a)
        result["checks"]["edits_max_abs_diff_vs_reference"] = diff
        result["checks"]["counts_match_closed_form"] &= ref["unet_image_evals"] == ref["unet_image_evals_closed_form"]
    return result


def _method_pair(cfg: BenchConfig, models) -> tuple[dict, dict, dict, dict]:
    """The two methods a methods bench compares: their specs, warm-up specs,
    closed-form evaluation counts and parameters. turbo-edit: turbo-edit at
    `turbo_steps` against edit-friendly at `steps`/`skip` (the paper's
    guidance). flow: FlowEdit against edit-friendly, both at `steps`/`skip`,
    with FlowEdit's paper guidance for the model (SD3 CFG 3.5/13.5, FLUX-dev's
    embedded 1.5/5.5)."""
    if cfg.method == "turbo-edit":
        specs = {"turbo-edit": _ours_spec(cfg, cfg.turbo_steps, 0, "turbo-edit"),
                 "edit-friendly": _ours_spec(cfg, cfg.steps, cfg.skip, "edit-friendly")}
        warm = {"turbo-edit": _ours_spec(cfg, min(2, cfg.turbo_steps), 0, "turbo-edit"),
                "edit-friendly": _ours_spec(cfg, 2, 0)}
        closed = {"turbo-edit": evals_turbo(cfg.turbo_steps, cfg.prompts, cfg.seeds, cfg.images, cfg.recon),
                  "edit-friendly": evals_ours(cfg.steps, cfg.skip, cfg.prompts, cfg.seeds, cfg.images, cfg.recon)}
        params = {"turbo_edit": {"steps": cfg.turbo_steps, "skip": 0, "cfg": 1.0, "w": 1.5},
                  "edit_friendly": {"steps": cfg.steps, "skip": cfg.skip, "cfg_source": CFG_SOURCE,
                                    "cfg_target": CFG_TARGET}}
        return specs, warm, closed, params
    if getattr(models, "family", "") != "flow":
        raise ValueError(f"--method flow measures a flow model (tiny-sd3, tiny-flux, SD3, FLUX); {cfg.model!r} is not one")
    embedded = bool(models.guidance_embeds)
    pair = (1.5, 5.5) if embedded else (3.5, 13.5)
    names = ("flowedit", "edit-friendly")
    specs = {n: _ours_spec(cfg, cfg.steps, cfg.skip, n, pair) for n in names}
    warm = {n: _ours_spec(cfg, 2, 0, n, pair) for n in names}
    closed = {n: evals_flow(n, cfg.steps, cfg.skip, cfg.prompts, cfg.seeds, cfg.images, cfg.recon,
                            1 if embedded else 2) for n in names}
    params = {n.replace("-", "_"): {"steps": cfg.steps, "skip": cfg.skip, "cfg_source": pair[0], "cfg_target": pair[1],
                                    "guidance": "embedded" if embedded else "cfg"} for n in names}
    return specs, warm, closed, params


def _run_method_bench(cfg: BenchConfig, log) -> dict:
    """Two methods through the engine on the same model, inputs, seeds and
    dtype, in one run (see `_method_pair`): edits/s, denoiser
    image-evaluations and FLOPs per edit, and their ratios (the first
    method's speed over the second's)."""
    su = _setup(cfg, log)
    models, flops, peak = su["models"], su["flops"], su["peak"]
    raws = synthetic_raw_samples(cfg.images, cfg.prompts, models.resolution, cfg.seed)
    specs, warm, closed, method_params = _method_pair(cfg, models)
    if cfg.warmup:
        log("imprint bench: warm-up")
        for spec in warm.values():
            run_ours(models, spec, raws)
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for r in range(cfg.repeats):
        for name, spec in specs.items():  # back to back in each repeat: the pair shares the machine's conditions
            log(f"imprint bench: repeat {r + 1}/{cfg.repeats}: {name}")
            runs[name].append(run_ours(models, spec, raws))
    k_n = cfg.images * cfg.prompts * cfg.seeds
    paths = {}
    for name in specs:
        paths[name] = _summary(runs[name], flops, peak, closed[name], k_n)
        paths[name]["recon_error_max"] = runs[name][0]["recon_error_max"] if cfg.recon else None
        if flops:
            paths[name]["flops_per_edit"] = flops * paths[name]["unet_image_evals_per_edit"]
    first, second = list(specs)
    a, b = paths[first], paths[second]
    return {
        "bench_version": 2,
        "kind": "methods",
        "methods": [first, second],
        "params": {**asdict(cfg), "cfg_source": CFG_SOURCE, "cfg_target": CFG_TARGET,
                   "dtype_ours": str(su["dtype"]).removeprefix("torch."), "output_format": OUTPUT_FORMAT,
                   **method_params},
        "env": su["env"](),
        "model": su["model"],
        "unet_flops_per_image_eval": flops,
        "paths": paths,
        # edits/s of the first method / edits/s of the second (per edit: how many times faster)
        "speedup": a["edits_per_s"] / b["edits_per_s"],
        "speedup_cpu_time": (a["edits_per_cpu_s"] / b["edits_per_cpu_s"]
                             if a["edits_per_cpu_s"] and b["edits_per_cpu_s"] else None),
        "speedup_per_repeat": [y["seconds"] / x["seconds"] for x, y in zip(runs[first], runs[second])],
        "evals_per_edit_ratio": b["unet_image_evals_per_edit"] / a["unet_image_evals_per_edit"],
        "checks": {
            "recon_error_max": {name: p["recon_error_max"] for name, p in paths.items()},
            "counts_match_closed_form": all(p["unet_image_evals"] == p["unet_image_evals_closed_form"]
                                            for p in paths.values()),
        },
    }


# ---------------------------------------------------------------------------
# Presentation
# ---------------------------------------------------------------------------


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def format_table(result: dict) -> str:
    p, env, model = result["params"], result["env"], result["model"]
    paths = result["paths"]
    names = list(paths)
    methods = result.get("kind") == "methods"
    first, second = result.get("methods", names)[:2] if methods else ("ours", "reference")
    flow = methods and first == "flowedit"
    what = (f"flowedit vs edit-friendly, both {p['steps']} steps (skip {p['skip']}, guidance "
            f"{p['flowedit']['cfg_source']}/{p['flowedit']['cfg_target']} {p['flowedit']['guidance']}), both "
            f"{p['dtype_ours']} through the engine\n" if flow else
            f"turbo-edit {p['turbo_steps']} steps vs edit-friendly {p['steps']} steps (skip {p['skip']}, cfg "
            f"{p['cfg_source']}/{p['cfg_target']}), both {p['dtype_ours']} through the engine\n" if methods else
            f"ours {p['dtype_ours']}, reference {p['dtype_reference']}\nsteps {p['steps']}, skip {p['skip']}, ")
    head = (
        f"imprint bench: {model['id']}{' (random weights)' if model['random_weights'] else ''} "
        f"{model['resolution']}x{model['resolution']} on {env['device']} ({env['device_name']}, "
        f"{env['torch_threads']} threads), {what}"
        f"K={p['prompts']} prompts, N={p['seeds']} seeds, "
        f"{p['images']} image(s), max UNet batch {p['batch']}, compile {p['compile']}, "
        f"channels-last {p['channels_last']}, sdpa {p['sdpa']}, recon row {p['recon']}, repeats {p['repeats']} (medians)\n"
        f"load average {env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end"
    )
    rows = [
        ("edits/s", "edits_per_s", ".3g"), ("images/s", "images_per_s", ".3g"), ("seconds", "seconds", ".3f"),
        ("CPU seconds (process)", "cpu_seconds", ".3f"), ("edits per CPU second", "edits_per_cpu_s", ".3g"),
        ("edits", "edits", ""), ("UNet calls", "unet_calls", ""), ("UNet image-evals", "unet_image_evals", ""),
        ("UNet image-evals/edit", "unet_image_evals_per_edit", ".4g"), ("UNet rows/call", "unet_rows_per_call", ".3g"),
        ("UNet TFLOP/s (path)", "tflops", ".3g"), ("UNet TFLOP/s (invert+edit)", "tflops_unet_stages", ".3g"),
        ("fraction of bf16 peak", "bf16_peak_fraction", ".3f"),
        ("physical limit edits/s", "edits_per_s_physical_limit", ".3g"),
        ("UNet busy share of engine", "unet_busy_fraction", ".3f"),
    ]
    width = 30
    lines = [head, "", f"{'':{width}}" + "".join(f"{n:>14}" for n in names)]
    for label, key, spec in rows:
        lines.append(f"{label:{width}}" + "".join(f"{_fmt(paths[n].get(key), spec):>14}" for n in names))
    mem = [paths[n]["peak_memory_bytes"] / 2**20 for n in names]
    lines.append(f"{'peak memory MiB (' + paths[names[0]]['peak_memory_kind'] + ')':{width}}" + "".join(f"{m:>14.0f}" for m in mem))
    stages = list(dict.fromkeys(s for n in names for s in paths[n]["stages_s"]))
    for s in stages:
        lines.append(f"{'  ' + s + ' s':{width}}" + "".join(f"{_fmt(paths[n]['stages_s'].get(s), '.3f'):>14}" for n in names))
    lines.append("")
    if result["speedup"] is not None:
        per = ", ".join(f"{x:.2f}" for x in result["speedup_per_repeat"])
        ratio = f"{first} / {second}"
        lines.append(f"speed-up (edits/s {ratio}): {result['speedup']:.2f}x (per repeat: {per})")
        if methods:
            lines.append(f"{'transformer' if flow else 'UNet'} image-evals per edit, {second} / {first}: "
                         f"{result['evals_per_edit_ratio']:.2f}x")
        if result["speedup_cpu_time"] is not None:
            lines.append(f"speed-up by process CPU time: {result['speedup_cpu_time']:.2f}x")
    c = result["checks"]
    recon = c["recon_error_max"]
    recon = (", ".join(f"{k} {_fmt(v, '.2e')}" for k, v in recon.items()) if isinstance(recon, dict)
             else _fmt(recon, ".2e"))
    lines.append(f"checks: reconstruction max |latent error| {recon}; "
                 + (f"edits max |ours - reference| {c['edits_max_abs_diff_vs_reference']:.2e} (pixels in [-1, 1]); "
                    if "edits_max_abs_diff_vs_reference" in c else "")
                 + f"counts match closed form: {c['counts_match_closed_form']}")
    if result["unet_flops_per_image_eval"]:
        net = "transformer" if model.get("family") == "flow" else "UNet"
        lines.append(f"{net} FLOPs per image-evaluation: {result['unet_flops_per_image_eval'] / 1e9:.4g} GFLOP")
        per_edit = [(n, paths[n].get("flops_per_edit")) for n in names if paths[n].get("flops_per_edit")]
        if per_edit:
            lines.append(f"{net} FLOPs per edit: " + ", ".join(f"{n} {v / 1e9:.4g} GFLOP" for n, v in per_edit))
    hs = result.get("host_syncs_per_step")
    if hs:
        lines.append(f"host syncs per denoising step ({hs['how']}): invert {hs['invert']:.2f}, edit {hs['edit']:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def bench(
    model: str = typer.Option("tiny", help="tiny | tiny-sdxl | sd15-random (SD-1.5-shaped, random weights, 512px) | sdxl-random (SDXL-shaped, random weights, 512px) | a checkpoint id or folder."),
    steps: int = typer.Option(100, help="Inference steps."),
    skip: int = typer.Option(36, help="Steps skipped by the edit (T_skip)."),
    prompts: int = typer.Option(4, help="K target prompts per image."),
    seeds: int = typer.Option(4, help="N seeds (codes) per image."),
    images: int = typer.Option(1, help="Images per run (inverted together by ours)."),
    batch: int = typer.Option(64, help="Ours: max rows per UNet call (batch.max_unet_batch; the job default)."),
    decode_batch: int = typer.Option(8, help="Ours: rows per VAE call (batch.max_decode_batch; the job default)."),
    dtype: str = typer.Option("auto", help="Ours: auto | fp32 | fp16 | bf16 (the reference runs fp32)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="Ours: torch.compile the UNet."),
    channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last", help="Ours: channels-last UNet and VAE."),
    sdpa: bool = typer.Option(True, "--sdpa/--no-sdpa", help="--no-sdpa: classic attention processor (both paths)."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also time the reference call pattern."),
    repeats: int = typer.Option(1, help="Runs per path; medians are reported."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Two-step warm-up run of each path first."),
    score: bool = typer.Option(False, "--score/--no-score", help="Ours: time CLIP/LPIPS scoring (random-weight scorers)."),
    recon: bool = typer.Option(True, "--recon/--no-recon", help="Ours: the reconstruction-check row per image."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    method: str = typer.Option("edit-friendly", help="edit-friendly: the engine against the reference call pattern; "
                               "turbo-edit: turbo-edit against edit-friendly at --steps/--skip on the same model; "
                               "flow: on a flow model (tiny-sd3, tiny-flux, SD3, FLUX), flowedit against "
                               "edit-friendly at --steps/--skip."),
    turbo_steps: int = typer.Option(4, help="--method turbo-edit: turbo-edit's steps."),
    out: Path = typer.Option(Path("bench.json"), help="Where to write the JSON result."),
) -> None:
    """Measure edits/s of the engine against the reference call pattern (or turbo-edit against edit-friendly) on this machine."""
    cfg = BenchConfig(model=model, steps=steps, skip=skip, prompts=prompts, seeds=seeds, images=images, batch=batch,
                      decode_batch=decode_batch,
                      dtype=dtype, device=device, compile=compile_, channels_last=channels_last, sdpa=sdpa,
                      reference=reference, repeats=repeats, warmup=warmup, score=score, recon=recon,
                      threads=threads, method=method, turbo_steps=turbo_steps)
    try:
        result = run_bench(cfg, log=lambda m: typer.echo(m, err=True))
    except ValueError as exc:
        typer.echo(f"imprint: error: {exc}", err=True)
        raise typer.Exit(2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    typer.echo(format_table(result))
    typer.echo(f"imprint: wrote {out}")
