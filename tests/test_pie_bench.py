"""PIE-Bench end to end: a folder in the benchmark's layout (written here:
RLE masks, bracketed prompts; the real benchmark is never downloaded)
becomes shards with `imprint shards --format pie-bench`, runs under
jobs/pie-bench.toml on the tiny model (random scorers, a tiny ViT for the
structure distance), and `imprint eval` prints and writes the seven metrics
per method. Plus the reader's own rules: mask decoding, prompt brackets,
bad entries skipped."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import pie_bench
from pipeline.cli import app
from pipeline.executor import run_job
from pipeline.spec import load_spec
from pipeline.store import OutputStore
from pipeline.tables import PIE_METRICS

WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}


def _rle(mask: np.ndarray) -> list[int]:
    """PIE-Bench's encoding: [start, length, ...] of the 1-runs of the row-major grid."""
    flat = np.concatenate([[0], mask.flatten().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def test_decode_mask_and_prompts():
    m = np.zeros((512, 512), np.uint8)
    m[100:200, 50:300] = 1
    got = pie_bench.decode_mask(_rle(m))
    expect = m.copy()
    expect[0, :] = expect[-1, :] = expect[:, 0] = expect[:, -1] = 1  # the decoder's border
    assert np.array_equal(got, expect)
    # a run past the end is cut there; runs are [start, length]
    tail = pie_bench.decode_mask([512 * 512 - 3, 10])
    assert tail.sum() == 512 * 4 - 4 and tail[-1, -3:].all()
    with pytest.raises(ValueError, match="pairs"):
        pie_bench.decode_mask([5])
    with pytest.raises(ValueError, match="outside"):
        pie_bench.decode_mask([512 * 512, 1])
    assert pie_bench.parse_prompt("a [red]  car on [a  road]") == ("a red car on a road", ["red", "a  road"])
    assert pie_bench.parse_prompt("a cat") == ("a cat", [])


def _write_pie_folder(root) -> dict:
    rng = np.random.default_rng(0)
    entries = {}
    specs = [("000000000000", "0_random_140", "a [cat] sitting on a bench", "a [dog] sitting on a bench", (150, 350, 150, 350)),
             ("000000000001", "0_random_140", "a [red] car", "a [blue] car", (200, 400, 100, 300)),
             ("111000000000", "1_change_object_80", "a photo of a [house]", "a photo of a [castle]", (50, 250, 250, 500))]
    for pie_id, folder, src, tgt, (y0, y1, x0, x1) in specs:
        (root / "annotation_images" / folder).mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "annotation_images" / folder / f"{pie_id}.jpg", quality=95)
        m = np.zeros((512, 512), np.uint8)
        m[y0:y1, x0:x1] = 1
        entries[pie_id] = {"image_path": f"{folder}/{pie_id}.jpg", "original_prompt": src, "editing_prompt": tgt,
                           "editing_instruction": "change it", "editing_type_id": folder[0],
                           "blended_word": "cat dog", "mask": _rle(m)}
    entries["999"] = {"image_path": "0_random_140/missing.jpg", "original_prompt": "x", "editing_prompt": "y",
                      "mask": [1, 2, 3]}  # a bad mask: skipped with its reason
    (root / "mapping_file.json").write_text(json.dumps(entries))
    return entries


def test_pie_bench_folder_to_shards_job_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "PIE-Bench_v1"
    entries = _write_pie_folder(src)
    runner = CliRunner()
    res = runner.invoke(app, ["shards", str(src), str(tmp_path / "shards"), "--format", "pie-bench", "--no-progress"],
                        env=WIDE, prog_name="imprint")
    assert res.exit_code == 0, res.output
    assert "bad_entry" in res.output  # the bad mask, listed
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta = json.loads(members["000000000000.json"])
    assert meta["source_prompt"] == "a cat sitting on a bench" and meta["target_prompts"] == ["a dog sitting on a bench"]
    assert meta["edited_words"] == ["dog"] and meta["source_words"] == ["cat"]
    assert meta["editing_type"] == "0_random_140" and meta["editing_type_id"] == "0"
    mask = np.asarray(Image.open(io.BytesIO(members["000000000000.edit_mask.png"])))
    assert np.array_equal(mask > 0, pie_bench.decode_mask(entries["000000000000"]["mask"]) > 0)

    spec = load_spec("jobs/pie-bench.toml", [
        "model.id=tiny", "image.resolution=64", "inversion.steps=5", "inversion.skip=1", "run.executor=inline",
        f'input.shards=["{tmp_path / "shards" / "shard-000000.tar"}"]', f'output.path="{tmp_path / "out"}"',
        "score.clip_model=imprint-tiny-clip", "score.clip_pretrained=none", "score.lpips_pretrained=false",
        "score.structure_model=vit_tiny_patch16_224", "score.structure_pretrained=false"])
    assert (spec.inversion.steps, spec.edit.cross_until, spec.edit.self_until) == (5, 0.4, 0.6)
    report = run_job(spec, progress=False)
    assert report.errors == 0
    rows = OutputStore.open(str(tmp_path / "out")).read_table("results").to_pylist()
    assert {r["method"] for r in rows} == {"edit-friendly", "edit-friendly+p2p"} and len(rows) == 3 * 2
    assert all(all(r[m] is not None and not math.isnan(r[m]) for m in PIE_METRICS) for r in rows)

    out_json = tmp_path / "pie.json"
    res = runner.invoke(app, ["eval", str(tmp_path / "out"), "--json", str(out_json), "--by", "editing_type",
                              "--published"], env=WIDE, prog_name="imprint")
    assert res.exit_code == 0, res.output
    assert "edit-friendly+p2p" in res.output and "DDIM+P2P (published)" in res.output and "69.43" in res.output
    assert "editing_type = 1_change_object_80" in res.output
    assert "scored with random weights" in res.output  # the scorers here are random, and eval says so
    got = json.loads(out_json.read_text())
    assert set(got["methods"]) == {"edit-friendly", "edit-friendly+p2p"}
    for method in got["methods"]:
        mine = [r for r in rows if r["method"] == method]
        assert set(got["methods"][method]) == set(PIE_METRICS)
        # the means, in the published units
        assert got["methods"][method]["bg_mse"] == pytest.approx(1e4 * np.mean([r["bg_mse"] for r in mine]), rel=1e-6)
        assert got["methods"][method]["structure_distance"] == pytest.approx(
            1e3 * np.mean([r["structure_distance"] for r in mine]), rel=1e-6)
        assert got["methods"][method]["bg_psnr"] == pytest.approx(np.mean([r["bg_psnr"] for r in mine]), rel=1e-6)
    assert set(got["by"]["groups"]) == {"0_random_140", "1_change_object_80"}
    assert got["random_weights"] == [str(tmp_path / "out")]
    # eval of an output without masks says why it has nothing to show
    res = runner.invoke(app, ["eval", str(tmp_path / "nothing")], env=WIDE, prog_name="imprint")
    assert res.exit_code != 0 and "edit_mask.png" in res.output
