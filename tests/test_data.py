import io
import json
import os

import numpy as np

import pytest
import torch
from PIL import Image

from helpers_data import bad_samples, good_samples, image_bytes, write
from pipeline.data import (
    decode_sample,
    encode_image,
    expand_shards,
    load_image,
    read_raw_samples,
    shard_name,
    target_size,
)
from pipeline.spec import ImageSpec, InputSpec


def test_brace_expansion_and_pipe_policy():
    assert expand_shards(["d/p-{000..002}.tar"]) == ["d/p-000.tar", "d/p-001.tar", "d/p-002.tar"]
    assert expand_shards(["a.tar", "a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_shards(["pipe:curl -s http://x/a.tar"])
    assert expand_shards(["pipe:cat a.tar"], allow_pipe=True) == ["pipe:cat a.tar"]


def test_shard_names_are_stable_and_distinct():
    a, b = shard_name("/x/part-000.tar"), shard_name("/y/part-000.tar")
    assert a != b and a.startswith("part-000-") and a == shard_name("/x/part-000.tar")


@pytest.mark.parametrize(
    "w,h,rule,expect",
    [
        (512, 512, "shorter", (512, 512)),
        (1024, 768, "shorter", (640, 512)),  # 683 -> cropped to a multiple of 64
        (600, 2000, "shorter", (512, 1024)),  # capped at max_aspect * 512
        (1024, 768, "square", (512, 512)),
        (100, 80, "shorter", (640, 512)),  # upscaled
    ],
)
def test_geometry_rule(w, h, rule, expect):
    spec = ImageSpec(resize=rule)
    img = Image.new("RGB", (w, h))
    from pipeline.data import to_model_tensor

    t = to_model_tensor(img, spec, 512)
    assert (t.shape[2], t.shape[1]) == expect
    assert t.min() >= -1 and t.max() <= 1


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP"), ("P", "PNG")])
def test_every_image_mode_decodes_to_rgb(mode, fmt):
    img = load_image(image_bytes(mode, (40, 30), fmt), ImageSpec())
    assert img.mode == "RGB" and img.size == (40, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = (torch.linspace(0, 65535, 64).to(torch.int32).numpy().astype("uint16")).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = load_image(buf.getvalue(), ImageSpec(min_side=1))
    vals = torch.from_numpy(np.array(img.convert("L"))).flatten()
    assert vals.min() == 0 and vals.max() == 255 and len(vals.unique()) > 32


def test_bad_samples_become_errors_with_clear_messages(tmp_path):
    expected = {
        "truncated": "cannot decode image",
        "not_image": "cannot decode image",
        "no_prompt": "missing or empty source prompt",
        "empty_prompt": "missing or empty source prompt",
        "zero_size": "cannot decode image",
        "tiny_image": "too small",
        "bomb": "decompression bomb",
        "bad_json": "unreadable json",
        "long_prompt": "prompt too long",
        "no_image": "no image entry",
    }
    inp = InputSpec(templates=["{source}, sketch"], truncate_prompts=False)  # long_prompt: an error only then
    for key, raw in bad_samples().items():
        raw = {k: v if k.startswith("__") else to_bytes(v) for k, v in raw.items()}
        s = decode_sample(raw, "shard", inp, ImageSpec(), 128, count_tokens=lambda p: len(p.split()) + 2)
        assert expected[key] in s.error, (key, s.error)
        assert s.image is None


def to_bytes(v):
    if isinstance(v, dict):
        return json.dumps(v).encode()
    return v.encode() if isinstance(v, str) else v


def test_good_samples_and_templates(tmp_path):
    path = write(tmp_path / "s.tar", good_samples(n=6))
    raws = list(read_raw_samples(path))
    assert [r["__key__"] for r in raws] == [f"g{i:03d}" for i in range(6)]
    inp = InputSpec(templates=["{source}, oil painting", "a photo of a dog"])
    for raw in raws:
        s = decode_sample(raw, path, inp, ImageSpec(), 128)
        assert not s.error, s.error
        assert s.image.shape[1] == 128 and s.image.shape[2] % 64 == 0
        assert s.target_prompts[-2:] == [f"{s.source_prompt}, oil painting", "a photo of a dog"]


def test_truncated_tar_keeps_earlier_samples_and_reports_damage(tmp_path):
    path = write(tmp_path / "s.tar", good_samples(n=4))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    raws = list(read_raw_samples(str(cut)))
    assert len(raws) >= 2
    assert "__error__" in raws[-1] or len(raws) == 4


def test_unreadable_shard_raises(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(os.urandom(3000))
    with pytest.raises(OSError, match="cannot read shard"):
        list(read_raw_samples(str(p)))


def test_encode_image_formats():
    img = torch.rand(3, 16, 24) * 2 - 1
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        data = encode_image(img, fmt, 90)
        assert data.startswith(magic)
        assert Image.open(io.BytesIO(data)).size == (24, 16)
    png = Image.open(io.BytesIO(encode_image(img, "png", 90)))
    back = torch.from_numpy(np.asarray(png, dtype="float32")).permute(2, 0, 1) / 127.5 - 1
    assert (back - img).abs().max() <= 1 / 127.5 + 1e-6  # lossless up to 8-bit rounding
