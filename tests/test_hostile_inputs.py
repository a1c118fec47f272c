"""Hostile and careless inputs on the reading side: damaged and duplicated
tar members, shell commands hidden in shard patterns, formats outside the
input contract, images shaped to exhaust memory, globs and folders."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers_data import good_samples, image_bytes, write
from pipeline.data import (
    decode_sample,
    expand_shards,
    load_image,
    open_shard,
    read_raw_samples,
    to_model_tensor,
)
from pipeline.spec import ImageSpec, InputSpec


def keys(raws):
    return [r["__key__"] for r in raws]


def member_offsets(path):
    """(name, header offset, data offset, size) of every member of a tar."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


# -- the reader --------------------------------------------------------------


def test_truncated_mid_member_keeps_the_complete_sample_before_it(tmp_path):
    path = write(tmp_path / "s.tar", good_samples(n=3))
    members = member_offsets(path)
    # cut in the middle of the first member of the third sample
    name, _, data_at, size = next(m for m in members if m[0].startswith("g002"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(path, "rb").read()[: data_at + size // 2])
    raws = list(read_raw_samples(str(cut)))
    assert keys(raws) == ["g000", "g001", "g002"]
    assert all("__error__" not in r for r in raws[:2])
    assert raws[2]["__error_type__"] == "tar_damaged" and "damaged" in raws[2]["__error__"]
    s = decode_sample(raws[2], str(cut), InputSpec(templates=["{source}"]), ImageSpec(), 128)
    assert s.error_type == "tar_damaged" and s.key == "g002"


@pytest.mark.parametrize("where", ["mid_header", "garbage_header", "at_boundary"])
def test_damage_between_members_is_reported_not_silent(tmp_path, where):
    path = write(tmp_path / "s.tar", good_samples(n=3))
    data = open(path, "rb").read()
    _, header_at, _, _ = next(m for m in member_offsets(path) if m[0].startswith("g002"))
    if where == "mid_header":
        data = data[: header_at + 200]
    elif where == "garbage_header":
        data = data[:header_at] + os.urandom(512) + data[header_at + 512 :]
    else:
        data = data[:header_at]
    (tmp_path / "d.tar").write_bytes(data)
    raws = list(read_raw_samples(str(tmp_path / "d.tar")))
    assert keys(raws)[:2] == ["g000", "g001"] and all("__error__" not in r for r in raws[:1])
    assert raws[-1]["__error_type__"] == "tar_damaged"


@pytest.mark.parametrize("first", [True, False])
def test_adjacent_duplicate_key_is_one_error_row_and_the_shard_goes_on(tmp_path, first):
    g = good_samples(n=3)
    order = [g[0], g[0], g[1], g[2]] if first else [g[0], g[1], g[1], g[2]]
    path = write(tmp_path / "dup.tar", order)
    raws = list(read_raw_samples(path))
    dup = "g000" if first else "g001"
    assert keys(raws) == [k["__key__"] for k in order]
    errors = [r for r in raws if "__error__" in r]
    assert len(errors) == 1 and errors[0]["__key__"] == dup and errors[0]["__error_type__"] == "duplicate_key"
    assert raws.index(errors[0]) == (1 if first else 2)  # the second copy, not the first


def test_not_a_tar_still_fails_the_shard(tmp_path):
    for i, junk in enumerate([os.urandom(3000), b"", b"<html>not found</html>" * 40]):
        p = tmp_path / f"junk{i}.tar"
        p.write_bytes(junk)
        with pytest.raises(OSError, match="cannot read shard"):
            list(read_raw_samples(str(p)))


def test_compressed_tar_and_meta_fields(tmp_path):
    path = tmp_path / "s.tar.gz"
    raw = good_samples(n=2)
    raw[0]["json"] = {"source_prompt": "a cat", "target_prompts": ["a dog"], "license": "cc-by", "id": 7}
    plain = write(tmp_path / "plain.tar", raw)
    import gzip

    path.write_bytes(gzip.compress(open(plain, "rb").read()))
    raws = list(read_raw_samples(str(path)))
    assert keys(raws) == ["g000", "g001"]
    s = decode_sample(raws[0], str(path), InputSpec(), ImageSpec(), 128)
    assert not s.error and s.meta == {"license": "cc-by", "id": 7} and s.target_prompts == ["a dog"]


# -- command execution --------------------------------------------------------


def test_pipe_hidden_in_braces_is_refused_everywhere(tmp_path):
    from pipeline.spec import SpecError, load_spec

    flag = tmp_path / "FLAG"
    shard = write(tmp_path / "a.tar", good_samples(n=1))
    pattern = f"{{pipe:touch {flag}; cat {shard},{shard}}}"
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_shards([pattern])
    with pytest.raises(SpecError, match=r"^input.shards: .*pipe"):
        load_spec(raw={"input": {"shards": [pattern]}, "output": {"path": str(tmp_path / "o")}})
    # where a shard is opened, too (a worker given a URL list some other way)
    with pytest.raises(ValueError, match="allow_pipe"):
        open_shard(f"pipe:touch {flag}; cat {shard}")
    with pytest.raises(ValueError, match="allow_pipe"):
        list(read_raw_samples(f"pipe:touch {flag}; cat {shard}"))
    assert not flag.exists()
    # allowed explicitly: the command runs
    assert keys(read_raw_samples(f"pipe:touch {flag}; cat {shard}", allow_pipe=True)) == ["g000"]
    assert flag.exists()


def test_unknown_url_schemes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        expand_shards(["sftp://host/a.tar"])
    with pytest.raises(ValueError, match="remote URL"):
        open_shard("https://example.com/a.tar", allow_remote=False)


# -- globs and folders ----------------------------------------------------------


def test_globs_and_folders(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in ("b-001.tar", "a-000.tar", "c-002.tar"):
        write(d / name, good_samples(n=1))
    (d / "notes.txt").write_text("x")
    want = [str(d / n) for n in ("a-000.tar", "b-001.tar", "c-002.tar")]
    assert expand_shards([str(d / "*.tar")]) == want
    assert expand_shards([str(d)]) == want
    assert expand_shards([str(d / "a-000.tar"), str(d)]) == want  # de-duplicated, first occurrence first
    assert expand_shards([f"file://{d}/*.tar"]) == [f"file://{p}" for p in want]


def test_globs_on_an_object_store(tmp_path, monkeypatch):
    """s3:// globs and folders are listed through the same pyarrow filesystem
    that opens the shards (a local folder stands in for the bucket)."""
    import pyarrow.fs as pafs

    import pipeline.data

    bucket = tmp_path / "bucket"
    for name in ("data/b-001.tar", "data/a-000.tar", "data/sub/c-002.tar", "data/sub/deeper/d.tar", "other/x.tar", "data/notes.txt"):
        (bucket / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / name).write_bytes(b"x")

    def local_bucket(url):
        assert url.startswith("s3://")
        # like S3FileSystem: paths are "bucket/key"
        return pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), url[len("s3://"):]

    monkeypatch.setattr(pipeline.data, "object_store", local_bucket)
    want = ["s3://bucket/data/a-000.tar", "s3://bucket/data/b-001.tar"]
    assert expand_shards(["s3://bucket/data/*.tar"]) == want
    assert expand_shards(["s3://bucket/data/"]) == want
    assert expand_shards(["s3://bucket/data/*/*.tar"]) == ["s3://bucket/data/sub/c-002.tar"]
    assert expand_shards(["s3://bucket/data/a-000.tar"]) == ["s3://bucket/data/a-000.tar"]  # no glob: not listed


def test_many_patterns_deduplicated_in_order(tmp_path):
    # 200,000 patterns (the old list-membership de-duplication took minutes;
    # timing is recorded in the report, not asserted)
    patterns = [f"/nonexistent/shard-{i:06d}.tar" for i in range(100_000)] * 2
    out = expand_shards(patterns)
    assert len(out) == 100_000 and out[0] == patterns[0] and out[-1] == patterns[99_999]


# -- decoding -------------------------------------------------------------------


def _tiff_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="TIFF")
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"


@pytest.mark.parametrize("data,fmt", [(_tiff_bytes(), "TIFF"), (EPS, "EPS")])
def test_formats_outside_the_contract_are_refused(data, fmt, monkeypatch):
    from PIL import EpsImagePlugin, TiffImagePlugin

    # no decoder of these formats may even be started
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", lambda self: pytest.fail("TIFF plugin opened"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS plugin opened"))
    raw = {"__key__": "k", "jpg": data, "json": b'{"source_prompt": "a cat"}'}
    s = decode_sample(raw, "shard", InputSpec(templates=["{source}"]), ImageSpec(), 128)
    assert s.error_type == "format_refused" and fmt in s.error, s.error


def test_png_named_jpg_is_fine():
    img = load_image(image_bytes("RGB", (40, 30), "PNG"), ImageSpec())
    assert img.size == (40, 30)


def test_long_strip_is_resampled_at_output_size(monkeypatch):
    """A 1,000,000 x 16 image: no intermediate image larger than the output
    (the old path scaled the whole strip to 4,000,000 x 64 first)."""
    sizes = []
    real = Image.Image.resize

    def spy(self, size, *a, **k):
        out = real(self, size, *a, **k)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(Image.Image, "resize", spy)
    img = Image.new("RGB", (1_000_000, 16), (10, 200, 30))
    t = to_model_tensor(img, ImageSpec(), 64)
    assert tuple(t.shape) == (3, 64, 128)  # max_aspect 2
    assert sizes and max(w * h for w, h in sizes) <= 64 * 128
    t = to_model_tensor(img, ImageSpec(resize="square"), 64)
    assert tuple(t.shape) == (3, 64, 64) and max(w * h for w, h in sizes) <= 64 * 128


def test_crop_then_resize_matches_resize_then_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((90, 300, 3)) * 255).astype(np.uint8), "RGB")
    t = to_model_tensor(img, ImageSpec(), 64)
    full = img.resize((213, 64), Image.Resampling.LANCZOS)
    left = (213 - 128) // 2
    ref = np.asarray(full.crop((left, 0, left + 128, 64)), dtype=np.float32) / 127.5 - 1
    got = t.permute(1, 2, 0).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 0.02


def test_oversized_member_is_not_read(tmp_path, monkeypatch):
    import pipeline.data

    monkeypatch.setattr(pipeline.data, "MAX_MEMBER_BYTES", 40_000)
    g = good_samples(n=3)
    g[1]["txt"] = "x" * 50_000
    raws = list(read_raw_samples(write(tmp_path / "big.tar", g)))
    assert keys(raws) == ["g000", "g001", "g002"]
    assert raws[1]["__error_type__"] == "too_large" and raws[1]["txt"] == b""
    assert "__error__" not in raws[0] and "__error__" not in raws[2]


def test_every_bad_sample_has_an_error_type():
    from helpers_data import bad_samples

    from pipeline.data import ERROR_TYPES

    expected = {"truncated": "decode", "not_image": "decode", "no_prompt": "prompt_missing", "empty_prompt": "prompt_missing",
                "zero_size": "decode", "tiny_image": "too_small", "bomb": "too_large", "bad_json": "bad_json",
                "long_prompt": "prompt_too_long", "no_image": "no_image"}
    inp = InputSpec(templates=["{source}, sketch"], truncate_prompts=False)  # long_prompt: an error only then
    for key, raw in bad_samples().items():
        raw = {k: v if k.startswith("__") else (json_bytes(v) if isinstance(v, dict) else v.encode() if isinstance(v, str) else v)
               for k, v in raw.items()}
        s = decode_sample(raw, "shard", inp, ImageSpec(), 128, count_tokens=lambda p: len(p.split()) + 2)
        assert s.error_type == expected[key] and s.error_type in ERROR_TYPES, (key, s.error_type, s.error)


def json_bytes(v):
    import json

    return json.dumps(v).encode()
