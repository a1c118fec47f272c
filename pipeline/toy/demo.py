"""The toy scenes of `make demo`: drawn shape scenes (keys `toy_*`), each
with its caption as source prompt and two target prompts that change its
colour, from a fixed seed. `input.shards = ["toy-demo"]` names them; the
shard is written on first use under the imprint cache (`data.builtin_shards`),
like the built-in photo sample ("demo")."""

from __future__ import annotations

import io

import numpy as np

from ..models.toy import TOY_DOMAIN
from .scenes import COLORS, random_scene

TOY_DEMO_SCENES = 8
TOY_DEMO_SEED = 2024


def toy_demo_samples(n: int = TOY_DEMO_SCENES, seed: int = TOY_DEMO_SEED) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLORS)
    samples = []
    for k in range(n):
        s = random_scene(rng)
        others = [c for c in names if c != s.color]
        targets = [s.with_color(others[(2 * k) % len(others)]).caption,
                   s.with_color(others[(2 * k + 3) % len(others)]).caption]
        pixels = np.round((s.image().transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        samples.append({"__key__": f"toy_{k:03d}", "png": buf.getvalue(),
                        "json": {"source_prompt": s.caption, "target_prompts": targets, "domain": TOY_DOMAIN}})
    return samples
