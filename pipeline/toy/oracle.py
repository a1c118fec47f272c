"""What a toy scene's pixels say, measured directly (no learned scorer).

- `region_color`: the palette colour nearest to the median colour of a
  region (the interior of the source shape's mask, eroded so anti-aliased or
  slightly moved edges do not vote).
- `segment`: the pixels that differ from the known background colour, i.e.
  where the edited image has a shape.
- `iou`: intersection over union of two masks.
- `background_change`: how much an edit changed the background away from
  the source shape.
All functions take images [B, 3, H, W] in [-1, 1] and masks [B, H, W] (bool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scenes import BACKGROUNDS, COLORS, to_unit

# A pixel belongs to the shape when its RGB distance from the background
# colour exceeds this (in [-1, 1] units; the closest palette pair, yellow on
# white, is ~1.8 apart in blue).
SEGMENT_THRESHOLD = 0.5


def _palette(names) -> torch.Tensor:
    return torch.stack([torch.from_numpy(to_unit(COLORS[n])) for n in names])


def erode(masks: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """Shrink bool masks [B, H, W] by `pixels` (a 3x3 min filter per pixel)."""
    m = masks.float()[:, None]
    for _ in range(pixels):
        m = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return m[:, 0] > 0.5


def region_rgb(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image median RGB [B, 3] of the pixels inside each mask (NaN for an empty mask)."""
    out = torch.full((images.shape[0], 3), float("nan"))
    for k in range(images.shape[0]):
        px = images[k].float().cpu()[:, masks[k].cpu()]
        if px.shape[1]:
            out[k] = px.median(dim=1).values
    return out


def region_color(images: torch.Tensor, masks: torch.Tensor, *, erode_px: int = 2,
                 palette: tuple[str, ...] = tuple(COLORS)) -> list[str]:
    """Name of the palette colour nearest to each region's median colour."""
    inner = erode(masks, erode_px)
    inner = torch.where(inner.flatten(1).any(1)[:, None, None], inner, masks)  # tiny shapes: the whole mask
    rgb = region_rgb(images, inner)
    pal = _palette(palette)
    idx = torch.cdist(rgb, pal).argmin(1)
    return [palette[int(i)] for i in idx]


def segment(images: torch.Tensor, backgrounds: list[str], threshold: float = SEGMENT_THRESHOLD) -> torch.Tensor:
    """Bool masks [B, H, W]: pixels farther than `threshold` from their image's background colour."""
    bg = torch.stack([torch.from_numpy(to_unit(BACKGROUNDS[b])) for b in backgrounds])[:, :, None, None]
    return (images.float().cpu() - bg).norm(dim=1) > threshold


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU [B] of bool masks [B, H, W] (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# Pixels this far from the source shape count as background for
# `background_change`: an edit may legitimately move the outline by a pixel
# or two, and the autoencoder blurs edges by about as much.
BACKGROUND_MARGIN = 4


def dilate(masks: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """Grow bool masks [B, H, W] by `pixels` (a 3x3 max filter per pixel)."""
    m = masks.float()[:, None]
    for _ in range(pixels):
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    return m[:, 0] > 0.5


def background_change(sources: torch.Tensor, edits: torch.Tensor, masks: torch.Tensor,
                      margin: int = BACKGROUND_MARGIN) -> torch.Tensor:
    """Per-image mean absolute change [B] of the pixels farther than `margin`
    from the source shape's mask, in 8-bit units (0..255), over RGB."""
    away = ~dilate(masks, margin)
    diff = (edits.float().cpu() - sources.float().cpu()).abs().mean(1) * 127.5
    return (diff * away).flatten(1).sum(1) / away.flatten(1).sum(1).clamp(min=1)


def centroid(masks: torch.Tensor) -> torch.Tensor:
    """Per-mask centre of mass [B, 2] as (x, y) in pixels (NaN for an empty mask)."""
    b, h, w = masks.shape
    ys = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
    m = masks.float().cpu()
    n = m.flatten(1).sum(1)
    cx = (m * xs).flatten(1).sum(1) / n
    cy = (m * ys).flatten(1).sum(1) / n
    return torch.stack([cx, cy], 1)
