"""The toy model's architecture and its stand-in for the VAE.

The "latent" of a 64x64 RGB image is its 4x4 pixel unshuffle, 48x16x16,
times a fixed scaling factor: an exact, invertible image<->latent map with
the interface of diffusers' AutoencoderKL that `Models` uses
(`encode(x).latent_dist.mean`, `decode(z).sample`, `config.scaling_factor`),
so nothing has to be trained for it and reconstruction error is only the
inversion's own. The UNet, text encoder, tokenizer and scheduler are SD's
classes and configuration at a small size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .scenes import RESOLUTION

FACTOR = 4  # pixel-unshuffle factor: 64x64x3 images <-> 48x16x16 latents
LATENT_CHANNELS = 3 * FACTOR * FACTOR
# Why latents are scaled down: a toy scene states its shape's colour in every
# one of a few hundred pixels, so at scale 1 the colour can still be read off
# x_t at t ~ 990 (discriminability d' ~ 1.5-3.4 between two palette colours)
# and a prompt has nothing left to decide by the paper's edit start (t ~ 630
# for 100 steps, skip 36: d' ~ 8-19). A denoiser then predicts the source
# colour whatever the prompt, and no guidance scale changes that (the first
# shipped weights, trained at scale 1, edited 0 of 24 colours). Scaling by
# 0.18 lowers the SNR at every t 31-fold (log-SNR shifted by -3.4, the
# resolution shift of "simple diffusion"), so the colour is still open at
# t ~ 630 (d' ~ 1.5-3.3) while the shape's place is carried by the noise maps.
SCALING_FACTOR = 0.18
# At that low SNR an epsilon-prediction model's x0 = (x_t - sqrt(1-ab) eps) /
# sqrt(ab) amplifies its errors by sqrt((1-ab)/ab) / scale (a 1,000-step
# epsilon model at scale 0.125 had x0 errors larger than the data at t = 300,
# and its samples kept per-pixel noise); v-prediction bounds them at every t.
# (x0-prediction, `train --prediction-type sample`, was also run to 3,000 steps:
# cleaner samples, 12/12 colours from text vs 10/12, but colour edits at the
# paper's setting reached the target in 9/16 vs 12/16, mask IoU 0.41 vs 0.34.)
PREDICTION_TYPE = "v_prediction"
TOY = "toy"
TOY_CLIP = "toy-clip"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOY_DIR = WEIGHTS_DIR / TOY
TOY_CLIP_DIR = WEIGHTS_DIR / TOY_CLIP
AUTOENCODER_CLASS = "PixelUnshuffleAutoencoder"
# What outputs and reports say about runs on this model (instead of the random-weights warning).
TOY_NOTE = "toy model trained on synthetic shapes"

UNET_CONFIG = dict(
    sample_size=RESOLUTION // FACTOR,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    # the first level is wider than the 48-channel latent: at 32 channels the
    # network could not pass the noise of low-t latents through (loss floor ~0.4)
    block_out_channels=(64, 64, 128),
    layers_per_block=1,
    # attention at 8x8 and 4x4: what the shape, colour and background words
    # need, at a cost a 2-core CPU can train in under an hour
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=16,
    norm_num_groups=16,
)
# CLIP's token ids (the tokenizer is CLIP's BPE); a narrow encoder keeps the
# 49408-row embedding table (most of its weights) small.
TEXT_CONFIG = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
)


@dataclass
class _Posterior:
    """A point mass: the map is deterministic, so mean = mode = sample."""

    mean: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean


class PixelUnshuffleAutoencoder(torch.nn.Module):
    """Image [B, 3, H, W] in [-1, 1] <-> latent [B, 3 f^2, H/f, W/f] by pixel
    (un)shuffle, exact in both directions. `config` mirrors the AutoencoderKL
    fields callers read; `block_out_channels` has log2(f) + 1 entries so the
    usual `2 ** (len(block_out_channels) - 1)` gives the downsampling factor."""

    def __init__(self, factor: int = FACTOR, scaling_factor: float = SCALING_FACTOR):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two, got {factor}")
        levels = factor.bit_length()  # log2(factor) + 1
        self.config = SimpleNamespace(
            _class_name=AUTOENCODER_CLASS, factor=factor, scaling_factor=float(scaling_factor),
            in_channels=3, latent_channels=3 * factor * factor, block_out_channels=[3 * factor * factor] * levels,
        )

    @property
    def factor(self) -> int:
        return int(self.config.factor)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the latent factor {self.factor}")
        out = SimpleNamespace(latent_dist=_Posterior(F.pixel_unshuffle(x, self.factor)))
        return out if return_dict else (out.latent_dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        out = SimpleNamespace(sample=F.pixel_shuffle(z, self.factor))
        return out if return_dict else (out.sample,)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        cfg = {"_class_name": AUTOENCODER_CLASS, "factor": self.factor, "scaling_factor": self.config.scaling_factor}
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump(cfg, fh, indent=2)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> PixelUnshuffleAutoencoder:
        with open(os.path.join(folder, "config.json")) as fh:
            cfg = json.load(fh)
        return cls(int(cfg["factor"]), float(cfg["scaling_factor"]))


def is_pixel_autoencoder(folder: str | os.PathLike) -> bool:
    """Whether a pipeline folder's vae/ is this stand-in (not an AutoencoderKL)."""
    path = Path(folder) / "vae" / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("_class_name") == AUTOENCODER_CLASS
    except (OSError, ValueError):
        return False


def build_untrained(seed: int = 0):
    """UNet and text encoder at their initialisation for `seed`."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return unet, text_encoder


def save_pipeline(folder: str | os.PathLike, unet, text_encoder, scheduler_config: dict,
                  dtype: torch.dtype = torch.float16) -> None:
    """Write a diffusers-format folder (unet/, text_encoder/, vae/, scheduler/;
    no tokenizer/: the CLIP BPE tokenizer is built from open_clip's vocabulary).
    Weights are stored in `dtype` (fp16 keeps the package small) as safetensors.
    `scheduler_config`: a DDIMScheduler's (the caller's; `models` imports this
    module, so it does not import `models`)."""
    import copy

    from diffusers import DDIMScheduler

    folder = Path(folder)
    copy.deepcopy(unet).to(dtype).save_pretrained(folder / "unet", safe_serialization=True)
    copy.deepcopy(text_encoder).to(dtype).save_pretrained(folder / "text_encoder", safe_serialization=True)
    PixelUnshuffleAutoencoder().save_pretrained(folder / "vae")
    DDIMScheduler(**scheduler_config).save_pretrained(folder / "scheduler")
