"""The toy scenes of `make demo`: a shard of drawn shape scenes (keys
`toy_*`), each with its caption as source prompt and two target prompts that
change its colour. Built on first use from a fixed seed under the imprint
cache, like the built-in photo sample ("demo" shards)."""

from __future__ import annotations

import io
import os

import numpy as np

from .scenes import COLORS, random_scene

TOY_DEMO = "toy-demo"
TOY_DEMO_SCENES = 8
TOY_DEMO_SEED = 2024


def toy_demo_dir():
    from ..data import demo_dir

    return demo_dir().parent / "toy-demo-shards-v1"


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
                        "json": {"source_prompt": s.caption, "target_prompts": targets, "domain": "toy scene"}})
    return samples


def toy_demo_shards() -> list[str]:
    """One shard of toy scenes (written once, then reused)."""
    from ..data import write_shards

    d = toy_demo_dir()
    name = str(d / "toy-demo-000000.tar")
    if not os.path.isfile(name):
        d.mkdir(parents=True, exist_ok=True)
        write_shards(toy_demo_samples(), name)
    return [name]
