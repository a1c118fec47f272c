"""Built-in toy inputs, drawn from a fixed seed and written on first use
under the imprint cache (`data.builtin_shards`), like the built-in photo
sample ("demo"):

- `toy-demo` (`make demo`): shape scenes (keys `toy_*`), each with its
  caption as source prompt and two target prompts that change its colour.
- `toy-pie`: PIE-Bench's protocol on toy scenes (keys `pie_*`), so
  `imprint eval` runs offline: each scene with one target prompt that changes
  its colour (`editing_type` "change_color") or its shape ("change_object"),
  and its exact edit region as `edit_mask.png`: the shape for a colour edit,
  the old shape and the new one together for a shape edit (the pixels the
  edit should change; PIE-Bench's mask is the edited object's region).
  `edited_words` / `source_words` as in `imprint shards --format pie-bench`."""

from __future__ import annotations

import io

import numpy as np

from ..models.toy import TOY_DOMAIN
from .scenes import COLORS, SHAPES, random_scene

TOY_DEMO_SCENES = 8
TOY_DEMO_SEED = 2024
TOY_PIE_SCENES = 8  # half colour edits, half shape edits (jobs/toy-pie.toml runs them all in about 20 minutes on 2 CPU cores)
TOY_PIE_SEED = 2032


def toy_demo_samples(n: int = TOY_DEMO_SCENES, seed: int = TOY_DEMO_SEED) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    samples = []
    for k in range(n):
        s = random_scene(rng)
        others = [c for c in names if c != s.color]
        targets = [s.with_color(others[(2 * k) % len(others)]).caption,
                   s.with_color(others[(2 * k + 3) % len(others)]).caption]
        samples.append({"__key__": f"toy_{k:03d}", "png": _png(s.image()),
                        "json": {"source_prompt": s.caption, "target_prompts": targets, "domain": TOY_DOMAIN}})
    return samples


def toy_pie_samples(n: int = TOY_PIE_SCENES, seed: int = TOY_PIE_SEED) -> list[dict]:
    """Scene k gets a colour edit when k is even, a shape edit when odd; the
    new colour or shape cycles over the others, so every one is a target."""
    from dataclasses import replace

    from ..tables import EDIT_MASK_KEY

    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n):
        s = random_scene(rng)
        if k % 2 == 0:
            others = [c for c in COLORS if c != s.color]
            target = s.with_color(others[(k // 2) % len(others)])
            kind, old, new, region = "change_color", s.color, target.color, s.mask()
        else:
            others = [sh for sh in SHAPES if sh != s.shape]
            target = replace(s, shape=others[(k // 2) % len(others)])
            kind, old, new, region = "change_object", s.shape, target.shape, s.mask() | target.mask()
        samples.append({"__key__": f"pie_{k:03d}", "png": _png(s.image()),
                        EDIT_MASK_KEY: _mask_png(region),
                        "json": {"source_prompt": s.caption, "target_prompts": [target.caption],
                                 "editing_type": kind, "source_words": [old], "edited_words": [new],
                                 "domain": TOY_DOMAIN}})
    return samples


def _png(image: np.ndarray) -> bytes:
    """[3, H, W] in [-1, 1] -> 8-bit RGB PNG bytes."""
    return _encode(np.round((image.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8), "RGB")


def _mask_png(region: np.ndarray) -> bytes:
    """Boolean [H, W] -> grey PNG, white = the edit region (the input contract's edit_mask.png)."""
    return _encode(region.astype(np.uint8) * 255, "L")


def _encode(pixels: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()
