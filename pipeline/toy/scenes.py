"""The toy world: one coloured shape on a plain background, drawn exactly.

Every scene is a `Scene` (shape, colour, background, centre, size) that draws
itself as an RGB image in [-1, 1] and as a boolean mask of the shape, so tests
can check edits against what is really in the picture (an oracle) instead of
trusting a learned scorer. Captions are exactly
``a {color} {shape} on a {background} background``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..models.toy import RESOLUTION  # the toy model's image size

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated colours (8-bit RGB) so a nearest-colour oracle is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 190),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}
# Half-extent of a shape in pixels: large enough to fill several 4x4 latent
# pixels, small enough to move around.
MIN_SIZE, MAX_SIZE = 8, 18
MARGIN = 2


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def to_unit(rgb: tuple[int, int, int]) -> np.ndarray:
    """8-bit RGB -> the model's [-1, 1] range."""
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    cx: float  # centre, pixels
    cy: float
    size: float  # half-extent, pixels
    resolution: int = RESOLUTION

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)

    def with_color(self, color: str) -> Scene:
        return replace(self, color=color)

    def shifted(self, dx: float, dy: float) -> Scene:
        return replace(self, cx=self.cx + dx, cy=self.cy + dy)

    def mask(self) -> np.ndarray:
        """Boolean [R, R] mask of the shape (pixel centres inside the shape)."""
        r = self.resolution
        y, x = np.mgrid[0:r, 0:r].astype(np.float32) + 0.5
        dx, dy, s = x - self.cx, y - self.cy, self.size
        if self.shape == "circle":
            return dx * dx + dy * dy <= s * s
        if self.shape == "square":
            return (np.abs(dx) <= s) & (np.abs(dy) <= s)
        if self.shape == "triangle":
            # apex up, base at cy + s, apex at cy - s, base width 2 s
            inside_y = (dy >= -s) & (dy <= s)
            half_width = (dy + s) / 2.0
            return inside_y & (np.abs(dx) <= half_width)
        raise ValueError(f"unknown shape {self.shape!r}: expected one of {', '.join(SHAPES)}")

    def image(self) -> np.ndarray:
        """Float32 [3, R, R] in [-1, 1]."""
        m = self.mask()
        img = np.empty((3, self.resolution, self.resolution), dtype=np.float32)
        img[:] = to_unit(BACKGROUNDS[self.background])[:, None, None]
        img[:, m] = to_unit(COLORS[self.color])[:, None]
        return img


def random_scene(rng: np.random.Generator, *, shapes=SHAPES, colors=tuple(COLORS), backgrounds=tuple(BACKGROUNDS),
                 resolution: int = RESOLUTION, min_size: float = MIN_SIZE, max_size: float = MAX_SIZE) -> Scene:
    size = float(rng.uniform(min_size, max_size))
    lo, hi = size + MARGIN, resolution - size - MARGIN
    return Scene(
        shape=str(rng.choice(shapes)), color=str(rng.choice(colors)), background=str(rng.choice(backgrounds)),
        cx=float(rng.uniform(lo, hi)), cy=float(rng.uniform(lo, hi)), size=size, resolution=resolution,
    )


def scene_batch(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images [B, 3, R, R] in [-1, 1], masks [B, R, R] (bool) and captions."""
    images = torch.from_numpy(np.stack([s.image() for s in scenes]))
    masks = torch.from_numpy(np.stack([s.mask() for s in scenes]))
    return images, masks, [s.caption for s in scenes]


def random_batch(rng: np.random.Generator, n: int, **kw) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Scene]]:
    scenes = [random_scene(rng, **kw) for _ in range(n)]
    images, masks, captions = scene_batch(scenes)
    return images, masks, captions, scenes
