"""The Stable Diffusion family (SD 1.x/2.x and SDXL): loading UNet, VAE,
text encoders and the DDIM scheduler, and the thin adapters around them.

`load_models("tiny")` builds a small randomly initialised SD-shaped pipeline
offline and deterministically (for tests), `load_models("tiny-sdxl")` an
SDXL-shaped one; `load_models("toy")` loads the small trained model shipped
in `pipeline/toy/weights/toy` (64x64 images of coloured shapes) through the
same local-folder path as any checkpoint; any other id is a diffusers-format
Stable Diffusion 1.x/2.x or SDXL repository id or local folder (the family
is read from its UNet: an SDXL UNet takes `text_time` added conditioning).
The inversion math never sees these objects beyond the UNet callable, the
scheduler and the `Conditioning` rows; encoding text and images, and what a
model family conditions on, lives here.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..inversion.common import Conditioning
from .loading import (LatentCodec, ModelLimits, clip_tokenizer, config_file, default_device, folder_weights_missing,
                      hub_weights_missing, parse_dtype,
                      index_has, model_index, vae_scale_factor)
from .sdxl import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, ImageGeometry, time_ids_count

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
TINY_SEED = 0
TINY_RESOLUTION = 128  # pixels; 16x16 latents with the SD-like factor-8 VAE




@dataclass
class Models(LatentCodec):
    """The components of one loaded pipeline, with the encoders the batch
    engine needs. Holds weights only; no per-request state.

    The SDXL family (`family == "sdxl"`) has a second tokenizer and text
    encoder (`text_encoder_2`, with a projection: its pooled output is the
    UNet's `text_embeds`) and micro-conditioning `time_ids` of `n_time_ids`
    values per row (6; 5 for the refiner's aesthetic-score variant); for SD
    1.x/2.x those are None / 0 and every conditioning is token embeddings only."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    model_id: str
    random_weights: bool
    resolution: int  # native image size in pixels
    # The tokenizer is Rust-backed and not thread-safe: the reader thread
    # counts tokens while the main thread encodes prompts, and concurrent
    # calls (one with truncation, one without) returned wrong counts.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    # the unconditional rows are zeros, not the encoding of "" (SDXL's model_index.json)
    force_zeros_uncond: bool = False
    n_time_ids: int = 0
    # the VAE's own dtype: float32 when its config asks for upcasting (the SDXL VAE overflows in fp16)
    vae_dtype: torch.dtype | None = None

    @property
    def family(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    def _tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    def _tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        with self.tokenizer_lock:
            tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
        return tok.input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning, one row each (padding to max length, as SD).

        SD 1.x/2.x: the text encoder's last hidden states [N, 77, D].
        SDXL: both encoders' penultimate hidden states concatenated on the
        last dim [N, 77, D1 + D2] and the pooled embedding of the second
        encoder's projection as `text_embeds` [N, P]; the micro-conditioning
        `time_ids` depend on the image and come from `for_images`."""
        if self.text_encoder_2 is None:
            out = self.text_encoder(self._tokenize(self.tokenizer, prompts))
            return Conditioning(out[0].to(self.dtype))
        states = []
        if self.text_encoder is not None:  # (the SDXL refiner has only the second encoder)
            out = self.text_encoder(self._tokenize(self.tokenizer, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        out2 = self.text_encoder_2(self._tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        states.append(out2.hidden_states[-2])
        return Conditioning(torch.cat(states, dim=-1).to(self.dtype), {"text_embeds": out2.text_embeds.to(self.dtype)})

    def unconditional(self, empty: Conditioning | None = None) -> Conditioning:
        """The unconditional row for guidance from the encoding of "" (encoded
        here when not given): zeros, tokens and pooled alike, when the model
        says `force_zeros_for_empty_prompt`, else that encoding."""
        empty = self.encode_text([""]) if empty is None else empty
        if not self.force_zeros_uncond:
            return empty
        return Conditioning(torch.zeros_like(empty.tokens), {k: torch.zeros_like(v) for k, v in empty.added.items()})

    def time_ids(self, geometry: Sequence[ImageGeometry], *, unconditional: bool = False) -> torch.Tensor | None:
        """SDXL micro-conditioning [len(geometry), n_time_ids] float32 on the
        model's device, (height, width) order: orig size, crop top-left,
        target size; the refiner's 5 values end with the aesthetic score
        instead of the target size. None for a model without them."""
        if not self.n_time_ids:
            return None
        rows = []
        for g in geometry:
            if self.n_time_ids == 5:
                tail = (NEGATIVE_AESTHETIC_SCORE if unconditional else AESTHETIC_SCORE,)
            else:
                tail = tuple(g.target_hw)
            rows.append([*g.orig_hw, *g.crop_tl, *tail])
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def for_images(self, cond: Conditioning, geometry: Sequence[ImageGeometry], *,
                   unconditional: bool = False) -> Conditioning:
        """`cond` (1 row, or one per image) as one row per image, with what
        the model conditions on about each image (SDXL's time ids); for SD
        1.x/2.x `cond` itself."""
        ids = self.time_ids(geometry, unconditional=unconditional)
        if ids is None:
            return cond
        if len(cond) == 1 and len(geometry) != 1:
            cond = cond.expand(len(geometry))
        if len(cond) != len(geometry):
            raise ValueError(f"conditioning has {len(cond)} rows for {len(geometry)} images")
        return cond.with_added(time_ids=ids.to(cond.dtype))

    def count_tokens(self, prompt: str) -> int:
        """Tokens including start/end markers (to detect over-long prompts):
        the most any of the model's tokenizers gives."""
        with self.tokenizer_lock:
            return max(len(t(prompt, truncation=False).input_ids) for t in self._tokenizers())




def sd_scheduler_config() -> dict:
    """Stable Diffusion 1.x's DDIM configuration."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


# Randomly initialised SD-shaped pipelines, built offline from configs:
# "tiny" for tests and the offline demo, "sd15-random" (SD 1.5's published
# architecture) for benchmarks. Their images are noise; outputs say so.
SD15_RANDOM = "sd15-random"
SDXL_RANDOM = "sdxl-random"
_TEXT_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
RANDOM_MODELS = {
    TINY: dict(
        resolution=TINY_RESOLUTION,
        unet=dict(
            block_out_channels=(32, 64), layers_per_block=1,
            # attention only at the coarse level keeps CPU tests and the demo fast
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
        ),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    SD15_RANDOM: dict(
        resolution=512,
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
    ),
    # SDXL-shaped (as diffusers' own fast SDXL tests build one): no attention
    # in the first down block, two transformer layers in the second, text_time
    # added conditioning of 6 ids x 8 + the 32-d pooled text embedding
    TINY_SDXL: dict(
        resolution=TINY_RESOLUTION,
        unet=dict(
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64, norm_num_groups=16,
        ),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        scaling_factor=0.13025,
        force_zeros_for_empty_prompt=True,
    ),
    # SDXL's published architecture at SDXL-Turbo's native 512 px (the base
    # model's 1024 is the same network on 128x128 latents): 2.6 B UNet
    # parameters, CLIP ViT-L + OpenCLIP bigG text encoders, for GPU benches
    # (tools/gpu-check.sh) where no checkpoint can be downloaded.
    SDXL_RANDOM: dict(
        resolution=512,
        unet=dict(
            block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280, cross_attention_dim=2048, norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280),
        scaling_factor=0.13025,
        force_zeros_for_empty_prompt=True,
    ),
}


def build_random(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = TINY_SEED) -> Models:
    """A randomly initialised pipeline of a RANDOM_MODELS architecture,
    identical on every machine for a given seed. The VAE downsamples by 8
    like SD's, so the image geometry rules are the same as for real
    checkpoints. Weights are created on the target device (seconds instead
    of a minute on CPU for SD-1.5's ~1.1 B parameters)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = RANDOM_MODELS[name]
    device = torch.device(device)
    res = cfg["resolution"]
    text_encoder_2 = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=res // 8, in_channels=4, out_channels=4, **cfg["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=res,
                            scaling_factor=cfg.get("scaling_factor", 0.18215), **cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_IDS, **cfg["text"]))
        if "text_2" in cfg:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_IDS, **cfg["text_2"]))
    scheduler = DDIMScheduler(**sd_scheduler_config())
    tokenizer = clip_tokenizer()
    return _finish(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, name, True, res,
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer if text_encoder_2 is not None else None,
                   force_zeros=bool(cfg.get("force_zeros_for_empty_prompt", False)))


def build_tiny(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = TINY_SEED) -> Models:
    return build_random(TINY, device, dtype, seed)


def build_sd15_random(device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> Models:
    return build_random(SD15_RANDOM, device, dtype or torch.float32, seed)


def build_tiny_sdxl(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = TINY_SEED) -> Models:
    return build_random(TINY_SDXL, device, dtype, seed)



def _finish(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, model_id, random_weights, resolution, *,
            text_encoder_2=None, tokenizer_2=None, force_zeros: bool = False) -> Models:
    from diffusers.utils import logging as diffusers_logging

    n_time_ids = 0
    vae_dtype = None
    if text_encoder_2 is not None:
        n_time_ids = time_ids_count(unet, int(text_encoder_2.config.projection_dim))
        if n_time_ids == 0:
            raise ValueError(f"model {model_id!r} has a second text encoder but its UNet takes no text_time conditioning")
        # the SDXL VAE overflows in half precision: its config asks for fp32
        if dtype != torch.float32 and bool(getattr(vae.config, "force_upcast", False)):
            vae_dtype = torch.float32
    # diffusers warns on every .to(dtype) cast, even when no module needs
    # keeping in fp32 (an empty list); keep the users' logs readable.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for m in (unet, vae, text_encoder, text_encoder_2):
            if m is None:
                continue
            m.eval().requires_grad_(False)
            m.to(device=device, dtype=vae_dtype if (m is vae and vae_dtype is not None) else dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return Models(unet, vae, text_encoder, tokenizer, scheduler, torch.device(device), dtype, model_id, random_weights,
                  resolution, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, force_zeros_uncond=force_zeros,
                  n_time_ids=n_time_ids, vae_dtype=vae_dtype)


@lru_cache(maxsize=8)
def _tiny_cached(name: str, device: str, dtype: torch.dtype) -> Models:
    # Weights are read-only (eval, no grad) and nothing per-request is stored
    # on them, so one build per process serves every worker and test.
    return build_random(name, device, dtype)


def load(
    model_id: str = TINY,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> Models:
    """Load a pipeline's components.

    model_id: "tiny", "tiny-sdxl", "sd15-random" or "sdxl-random" (random weights,
    offline), "toy" (the trained toy model shipped in the package, offline),
    a Hugging Face hub id (e.g. "CompVis/stable-diffusion-v1-4",
    "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/sdxl-turbo") or
    a local diffusers-format folder. A UNet with `text_time` added
    conditioning makes it an SDXL model: text_encoder_2/ and tokenizer_2/
    are loaded too (text_encoder/ may be absent, as in the refiner), and
    model_index.json's `force_zeros_for_empty_prompt` is honoured. A folder
    without tokenizer/ gets the CLIP BPE tokenizer (`clip_tokenizer`).
    device/dtype default to CUDA with bf16/fp16 when available, else CPU fp32.
    The scheduler is always a DDIMScheduler made from the checkpoint's own
    scheduler configuration (betas, offset, prediction type)."""
    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype, dev)
    if model_id in (TINY, TINY_SDXL):
        return _tiny_cached(model_id, str(dev), dt)
    if model_id in RANDOM_MODELS:
        return build_random(model_id, dev, dt)

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .toy import TOY, TOY_DIR

    name, model_id = model_id, (str(TOY_DIR) if model_id == TOY else model_id)
    if name == TOY and not (TOY_DIR / "unet").is_dir():
        raise ValueError(f"the toy model's weights are missing from {TOY_DIR} (incomplete installation?); "
                         "`make toy-model` trains them")
    local = os.path.isdir(model_id)
    kw = {"revision": revision} if revision else {}
    try:
        scheduler = DDIMScheduler.from_pretrained(model_id, subfolder="scheduler", **kw)
        unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dt, **kw)
        sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        index = model_index(model_id, revision) if sdxl else {}
        text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
        if not sdxl or index_has(index, "text_encoder"):
            if local and not os.path.isdir(os.path.join(model_id, "tokenizer")):
                tokenizer = clip_tokenizer()
            else:
                tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kw)
            text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=dt, **kw)
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder_2",
                                                                         torch_dtype=dt, **kw)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dt, **kw)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load model {model_id!r}: expected a diffusers-format Stable Diffusion or SDXL folder or hub id "
            f"(with unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/): {exc}"
        ) from exc
    resolution = int(unet.config.sample_size) * vae_scale_factor(vae)
    return _finish(unet, vae, text_encoder, tokenizer if tokenizer is not None else tokenizer_2, scheduler, dev, dt,
                   name, False, resolution, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                   force_zeros=bool(index.get("force_zeros_for_empty_prompt", True)) if sdxl else False)


def save_pipeline(models: Models, folder: str | os.PathLike) -> None:
    """Write a loaded model as a diffusers-format folder (what `load_models`
    reads back): an SDXL pipeline with both encoders and its
    `force_zeros_for_empty_prompt`, or an SD one."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if models.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
                                         tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2, unet=models.unet,
                                         scheduler=models.scheduler, force_zeros_for_empty_prompt=models.force_zeros_uncond)
    else:
        pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                       unet=models.unet, scheduler=models.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))


def _limits_from_configs(scheduler: dict, text: dict, tokenizer: dict, unet: dict, vae: dict,
                         text_2: dict | None = None, tokenizer_2: dict | None = None) -> ModelLimits:
    vae_factor = 2 ** (len(vae.get("block_out_channels", (128, 256, 512, 512))) - 1)  # halves per extra block
    unet_factor = 2 ** (len(unet.get("block_out_channels", (320, 640, 1280, 1280))) - 1)
    # every text encoder and tokenizer present bounds the context (SDXL has two)
    bounds = [int(t["max_position_embeddings"]) for t in (text, text_2) if t and "max_position_embeddings" in t]
    bounds += [int(t["model_max_length"]) for t in (tokenizer, tokenizer_2) if t and t.get("model_max_length")]
    context = min(bounds) if bounds else 77
    return ModelLimits(num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)), text_context=context,
                       family="sdxl" if unet.get("addition_embed_type") == "text_time" else "sd",
                       latent_multiple=vae_factor * unet_factor,
                       resolution=int(unet.get("sample_size", 64)) * vae_factor)


def _random_model_limits(name: str) -> ModelLimits:
    cfg = RANDOM_MODELS[name]
    text_2 = {**_TEXT_IDS, **cfg["text_2"]} if "text_2" in cfg else None
    return _limits_from_configs(sd_scheduler_config(), {**_TEXT_IDS, **cfg["text"]}, {"model_max_length": 77},
                                {**cfg["unet"], "sample_size": cfg["resolution"] // 8}, cfg["vae"],
                                text_2, {"model_max_length": 77} if text_2 else None)


# Built-in model ids -> their limits without building them (other branches
# add their built-in models here).
BUILTIN_LIMITS = {name: (lambda name=name: _random_model_limits(name)) for name in RANDOM_MODELS}
BUILTIN_LIMITS["toy"] = lambda: _toy_limits()
# the ids this family builds (random weights) or ships (the toy model) offline
BUILTIN = tuple(BUILTIN_LIMITS)


def _toy_limits() -> ModelLimits:
    from .toy import TOY_DIR

    return model_limits(str(TOY_DIR))  # a local diffusers folder inside the package


def model_limits(model_id: str, revision: str | None = None) -> ModelLimits:
    """The limits of a model id, from its configuration files only (no
    weights): a built-in model, a local diffusers folder, or a hub id
    (from the local cache when offline). Raises ValueError when the id does
    not resolve."""
    if model_id in BUILTIN_LIMITS:
        return BUILTIN_LIMITS[model_id]()
    files = {"scheduler": "scheduler/scheduler_config.json", "unet": "unet/config.json", "vae": "vae/config.json",
             "text": "text_encoder/config.json", "tokenizer": "tokenizer/tokenizer_config.json",
             "text_2": "text_encoder_2/config.json", "tokenizer_2": "tokenizer_2/tokenizer_config.json"}
    configs: dict = {}
    for part, rel in files.items():
        sdxl = configs.get("unet", {}).get("addition_embed_type") == "text_time"
        if part in ("text_2", "tokenizer_2") and not sdxl:
            continue  # (not looked up: offline, a hub id's cache lacks them)
        try:
            configs[part] = json.loads(config_file(model_id, rel, revision))
        except FileNotFoundError:
            # optional: a tokenizer (its encoder's config gives the context too) and the
            # SDXL refiner's first encoder
            if part in ("tokenizer", "tokenizer_2") or (part == "text" and sdxl):
                configs[part] = {}
                continue
            raise ValueError(f"model {model_id!r} has no {rel} (expected a diffusers-format Stable Diffusion "
                             "folder or hub id, or one of the built-in models: " + ", ".join(BUILTIN_LIMITS) + ")") from None
        except ValueError as exc:
            raise ValueError(f"model {model_id!r}: cannot read {rel}: {exc}") from None
    return _limits_from_configs(**configs)


def missing_model_weights(model_id: str, revision: str | None = None) -> str | None:
    """Why `load_models` would not find the model's weights, without loading
    them; None when they are at hand. Built-in random models need none; the
    toy model's and a local folder's must be files in their component
    folders; a hub model's must be in the local cache while the hub is
    offline (HF_HUB_OFFLINE=1; online, the worker downloads them)."""
    if model_id in RANDOM_MODELS:
        return None
    from .toy import TOY, TOY_DIR

    folder = str(TOY_DIR) if model_id == TOY else model_id
    parts = ["unet", "vae", "text_encoder"]
    if os.path.isdir(folder):
        hint = " (incomplete installation? `make toy-model` trains them)" if model_id == TOY else ""
        return folder_weights_missing(folder, model_id, parts, hint)
    return hub_weights_missing(model_id, parts, revision)
