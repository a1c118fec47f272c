"""PIE-Bench's metrics (Ju et al., "PnP Inversion", ICLR 2024), computed per
edit row as its evaluation code computes them, for samples with an edit mask
(the `edit_mask.png` entry, 1 = the edit region).

Columns (one value per edit row; NaN when the sample has no mask):

``structure_distance``  DINO ViT-B/8 (``vit_base_patch8_224.dino``): the mean
                        squared difference of the cosine self-similarity
                        matrices of the last layer's keys (heads
                        concatenated, CLS token included) of source and edit,
                        each resized so its shorter side is 224 (longer side at
                        most 480) and ImageNet-normalised. Lower is better.
``bg_psnr``, ``bg_mse``, ``bg_ssim``, ``bg_lpips``
                        source and edit as 8-bit images scaled to [0, 1], both
                        multiplied by (1 - mask) (the edit region zeroed), then
                        compared on the FULL frame: MSE is the mean over every
                        pixel and channel, PSNR = 10 log10(1 / MSE) (data range
                        1), SSIM Wang et al.'s with an 11x11 Gaussian window of
                        sigma 1.5, K1 0.01, K2 0.03, averaged over the frame
                        less its 5-pixel border, LPIPS with the SqueezeNet trunk
                        on the masked images mapped to [-1, 1].
``clip_whole``          CLIPScore of the whole edit against the target prompt:
                        100 * max(cos, 0), with the job's CLIP (PIE-Bench uses
                        ViT-L/14 with OpenAI's weights, the job default).
``clip_edited``         the same on the edit times the mask (the edit region,
                        black around it).

Everything is computed at the stored edit's size (the model's geometry: the
mask is cropped and resized with the image, nearest-neighbour), on the edit
and source rounded to 8 bits as they are stored. Published tables report
structure distance x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2
(`pie_eval.PUBLISHED_SCALE`; `imprint eval` prints them so).

Weights: published-comparable numbers need DINO's ViT-B/8 weights (timm's
``vit_base_patch8_224.dino``, from the Hugging Face hub cache), torchvision's
ImageNet SqueezeNet trunk for LPIPS, and OpenAI's ViT-L/14. With
``score.structure_pretrained = false`` the DINO model is randomly initialised
(seeded), with ``score.lpips_pretrained = false`` the SqueezeNet trunk is;
the scorers' description then says so and the numbers mean nothing (tests,
offline runs). ``score.structure_model`` picks another timm ViT (tests use a
tiny one to stay fast).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .tables import PIE_METRICS  # the results columns, defined with the table schemas

HIGHER_IS_BETTER = {"structure_distance": False, "bg_psnr": True, "bg_lpips": False, "bg_mse": False,
                    "bg_ssim": True, "clip_whole": True, "clip_edited": True}
STRUCTURE_MODEL = "vit_base_patch8_224.dino"
PIE_LPIPS_NET = "squeeze"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)


# ----------------------------------------------------------------------------- pure metrics


def to_unit_8bit(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> float32 in [0, 1] on the 8-bit grid, the
    rounding of the stored image (`data.to_pil`)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def background_mse(src: torch.Tensor, edit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean over the full frame of ((src - edit) * (1 - mask))^2; images
    [B, 3, H, W] in [0, 1], mask [B, 1, H, W] (1 = edit region)."""
    keep = 1.0 - mask
    return ((src * keep - edit * keep) ** 2).flatten(1).mean(1)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR at data range 1 (inf for identical backgrounds)."""
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] SSIM (Wang et al. 2004) of [B, C, H, W] images at data range 1:
    Gaussian window 11 / sigma 1.5, K = (0.01, 0.03), population (not sample)
    covariances, the map averaged over channels and the frame less its
    (window - 1) / 2 border (where the window would leave the image)."""
    c = a.shape[1]
    w = _gaussian_window(a.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW).to(a.dtype)
    blur = lambda x: F.conv2d(x, w, groups=c)  # noqa: E731  (valid: only windows inside the frame)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def clip_score(cos: torch.Tensor) -> torch.Tensor:
    """CLIPScore as PIE-Bench reports it (torchmetrics): 100 * max(cos, 0)."""
    return 100.0 * cos.clamp(min=0)


def keys_self_similarity(model: Any, images01: torch.Tensor) -> torch.Tensor:
    """[B, T, T] cosine self-similarity of the last block's attention keys
    (heads concatenated; T tokens, CLS included) of a timm ViT, for images in
    [0, 1] resized as PIE-Bench's DINO extractor does."""
    h, w = images01.shape[-2:]
    scale = 224 / min(h, w)
    if max(h, w) * scale > 480:
        scale = 480 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(images01, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    # DINO's patch embedding (a stride-p convolution) drops the right and bottom remainder; timm asserts instead
    ph, pw = model.patch_embed.patch_size
    x = x[..., : x.shape[-2] // ph * ph, : x.shape[-1] // pw * pw]
    captured = {}
    attn = model.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda mod, inp, out: captured.__setitem__("qkv", out))
    try:
        model.forward_features(x)
    finally:
        hook.remove()
    qkv = captured["qkv"]  # [B, T, 3 * dim]: q, k, v, each heads x head_dim
    b, t, _ = qkv.shape
    keys = qkv.reshape(b, t, 3, attn.num_heads, -1)[:, :, 1].reshape(b, t, -1)
    keys = F.normalize(keys.float(), dim=-1)
    return keys @ keys.transpose(1, 2)


def structure_distance(model: Any, src01: torch.Tensor, edit01: torch.Tensor) -> torch.Tensor:
    """[B] mean squared difference of the keys' self-similarity of source and edit."""
    return ((keys_self_similarity(model, src01) - keys_self_similarity(model, edit01)) ** 2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- models


class PieScorer:
    """The models of the PIE-Bench metrics beside a `Scorers` (whose CLIP it
    uses), loaded on first use: a job without masks loads nothing."""

    def __init__(self, scorers: Any):
        # the Scorers whose CLIP this uses and which load its models (`structure_model`, `lpips_model`):
        # loading weights, and their random fallbacks, stays in scoring.py
        self.scorers = scorers
        self._dino = None
        self._lpips = None

    @property
    def dino(self):
        if self._dino is None:
            self._dino = self.scorers.structure_model()
        return self._dino

    @property
    def lpips(self):
        if self._lpips is None:
            self._lpips = self.scorers.lpips_model(PIE_LPIPS_NET)
        return self._lpips

    @torch.inference_mode()
    def score(self, sources: torch.Tensor, edits: torch.Tensor, edit_source: Sequence[int],
              target_prompts: Sequence[str], masks: Sequence[torch.Tensor | None]) -> dict[str, list[float]]:
        """The PIE_METRICS of M edits: sources [S, 3, H, W] and edits
        [M, 3, H, W] in [-1, 1], edit_source (M) indexes sources, masks (S)
        [H, W] or None (those edits get NaN)."""
        m = edits.shape[0]
        out = {k: [math.nan] * m for k in PIE_METRICS}
        rows = [r for r in range(m) if masks[edit_source[r]] is not None]
        if not rows:
            return out
        dev = self.scorers.device
        bs = self.scorers.cfg.batch_size
        for start in range(0, len(rows), bs):
            chunk = rows[start:start + bs]
            src = to_unit_8bit(sources[[edit_source[r] for r in chunk]].to(dev))
            edit = to_unit_8bit(edits[chunk].to(dev))
            mask = torch.stack([masks[edit_source[r]] for r in chunk]).to(dev)[:, None].float()
            if mask.shape[-2:] != edit.shape[-2:]:  # at the stored edit's size
                mask = F.interpolate(mask, size=edit.shape[-2:], mode="nearest")
            keep = 1.0 - mask
            mse = background_mse(src, edit, mask)
            values = {
                "bg_mse": mse,
                "bg_psnr": psnr_from_mse(mse),
                "bg_ssim": ssim(src * keep, edit * keep),
                "bg_lpips": self.lpips(src * keep * 2 - 1, edit * keep * 2 - 1).flatten(),
                "structure_distance": structure_distance(self.dino, src, edit),
            }
            txt = self.scorers.embed_texts(list(dict.fromkeys(target_prompts[r] for r in chunk)))
            index = {p: i for i, p in enumerate(dict.fromkeys(target_prompts[r] for r in chunk))}
            t = txt[[index[target_prompts[r]] for r in chunk]]
            # the edit region as PIE-Bench cuts it: the 8-bit image times the mask, black elsewhere
            for name, img in (("clip_whole", edit), ("clip_edited", edit * mask)):
                emb = self.scorers.embed_images(img * 2 - 1)
                values[name] = clip_score((emb * t).sum(-1))
            for name, v in values.items():
                for r, x in zip(chunk, v.double().cpu().tolist()):
                    out[name][r] = x
        return out
