"""Input side: shard lists, reading WebDataset tars, decoding and checking
samples, and the geometry rule that maps any image to the model's grid.

A bad sample never raises out of here: it becomes a `Sample` with `error`
set, and the worker writes it as an error row. Only a shard that cannot be
opened at all raises (the driver retries it and, after the last attempt,
marks it failed).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEMO = "demo"
TOY_DEMO = "toy-demo"


@dataclass
class Sample:
    key: str
    shard: str
    source_prompt: str = ""
    target_prompts: list[str] = field(default_factory=list)
    image: torch.Tensor | None = None  # [3, H, W] float32 in [-1, 1], already at model geometry
    orig_size: tuple[int, int] = (0, 0)  # (width, height) as decoded
    error: str = ""
    extras: dict = field(default_factory=dict)  # other entries of the sample (bytes), e.g. masks


# ---------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------


def expand_shards(patterns: list[str], *, allow_pipe: bool = False) -> list[str]:
    """Brace-expand shard patterns, keeping order and dropping duplicates."""
    from braceexpand import braceexpand

    out: list[str] = []
    for pat in patterns:
        if pat == DEMO:
            out.extend(demo_shards())
            continue
        if pat == TOY_DEMO:  # the toy model's scenes (pipeline.toy.demo)
            from .toy.demo import toy_demo_shards

            out.extend(toy_demo_shards())
            continue
        if pat.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"input.shards: {pat!r} is a pipe: command; set input.allow_pipe = true to allow it")
        for s in braceexpand(pat):
            if s not in out:
                out.append(s)
    return out


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def missing_shards(shards: list[str]) -> list[str]:
    """Local shards that do not exist (remote ones are checked when opened)."""
    return [s for s in shards if is_local(s) and not os.path.isfile(local_path(s))]


def shard_name(url: str) -> str:
    """A stable, filesystem-safe name for a shard's output files: its stem
    plus a short hash of the full URL (two shards may share a basename)."""
    import hashlib

    stem = os.path.basename(url.rstrip("/")).split(".tar")[0] or "shard"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def read_raw_samples(url: str) -> Iterator[dict]:
    """Yield raw WebDataset samples (dicts of extension -> bytes, plus
    __key__) from one shard. A tar truncated mid-way yields what came before
    and then one sample dict with `__error__` describing the damage."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = open_shard(url)
    n = 0
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream, handler=_reraise))
        for sample in group_by_keys(files, handler=_reraise):
            n += 1
            yield sample
    except Exception as exc:
        if n == 0:  # not a readable tar at all: the shard fails (and is retried)
            raise OSError(f"cannot read shard {url}: {type(exc).__name__}: {exc}") from exc
        # damaged after some good samples: keep those, report the damage as a row
        yield {"__key__": f"__damaged_after_{n}_samples__", "__error__": f"unreadable tar data: {type(exc).__name__}: {exc}"}
    finally:
        stream.close()


def open_shard(url: str):
    """A binary stream for a shard: object stores through pyarrow's
    filesystems (s3://, gs://, hdfs://), local files, http(s) and (when the
    job allows them) pipe: commands through webdataset's gopen."""
    if url.split("://", 1)[0] in ("s3", "gs", "gcs", "hdfs"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        return fs.open_input_stream(path)
    from webdataset import gopen

    return gopen(local_path(url) if url.startswith("file://") else url, "rb")


def _reraise(exc: Exception) -> bool:
    raise exc


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def decode_sample(raw: dict, shard: str, spec_input, spec_image, resolution: int, count_tokens=None) -> Sample:
    """Turn a raw WebDataset sample into a checked `Sample` (never raises)."""
    key = str(raw.get("__key__", ""))
    sample = Sample(key=key, shard=shard)
    try:
        if "__error__" in raw:
            raise SampleError(raw["__error__"])
        if not key:
            raise SampleError("sample has no __key__")
        sample.source_prompt, sample.target_prompts = _prompts(raw, spec_input, count_tokens)
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is None:
            raise SampleError(f"no image entry (expected one of {', '.join(IMAGE_EXTS)}; found {', '.join(_exts(raw)) or 'none'})")
        pil = load_image(raw[img_ext], spec_image)
        sample.orig_size = pil.size
        sample.image = to_model_tensor(pil, spec_image, resolution)
        sample.extras = {k: v for k, v in raw.items() if not k.startswith("__") and k not in (img_ext, "json", "txt")}
    except SampleError as exc:
        sample.error = str(exc)
    except Exception as exc:  # anything else the decoders throw is still the sample's fault
        sample.error = f"{type(exc).__name__}: {exc}"
    return sample


class SampleError(ValueError):
    pass


def _exts(raw: dict) -> list[str]:
    return [k for k in raw if not k.startswith("__")]


def _prompts(raw: dict, spec_input, count_tokens) -> tuple[str, list[str]]:
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8") if isinstance(raw["json"], bytes) else raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError(f"unreadable json: {exc}") from None
        if not isinstance(meta, dict):
            raise SampleError("json must be an object with source_prompt and optional target_prompts")
    source = meta.get("source_prompt")
    if source is None and "txt" in raw:
        try:
            source = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleError(f"txt caption is not UTF-8: {exc}") from None
    if not isinstance(source, str) or not source.strip():
        raise SampleError("missing or empty source prompt (json source_prompt or txt caption)")
    source = source.strip()
    targets = meta.get("target_prompts", [])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise SampleError("target_prompts must be a list of strings")
    targets = [t.strip() for t in targets]
    if any(not t for t in targets):
        raise SampleError("empty target prompt in target_prompts")
    targets += [t.format(source=source) for t in spec_input.templates]
    targets = list(dict.fromkeys(targets))  # same target twice would only duplicate work
    if not targets:
        raise SampleError("no target prompts (none in the sample and no input.templates in the job)")
    if count_tokens is not None:
        for p in [source, *targets]:
            n = count_tokens(p)
            if n > spec_input.max_prompt_tokens:
                raise SampleError(
                    f"prompt too long: {n} tokens > {spec_input.max_prompt_tokens} (input.max_prompt_tokens): {p[:60]!r}..."
                )
    return source, targets


def load_image(data: bytes, spec_image) -> Image.Image:
    """Decode image bytes to RGB, refusing bombs and degenerate sizes.
    Handles L, LA, P, RGBA (composited on white), CMYK, I;16 and I modes and
    the EXIF orientation."""
    if not data:
        raise SampleError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = spec_image.max_pixels
            try:
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > spec_image.max_pixels:
                    raise SampleError(f"image too large: {w}x{h} = {w * h} pixels > image.max_pixels ({spec_image.max_pixels})")
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:
        raise SampleError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if min(w, h) < spec_image.min_side:
        raise SampleError(f"image too small: {w}x{h} (image.min_side = {spec_image.min_side})")
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def target_size(w: int, h: int, spec_image, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The geometry rule. Returns ((resize_w, resize_h), (crop_w, crop_h)).

    "shorter" (default): scale so the shorter side is `resolution`, then
    center-crop the longer side down to a multiple of `multiple` (and to at
    most max_aspect * resolution). Non-square outputs are kept.
    "square": center-crop the largest square, resize to resolution^2."""
    m = spec_image.multiple
    if spec_image.resize == "square":
        return (resolution, resolution), (resolution, resolution)
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    cap = int(spec_image.max_aspect * resolution)
    cw, ch = min(rw, cap) // m * m, min(rh, cap) // m * m
    return (rw, rh), (cw, ch)


def to_model_tensor(img: Image.Image, spec_image, resolution: int) -> torch.Tensor:
    w, h = img.size
    if spec_image.resize == "square":
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        w, h = s, s
    (rw, rh), (cw, ch) = target_size(w, h, spec_image, resolution)
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB (round to nearest)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def encode_image(image: torch.Tensor, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil = to_pil(image)
    if fmt == "png":
        pil.save(buf, format="PNG")
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# The built-in demo sample
# ---------------------------------------------------------------------------


def demo_dir() -> Path:
    root = os.environ.get("IMPRINT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imprint")
    return Path(root) / "demo-shards-v1"


def demo_shards() -> list[str]:
    """Two small shards built on first use from images that ship with
    matplotlib and procedurally drawn scenes; nothing is downloaded."""
    d = demo_dir()
    names = [str(d / f"demo-{i:06d}.tar") for i in range(2)]
    if not all(os.path.isfile(n) for n in names):
        d.mkdir(parents=True, exist_ok=True)
        samples = _demo_samples()
        write_shards(samples[:3], names[0])
        write_shards(samples[3:], names[1])
    return names


def _demo_samples() -> list[dict]:
    from PIL import ImageDraw

    samples = []
    mpl_sample = None
    try:
        import matplotlib

        mpl_sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    except ImportError:
        pass
    if mpl_sample is not None and mpl_sample.is_file():
        samples.append({"__key__": "grace_hopper", "jpg": mpl_sample.read_bytes(),
                        "json": {"source_prompt": "a portrait of a woman in uniform",
                                 "target_prompts": ["a portrait of a woman in uniform, smiling"]}})
    scenes = [
        ("red_circle", (30, 60, 160), (220, 40, 40), "ellipse", "a red ball on a blue floor", "a green ball on a blue floor"),
        ("yellow_square", (40, 120, 40), (240, 220, 30), "rectangle", "a yellow box on the grass", "a wooden box on the grass"),
        ("white_house", (130, 180, 230), (245, 245, 245), "house", "a white house under a blue sky", "a red house under a blue sky"),
        ("dark_tree", (230, 200, 150), (40, 90, 30), "tree", "a tree in the desert", "a tree in the snow"),
    ]
    for key, bg, fg, shape, src, tgt in scenes:
        w, h = (192, 128) if key in ("white_house", "dark_tree") else (160, 160)
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        for y in range(h // 2, h):  # a ground gradient so the images are not flat
            shade = tuple(max(0, c - (y - h // 2)) for c in bg)
            draw.line([(0, y), (w, y)], fill=shade)
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        if shape == "ellipse":
            draw.ellipse(box, fill=fg)
        elif shape == "rectangle":
            draw.rectangle(box, fill=fg)
        elif shape == "house":
            draw.rectangle((w // 3, h // 2, 2 * w // 3, 7 * h // 8), fill=fg)
            draw.polygon([(w // 3 - 10, h // 2), (w // 2, h // 4), (2 * w // 3 + 10, h // 2)], fill=(120, 60, 40))
        else:
            draw.rectangle((w // 2 - 6, h // 2, w // 2 + 6, 7 * h // 8), fill=(90, 60, 30))
            draw.ellipse((w // 3, h // 6, 2 * w // 3, 9 * h // 16), fill=fg)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append({"__key__": key, "png": buf.getvalue(), "json": {"source_prompt": src, "target_prompts": [tgt]}})
    return samples


def write_shards(samples: list[dict], path: str) -> str:
    """Write samples (extension -> bytes/str/dict) as one WebDataset tar."""
    import tarfile

    tmp = f"{path}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w") as tar:
        for s in samples:
            key = s["__key__"]
            for ext, value in s.items():
                if ext.startswith("__"):
                    continue
                if isinstance(value, (dict, list)):
                    value = json.dumps(value).encode()
                elif isinstance(value, str):
                    value = value.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(value)
                info.mtime = 0  # reproducible archives
                tar.addfile(info, io.BytesIO(value))
    os.replace(tmp, path)
    return path
