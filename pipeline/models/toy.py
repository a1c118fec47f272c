"""The toy model's architecture: Stable Diffusion's classes and layout at a
small size. A 64x64 scene is encoded by a small AutoencoderKL (trained on the
toy scenes) into a 4x16x16 latent scaled to unit variance; a
UNet2DConditionModel denoises it under a CLIP text encoder's embeddings of the
scene's caption (CLIP's BPE tokenizer), on SD's noise schedule with
v-prediction. `load_models("toy")` reads it as any diffusers folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


RESOLUTION = 64  # pixels; 4x16x16 latents after the toy autoencoder (the toy scenes' size)
FACTOR = 4  # autoencoder downsampling: 64x64x3 images <-> 4x16x16 latents, as SD's VAE is 8x at 512
LATENT_CHANNELS = 4
# The "VAE" is a small AutoencoderKL trained on the toy scenes (`train --only
# ae`). The first shipped toy model used an exact pixel unshuffle instead
# (48x16x16 latents): whatever noise the diffusion model left in a latent then
# landed in pixels as 4x4 blocks of coloured static, and its latents had to be
# scaled down to 0.18 so colour stayed open at the edit's start, which left
# the model unable to see where the shape was (edits swelled into halos). A
# learned decoder maps near-manifold latents onto clean scenes, as SD's does
# onto natural images, and its latents are scaled to unit variance (the
# scaling factor is measured on training scenes, as SD's 0.18215 was).
AE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=RESOLUTION,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    mid_block_add_attention=False,  # flat shapes need no attention; it would cost more than the rest at 16x16
)
PREDICTION_TYPE = "v_prediction"
TOY = "toy"
TOY_CLIP = "toy-clip"
# the weights ship with the toy world in pipeline/toy/weights (package data)
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "toy" / "weights"
TOY_DIR = WEIGHTS_DIR / TOY
TOY_CLIP_DIR = WEIGHTS_DIR / TOY_CLIP
# What outputs and reports say about runs on this model (instead of the random-weights warning).
TOY_NOTE = "toy model trained on synthetic shapes"
TOY_DOMAIN = "toy scene"  # the `domain` field of toy-scene samples (toy.demo); reports put other inputs last

UNET_CONFIG = dict(
    sample_size=RESOLUTION // FACTOR,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
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


def build_autoencoder(seed: int = 0, scaling_factor: float = 1.0):
    """The toy AutoencoderKL at its initialisation for `seed`."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(**AE_CONFIG, scaling_factor=scaling_factor)


def build_untrained(seed: int = 0):
    """UNet and text encoder at their initialisation for `seed`."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return unet, text_encoder


def save_pipeline(folder: str | os.PathLike, unet, text_encoder, vae, scheduler_config: dict,
                  dtype: torch.dtype = torch.float16) -> None:
    """Write a diffusers-format folder (unet/, text_encoder/, vae/, scheduler/;
    no tokenizer/: the CLIP BPE tokenizer is built from open_clip's vocabulary).
    UNet and text encoder weights are stored in `dtype` (fp16 keeps the
    package small), the autoencoder in fp32 (its decoder is what a person
    sees), all as safetensors. `scheduler_config`: a DDIMScheduler's (the
    caller's; `models` imports this module, so it does not import `models`)."""
    import copy

    from diffusers import DDIMScheduler

    folder = Path(folder)
    copy.deepcopy(unet).to(dtype).save_pretrained(folder / "unet", safe_serialization=True)
    copy.deepcopy(text_encoder).to(dtype).save_pretrained(folder / "text_encoder", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler(**scheduler_config).save_pretrained(folder / "scheduler")
