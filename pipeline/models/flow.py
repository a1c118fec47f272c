"""The rectified-flow family: SD3 / SD3.5 (`SD3Transformer2DModel`, three
text encoders, pooled projections, joint attention) and FLUX.1
(`FluxTransformer2DModel`, 2x2-packed latents with RoPE position ids, FLUX-dev's
guidance embedding instead of classifier-free guidance), both on
`FlowMatchEulerDiscreteScheduler`'s sigmas.

What the flow methods see is `FlowNet`: a callable on unpacked latents
[B, C, H, W] and the level sigma, that knows each transformer's timestep
units (SD3 takes 1000 sigma, FLUX sigma) and FLUX's packing and position
ids (computed from the latent's own size, never from a pipeline's
vae_scale_factor). Text encoding, the VAE's shift and scale, and what each
model conditions on live here; the math in `pipeline.inversion.flow` is
model-agnostic.

Built-in random models (offline, for tests and benchmarks):
- "tiny-sd3": SD3's classes at diffusers' test sizes; the two CLIP encoders
  are tiny random CLIP models with the shipped CLIP tokenizer, and the T5
  part of the token sequence is zeros (what SD3 itself does without its
  T5 encoder), 8 tokens long.
- "sd3-random": SD3.5 medium's architecture at real size (random weights,
  no T5), for GPU benchmarks.
- "tiny-flux": FLUX's classes at diffusers' test sizes with
  `guidance_embeds=True` (the FLUX-dev path); its pooled CLIP encoder is a
  tiny random CLIP model, and a second tiny CLIP text model stands in for T5
  (no T5 vocabulary ships offline).
Their VAE is a small AutoencoderKL with SD's factor 8 and the flow VAEs'
shift_factor, so image geometry is as for real checkpoints.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..inversion.common import Conditioning
from .loading import (LatentCodec, ModelLimits, clip_tokenizer, config_file, default_device, folder_weights_missing,
                      hub_weights_missing, model_index, parse_dtype, vae_scale_factor)

TINY_SD3 = "tiny-sd3"
TINY_FLUX = "tiny-flux"
SD3_RANDOM = "sd3-random"
PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "FluxPipeline",
                    "FluxImg2ImgPipeline")
SD3, FLUX = "sd3", "flux"
# the transformer's patch of latent pixels per token: FLUX packs 2x2, SD3's patch embedding is 2x2
PATCH = 2

_TEXT_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
_TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 shift_factor=0.0609, scaling_factor=1.5035)
RANDOM_MODELS = {
    TINY_SD3: dict(
        kind=SD3, resolution=128, latent_channels=4,
        transformer=dict(sample_size=16, patch_size=PATCH, in_channels=4, out_channels=4, num_layers=1,
                         attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                         joint_attention_dim=32, pooled_projection_dim=64),
        # CLIP-L and CLIP-G stand-ins: hidden 16 + 16 = the joint dim 32, pooled 32 + 32 = 64
        text=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        text_2=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        t5_length=8,
    ),
    TINY_FLUX: dict(
        kind=FLUX, resolution=128, latent_channels=4,
        transformer=dict(patch_size=1, in_channels=4 * PATCH * PATCH, num_layers=1, num_single_layers=1,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        # the T5 stand-in: its last hidden states are the token sequence (joint dim 32)
        text_2=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    ),
    # SD3.5 medium's published architecture at its native 1024 px (2.5 B transformer parameters, MMDiT-X
    # dual attention in the first 13 layers, CLIP-L + CLIP-G; its T5 part zeros), random weights: for GPU
    # benches (tools/gpu-check.sh) where no checkpoint can be downloaded.
    SD3_RANDOM: dict(
        kind=SD3, resolution=1024, latent_channels=16,
        transformer=dict(sample_size=128, patch_size=PATCH, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                 shift_factor=0.0609, scaling_factor=1.5305),
        t5_length=256,
    ),
}
BUILTIN = tuple(RANDOM_MODELS)
# FlowMatchEulerDiscreteScheduler configurations of the real checkpoints
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing: [B, C, H, W] -> [B, (H/2)(W/2), 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of h x w."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's RoPE position ids of the packed tokens of an h x w latent: (0, row, col) per token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowNet(torch.nn.Module):
    """A flow transformer as a velocity callable `(x, sigma, tokens,
    added_cond_kwargs)` on unpacked latents; sigma is 0-d or one per row.
    `added_cond_kwargs` carries `pooled_projections` and, for FLUX-dev,
    `guidance` (one value per row)."""

    def __init__(self, transformer, kind: str):
        super().__init__()
        self.transformer = transformer
        self.kind = kind
        self.guidance_embeds = kind == FLUX and bool(getattr(transformer.config, "guidance_embeds", False))

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, added_cond_kwargs=None) -> torch.Tensor:
        added = added_cond_kwargs or {}
        b, _, h, w = x.shape
        sig = sigma.float().expand(b) if sigma.dim() == 0 else sigma.float()
        if self.kind == SD3:
            return self.transformer(hidden_states=x, timestep=sig * 1000.0, encoder_hidden_states=tokens,
                                    pooled_projections=added["pooled_projections"], return_dict=False)[0]
        guidance = added.get("guidance") if self.guidance_embeds else None
        out = self.transformer(
            hidden_states=pack(x), timestep=sig, guidance=None if guidance is None else guidance.float(),
            encoder_hidden_states=tokens, pooled_projections=added["pooled_projections"],
            txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)


@dataclass
class FlowModels(LatentCodec):
    """The components of one loaded flow pipeline, with the encoders the
    engine needs; the same surface as the SD family's `Models` (the engine
    calls `unet`, the velocity net here). Holds weights only."""

    transformer: Any
    vae: Any
    scheduler: Any
    kind: str  # "sd3" | "flux"
    device: torch.device
    dtype: torch.dtype
    model_id: str
    random_weights: bool
    resolution: int
    text_encoder: Any  # SD3: CLIP-L with projection; FLUX: CLIP-L (pooled)
    tokenizer: Any
    text_encoder_2: Any = None  # SD3: CLIP-G with projection; FLUX: T5 (or the tiny model's stand-in)
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5 (None: zeros, as SD3 runs without it)
    tokenizer_3: Any = None
    sequence_length: int = 256  # T5 tokens (SD3 256, FLUX 512; the tiny models' stand-ins fewer)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    vae_dtype: torch.dtype | None = None
    force_zeros_uncond: bool = False
    n_time_ids: int = 0
    unet: Any = field(init=False, repr=False)

    def __post_init__(self):
        self.unet = FlowNet(self.transformer, self.kind)

    family = "flow"
    prediction_type = "flow"

    @property
    def guidance_embeds(self) -> bool | None:
        """As `guidance_embedded` reads it from configs: True for FLUX-dev
        (guidance through an embedding), False for a FLUX model without one
        (no guidance at all), None for SD3 (classifier-free guidance)."""
        return self.unet.guidance_embeds if self.kind == FLUX else None

    def _ids(self, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        with self.tokenizer_lock:
            tok = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return tok.input_ids.to(self.device)

    def _sequence(self, encoder, tokenizer, prompts: list[str], width: int) -> torch.Tensor:
        """The T5 part of the token sequence [N, L, width] (zeros without a T5 encoder, as SD3 runs)."""
        if encoder is None:
            return torch.zeros(len(prompts), self.sequence_length, width, device=self.device, dtype=self.dtype)
        return encoder(self._ids(tokenizer, prompts, self.sequence_length))[0].to(self.dtype)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """One row per prompt: tokens [N, L, D] and `pooled_projections` [N, P].

        SD3: both CLIP encoders' penultimate hidden states concatenated, padded
        to the T5 width and followed by the T5 sequence; pooled = both
        projections concatenated (StableDiffusion3Pipeline.encode_prompt).
        FLUX: the T5 sequence; pooled = CLIP's pooled output (FluxPipeline)."""
        prompts = list(prompts)
        if self.kind == SD3:
            states, pooled = [], []
            for enc, tok in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
                out = enc(self._ids(tok, prompts, tok.model_max_length), output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled.append(out[0])
            clip = torch.cat(states, dim=-1).to(self.dtype)
            width = int(self.transformer.config.joint_attention_dim)
            t5 = self._sequence(self.text_encoder_3, self.tokenizer_3, prompts, width)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return Conditioning(torch.cat([clip, t5], dim=-2), {"pooled_projections": torch.cat(pooled, -1).to(self.dtype)})
        pooled = self.text_encoder(self._ids(self.tokenizer, prompts, self.tokenizer.model_max_length),
                                   output_hidden_states=False).pooler_output.to(self.dtype)
        seq = self._sequence(self.text_encoder_2, self.tokenizer_2, prompts, 0)
        return Conditioning(seq, {"pooled_projections": pooled})

    def unconditional(self, empty: Conditioning | None = None) -> Conditioning:
        """The encoding of "" (SD3's default negative prompt; FLUX has no CFG, the row is unused)."""
        return self.encode_text([""]) if empty is None else empty

    def for_images(self, cond: Conditioning, geometry: Sequence, *, unconditional: bool = False) -> Conditioning:
        """Flow models condition on nothing about the image beyond its latent: `cond` as it is."""
        return cond

    def time_ids(self, geometry, *, unconditional: bool = False):
        return None

    def count_tokens(self, prompt: str) -> int:
        """Tokens of the prompt's longest reading: the T5 sequence's (CLIP's part truncates at 77, as diffusers does)."""
        tok = self.tokenizer_3 if self.kind == SD3 else self.tokenizer_2
        tok = tok or self.tokenizer
        with self.tokenizer_lock:
            return len(tok(prompt, truncation=False).input_ids)


def _finish(models: FlowModels) -> FlowModels:
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for m in (models.transformer, models.vae, models.text_encoder, models.text_encoder_2, models.text_encoder_3):
            if m is not None:
                m.eval().requires_grad_(False)
                m.to(device=models.device, dtype=models.vae_dtype if (m is models.vae and models.vae_dtype) else models.dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return models


def build_random(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> FlowModels:
    """A randomly initialised flow pipeline of a RANDOM_MODELS architecture, identical on every machine for a seed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = RANDOM_MODELS[name]
    device = torch.device(device)
    tok = clip_tokenizer()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        if cfg["kind"] == SD3:
            transformer = SD3Transformer2DModel(**cfg["transformer"])
            te1 = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_IDS, **cfg["text"]))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_IDS, **cfg["text_2"]))
        else:
            transformer = FluxTransformer2DModel(**cfg["transformer"])
            te1 = CLIPTextModel(CLIPTextConfig(**_TEXT_IDS, **cfg["text"]))
            te2 = CLIPTextModel(CLIPTextConfig(**_TEXT_IDS, **cfg["text_2"]))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=cfg["latent_channels"],
                            sample_size=cfg["resolution"], use_quant_conv=False, use_post_quant_conv=False,
                            **cfg.get("vae", _TINY_VAE))
    sched = FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER if cfg["kind"] == SD3 else FLUX_SCHEDULER))
    common = dict(transformer=transformer, vae=vae, scheduler=sched, kind=cfg["kind"], device=device, dtype=dtype,
                  model_id=name, random_weights=True, resolution=cfg["resolution"], text_encoder=te1, tokenizer=tok,
                  text_encoder_2=te2, tokenizer_2=tok)
    if cfg["kind"] == SD3:
        return _finish(FlowModels(**common, sequence_length=cfg["t5_length"]))
    return _finish(FlowModels(**common, sequence_length=int(tok.model_max_length)))


@lru_cache(maxsize=4)
def _random_cached(name: str, device: str, dtype: torch.dtype) -> FlowModels:
    # read-only weights, nothing per request on them: one build per process serves every worker and test
    return build_random(name, device, dtype)


TINY = (TINY_SD3, TINY_FLUX)  # cached per process; the real-size random models are built per call


def _kind_of(index: dict) -> str:
    return SD3 if str(index.get("_class_name", "")).startswith("StableDiffusion3") else FLUX


def load(model_id: str, *, device=None, dtype=None, revision: str | None = None) -> FlowModels:
    """A built-in flow model, or an SD3/SD3.5/FLUX.1 diffusers folder or hub id
    (e.g. stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev).
    SD3's T5 encoder is optional (model_index.json's text_encoder_3 null, or
    absent: zeros, as StableDiffusion3Pipeline runs without it)."""
    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype, dev)
    if model_id in TINY:
        return _random_cached(model_id, str(dev), dt)
    if model_id in RANDOM_MODELS:
        return build_random(model_id, dev, dt)
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                           SD3Transformer2DModel)
    from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5EncoderModel)

    kw = {"revision": revision} if revision else {}
    try:
        index = model_index(model_id, revision)
        kind = _kind_of(index)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_id, subfolder="scheduler", **kw)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dt, **kw)
        if kind == SD3:
            transformer = SD3Transformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dt, **kw)
            te1 = CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=dt, **kw)
            te2 = CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder_2", torch_dtype=dt, **kw)
            tok1 = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kw)
            tok2 = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer_2", **kw)
            te3 = tok3 = None
            entry = index.get("text_encoder_3")
            if isinstance(entry, list) and entry and entry[0] is not None:
                te3 = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder_3", torch_dtype=dt, **kw)
                tok3 = AutoTokenizer.from_pretrained(model_id, subfolder="tokenizer_3", **kw)
            models = FlowModels(transformer, vae, scheduler, SD3, dev, dt, model_id, False,
                                int(transformer.config.sample_size) * vae_scale_factor(vae), te1, tok1,
                                text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
                                sequence_length=256)
        else:
            transformer = FluxTransformer2DModel.from_pretrained(model_id, subfolder="transformer", torch_dtype=dt, **kw)
            te1 = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=dt, **kw)
            tok1 = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kw)
            te2 = T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder_2", torch_dtype=dt, **kw)
            tok2 = AutoTokenizer.from_pretrained(model_id, subfolder="tokenizer_2", **kw)
            # FLUX.1 is trained at 1024 px (its transformer config has no sample size)
            models = FlowModels(transformer, vae, scheduler, FLUX, dev, dt, model_id, False, 1024, te1, tok1,
                                text_encoder_2=te2, tokenizer_2=tok2, sequence_length=512)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load flow model {model_id!r}: expected a diffusers-format SD3/SD3.5 or FLUX.1 "
                         f"folder or hub id (transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/): {exc}") from exc
    return _finish(models)


def _limits(kind: str, resolution: int, latent_factor: int, text_context: int) -> ModelLimits:
    return ModelLimits(num_train_timesteps=1000, text_context=text_context, latent_multiple=latent_factor * PATCH,
                       resolution=resolution, family="flow")


def model_limits(model_id: str, revision: str | None = None) -> ModelLimits:
    """A flow model's limits from its configs (no weights). Image sides are
    multiples of 16 (the VAE's 8 x the 2x2 patch); the text context is the
    T5 sequence's (CLIP's part truncates at 77, as diffusers does)."""
    import json

    if model_id in RANDOM_MODELS:
        cfg = RANDOM_MODELS[model_id]
        # no T5 in the built-in models: the context is CLIP's 77 tokens
        vae = cfg.get("vae", _TINY_VAE)
        return _limits(cfg["kind"], cfg["resolution"], 2 ** (len(vae["block_out_channels"]) - 1), 77)
    try:
        kind = _kind_of(model_index(model_id, revision))
        vae = json.loads(config_file(model_id, "vae/config.json", revision))
        transformer = json.loads(config_file(model_id, "transformer/config.json", revision))
    except FileNotFoundError as exc:
        raise ValueError(f"model {model_id!r} has no {exc} (expected a diffusers-format SD3 or FLUX.1 folder)") from None
    factor = 2 ** (len(vae.get("block_out_channels", (128, 256, 512, 512))) - 1)
    resolution = int(transformer.get("sample_size", 128)) * factor if kind == SD3 else 1024
    return _limits(kind, resolution, factor, 256 if kind == SD3 else 512)


def missing_model_weights(model_id: str, revision: str | None = None) -> str | None:
    """Why `load` would not find the weights (no loading); None when at hand."""
    import os

    if model_id in RANDOM_MODELS:
        return None
    parts = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    if os.path.isdir(model_id):
        return folder_weights_missing(model_id, model_id, parts)
    return hub_weights_missing(model_id, parts, revision)


def guidance_embedded(model_id: str, revision: str | None = None) -> bool | None:
    """Whether the model takes guidance through an embedding (FLUX-dev: True;
    FLUX-schnell: False, and then it has no guidance at all); None for SD3
    (classifier-free guidance)."""
    import json

    if model_id in RANDOM_MODELS:
        cfg = RANDOM_MODELS[model_id]
        return bool(cfg["transformer"].get("guidance_embeds")) if cfg["kind"] == FLUX else None
    if _kind_of(model_index(model_id, revision)) == SD3:
        return None
    return bool(json.loads(config_file(model_id, "transformer/config.json", revision)).get("guidance_embeds", False))
