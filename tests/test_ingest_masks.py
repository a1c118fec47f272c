"""Edit masks from one's own data: a folder's `cat.mask.png` beside
`cat.jpg` and a table's `--mask-col` become each sample's `edit_mask.png`
entry (checked: a PNG of the image's size, read under the table's trust
rules), and a job on the tiny model then gives rows with PIE-Bench's
background metrics. A bad mask is a skip with its reason."""

import io
import json
import math

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from helpers_data import image_bytes
from pipeline.cli import app
from pipeline.data import EDIT_MASK_KEY, read_raw_samples
from pipeline.ingest import find_source, make_shards

SIZE = (96, 80)
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}


def mask_png(size=SIZE, box=(20, 10, 60, 50), fmt="PNG") -> bytes:
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    buf = io.BytesIO()
    Image.fromarray(m, "L").save(buf, format=fmt)
    return buf.getvalue()


def samples_of(summary) -> dict[str, dict]:
    return {raw["__key__"]: raw for url in summary.shards for raw in read_raw_samples(url)}


def test_a_folders_masks_travel_as_edit_mask_and_are_not_images(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "cat.jpg").write_bytes(image_bytes("RGB", SIZE, "JPEG", seed=1))
    (src / "cat.mask.png").write_bytes(mask_png())
    (src / "dog.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=2))  # no mask: a sample without one
    (src / "sub" / "bird.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=3))
    (src / "sub" / "bird.mask.png").write_bytes(mask_png(size=(48, 40), box=(0, 0, 10, 10)))  # half the size
    (src / "fish.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=4))
    (src / "fish.mask.png").write_bytes(mask_png(fmt="JPEG"))  # lossy: refused, whatever its name says
    (src / "orphan.mask.png").write_bytes(mask_png())  # a mask without its image: neither image nor sample
    s = make_shards(str(src), str(tmp_path / "shards"), targets=["a drawing"], progress=False)
    got = samples_of(s)
    assert set(got) == {"cat", "dog"} and s.written == 2
    assert got["cat"][EDIT_MASK_KEY] == (src / "cat.mask.png").read_bytes()
    assert EDIT_MASK_KEY not in got["dog"]
    reasons = dict(s.skipped)
    assert reasons["sub/bird.png"].startswith("mask_size: bird.mask.png is 48x40, the image 96x80")
    assert reasons["fish.png"].startswith("bad_mask: fish.mask.png must be a PNG (lossless), got JPEG")
    assert s.columns["mask"] == ".mask.png files"


def test_mask_col_of_a_csv_under_the_tables_trust_rules(tmp_path):
    src = tmp_path / "table"
    src.mkdir()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(mask_png())
    rows = [("a.png", "a.mask.png", "")]
    (src / "a.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=1))
    (src / "a.mask.png").write_bytes(mask_png())
    for name, mask, note in [("b", "b.mask.png", "wrong size"), ("c", "c.mask.jpg", "jpeg"),
                             ("d", str(outside), "outside"), ("e", "", "no mask"), ("f", "https://x.example/m.png", "url"),
                             ("g", "nothing.png", "missing")]:
        (src / f"{name}.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=ord(name)))
        rows.append((f"{name}.png", mask, note))
    (src / "b.mask.png").write_bytes(mask_png(size=(80, 96)))
    (src / "c.mask.jpg").write_bytes(mask_png(fmt="JPEG"))
    table = src / "edits.csv"
    table.write_text("file,mask,caption,edits\n" + "".join(f"{f},{m},a photo,a drawing\n" for f, m, _ in rows))
    s = make_shards(str(table), str(tmp_path / "shards"), image_col="file", mask_col="mask", progress=False)
    got = {json.loads(r["json"])["path"]: r for r in samples_of(s).values()}
    assert set(got) == {"a.png", "e.png"}
    assert got["a.png"][EDIT_MASK_KEY] == (src / "a.mask.png").read_bytes()
    assert EDIT_MASK_KEY not in got["e.png"]  # an empty cell: no mask
    assert "mask" not in json.loads(got["a.png"]["json"])  # the column is the entry, not a json field
    kinds = {where.split(" row ")[1]: reason.split(":", 1)[0] for where, reason in s.skipped}
    assert kinds == {"3": "mask_size", "4": "bad_mask", "5": "outside", "7": "bad_mask", "8": "missing_file"}
    assert s.columns["mask"] == "mask"
    # --allow-outside: a trusted table's mask anywhere on disk
    s2 = make_shards(str(table), str(tmp_path / "shards2"), image_col="file", mask_col="mask", allow_outside=True,
                     progress=False)
    assert EDIT_MASK_KEY in {json.loads(r["json"])["path"]: r for r in samples_of(s2).values()}["d.png"]


def test_mask_col_must_name_a_column_and_is_for_tables(tmp_path):
    import pytest

    from pipeline.ingest import IngestError

    (tmp_path / "t.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(IngestError, match="--mask-col 'masks': no such column"):
        find_source(str(tmp_path / "t.csv"), mask_col="masks")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(image_bytes("RGB", SIZE, "PNG"))
    with pytest.raises(IngestError, match="mask-col"):
        find_source(str(tmp_path / "f"), mask_col="mask")


def test_masked_folder_and_csv_run_on_the_tiny_model_with_the_background_metrics(tmp_path, monkeypatch):
    from pipeline.executor import run_job
    from pipeline.spec import load_spec
    from pipeline.store import OutputStore
    from pipeline.tables import PIE_METRICS

    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=1))
    (folder / "cat.mask.png").write_bytes(mask_png())
    (folder / "cat.txt").write_text("a photo of a cat")
    (folder / "plain.png").write_bytes(image_bytes("RGB", SIZE, "PNG", seed=2))
    (folder / "plain.txt").write_text("a photo")
    (folder / "table.csv").write_text("image,mask,caption\ncat.png,cat.mask.png,a photo of a cat\n")
    runner = CliRunner()
    res = runner.invoke(app, ["shards", str(folder), str(tmp_path / "s-folder"), "--no-progress",
                              "--targets", "a photo of a dog"], env=WIDE, prog_name="imprint")
    assert res.exit_code == 0, res.output
    assert "mask from .mask.png files" in res.output
    res = runner.invoke(app, ["shards", str(folder / "table.csv"), str(tmp_path / "s-table"), "--mask-col", "mask",
                              "--no-progress", "--targets", "a photo of a dog"], env=WIDE, prog_name="imprint")
    assert res.exit_code == 0, res.output
    assert "mask from mask" in res.output
    spec = load_spec(raw={
        "input": {"shards": [str(tmp_path / "s-folder"), str(tmp_path / "s-table")]},
        "model": {"id": "tiny"}, "image": {"resolution": 64}, "inversion": {"steps": 4, "skip": 1},
        "output": {"path": str(tmp_path / "out"), "image_format": "png"},
        "score": {"clip_model": "imprint-tiny-clip", "clip_pretrained": "none", "lpips_pretrained": False,
                  "structure_model": "vit_tiny_patch16_224", "structure_pretrained": False},
        "run": {"executor": "inline", "threads": 1}})
    report = run_job(spec, progress=False)
    assert report.errors == 0
    rows = OutputStore.open(str(tmp_path / "out")).read_table("results").to_pylist()
    by_shard = {(r["shard"].split("/")[-2], r["key"]): r for r in rows}
    assert set(by_shard) == {("s-folder", "cat"), ("s-folder", "plain"), ("s-table", "000000000")}
    for masked in (("s-folder", "cat"), ("s-table", "000000000")):
        r = by_shard[masked]
        assert all(r[m] is not None and not math.isnan(r[m]) for m in PIE_METRICS), r
        assert r["bg_mse"] >= 0 and 0 <= r["bg_ssim"] <= 1
    plain = by_shard[("s-folder", "plain")]
    assert all(plain[m] is None or math.isnan(plain[m]) for m in PIE_METRICS), plain  # no mask: no metric
