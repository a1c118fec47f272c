"""Building small WebDataset shards for tests: good samples in every image
mode the input contract names, and the bad samples it lists."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.data import write_shards


def image_bytes(mode: str = "RGB", size=(96, 80), fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        arr = (rng.random((h, w)) * 65535).astype(np.uint16)
        img = Image.fromarray(arr)  # uint16 -> mode I;16
    else:
        base = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(base, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming the given size whose pixel data is tiny (a bomb or a zero-size image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def good_samples(prefix: str = "g", n: int = 3) -> list[dict]:
    modes = [("RGB", "JPEG", "jpg"), ("L", "PNG", "png"), ("RGBA", "PNG", "png"), ("CMYK", "JPEG", "jpg"),
             ("I;16", "PNG", "png"), ("RGB", "WEBP", "webp")]
    out = []
    for i in range(n):
        mode, fmt, ext = modes[i % len(modes)]
        size = (96 + 16 * (i % 3), 80)
        s = {"__key__": f"{prefix}{i:03d}", ext: image_bytes(mode, size, fmt, seed=i)}
        if i % 2 == 0:
            s["json"] = {"source_prompt": f"a photo number {i}", "target_prompts": [f"a painting number {i}"]}
        else:
            s["txt"] = f"a caption number {i}"
        out.append(s)
    return out


def bad_samples() -> dict[str, dict]:
    """key -> sample, one for each failure the contract lists."""
    good_jpg = image_bytes("RGB", (96, 80), "JPEG")
    prompt = {"source_prompt": "a cat"}
    return {
        "truncated": {"__key__": "truncated", "jpg": good_jpg[: len(good_jpg) // 3], "json": prompt},
        "not_image": {"__key__": "not_image", "png": b"this is not an image at all", "json": prompt},
        "no_prompt": {"__key__": "no_prompt", "png": image_bytes(), "json": {"target_prompts": ["x"]}},
        "empty_prompt": {"__key__": "empty_prompt", "png": image_bytes(), "txt": "   "},
        "zero_size": {"__key__": "zero_size", "png": png_header_only(0, 0), "json": prompt},
        "tiny_image": {"__key__": "tiny_image", "png": image_bytes("RGB", (4, 4)), "json": prompt},
        "bomb": {"__key__": "bomb", "png": png_header_only(100_000, 100_000), "json": prompt},
        "bad_json": {"__key__": "bad_json", "png": image_bytes(), "json": b"{not json"},
        "long_prompt": {"__key__": "long_prompt", "png": image_bytes(), "json": {"source_prompt": "word " * 100}},
        "no_image": {"__key__": "no_image", "json": prompt},
    }


def write(path, samples) -> str:
    return write_shards(samples, str(path))


def tiny_job(tmp_path, shard: str, **sections) -> dict:
    """A raw job spec: the tiny model, 4 steps, no scoring, inline, on one
    shard, output under tmp_path/out; `sections` update its tables."""
    raw = {
        "input": {"shards": [shard], "templates": ["{source}, sketch"]},
        "model": {"id": "tiny"},
        "inversion": {"steps": 4, "skip": 1},
        "output": {"path": str(tmp_path / "out")},
        "score": {"enabled": False},
        "run": {"executor": "inline"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw
