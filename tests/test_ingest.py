"""`imprint shards`: every input kind to shards in the input contract, bad
inputs skipped and reported (never a traceback), URLs from a local HTTP
server, object-store output; and the shard-list errors that point at it."""

import functools
import http.server
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers_data import image_bytes
from pipeline.cli import app
from pipeline.data import expand_shards, read_raw_samples
from pipeline.ingest import IngestError, make_shards, summary_lines
from pipeline.spec import ImageSpec, InputSpec


def read_back(summary) -> dict[str, dict]:
    """key -> raw sample of every shard written, checked against the contract's decoder."""
    from pipeline.data import decode_sample

    out = {}
    for url in summary.shards:
        for raw in read_raw_samples(url):
            s = decode_sample(raw, url, InputSpec(source_prompt="", templates=["x"]), ImageSpec(), 64)
            assert not s.error, (raw["__key__"], s.error)
            out[raw["__key__"]] = {**raw, "json": json.loads(raw["json"])}
    return out


def kinds(summary):
    return dict(summary.reasons())


def test_folder_with_txt_and_json_sidecars(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(image_bytes("RGB", (64, 48), "JPEG"))
    (src / "a.txt").write_text("a red car\n")
    (src / "sub" / "b.png").write_bytes(image_bytes("RGB", (64, 48), "PNG", seed=1))
    (src / "sub" / "b.json").write_text(json.dumps({"source_prompt": "a dog", "target_prompts": ["a cat"], "license": "cc0"}))
    (src / "c.bmp").write_bytes(image_bytes("RGB", (64, 48), "BMP", seed=2))  # no caption: written, counted
    (src / "broken.png").write_bytes(b"not an image")
    (src / "d.png").write_bytes(image_bytes("RGB", (64, 48), "PNG", seed=3))
    (src / "d.json").write_text("{oops")
    (src / "notes.md").write_text("ignored")
    s = make_shards(str(src), str(tmp_path / "shards"), samples_per_shard=2, progress=False)
    assert s.kind == "folder" and s.written == 3 and len(s.shards) == 2
    assert kinds(s) == {"decode": 1, "bad_json": 1}
    assert any("broken.png" in r for _, r in s.skipped) and any("d.json" in r for _, r in s.skipped)
    assert s.converted == 1 and s.uncaptioned == 1
    got = read_back(s)
    assert set(got) == {"a", "sub_b", "c"}
    assert got["a"]["json"] == {"source_prompt": "a red car"} and "jpg" in got["a"]
    assert got["sub_b"]["json"] == {"source_prompt": "a dog", "target_prompts": ["a cat"], "license": "cc0"}
    assert "png" in got["c"] and got["c"]["json"] == {}


def test_imagefolder_metadata_jsonl(tmp_path):
    src = tmp_path / "hf"
    (src / "train").mkdir(parents=True)
    for i in range(3):
        (src / "train" / f"{i}.png").write_bytes(image_bytes(seed=i))
    rows = [{"file_name": "train/0.png", "text": "a cat", "label": "cat"},
            {"file_name": "train/1.png", "text": "a dog", "label": "dog"},
            {"file_name": "train/missing.png", "text": "gone"},
            {"file_name": "train/2.png", "label": "bird"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = make_shards(str(src), str(tmp_path / "out"), progress=False)
    assert s.kind == "imagefolder" and s.written == 3 and kinds(s) == {"missing_file": 1}
    assert s.columns["caption"] == "text"
    got = read_back(s)
    assert got["train_0"]["json"] == {"source_prompt": "a cat", "label": "cat", "path": "train/0.png"}
    assert got["train_2"]["json"] == {"label": "bird", "path": "train/2.png"}


def _table_rows(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.jpg").write_bytes(image_bytes("RGB", (64, 64), "JPEG", seed=i))
    return [
        {"img": "imgs/0.jpg", "cap": "a house", "tgt": '["a red house", "a house at night"]', "label": "007"},
        {"img": str(imgs / "1.jpg"), "cap": "a tree", "tgt": "a tree in the snow", "label": "008"},
        {"img": "imgs/nope.jpg", "cap": "missing", "tgt": "", "label": "009"},
        {"img": "imgs/2.jpg", "cap": "", "tgt": "", "label": "010"},
    ]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_and_tsv_with_a_bad_row(tmp_path, fmt):
    sep = "," if fmt == "csv" else "\t"
    rows = _table_rows(tmp_path)
    lines = [sep.join(["img", "cap", "tgt", "label"])]
    for r in rows:
        tgt = r["tgt"].replace('"', '""')
        lines.append(sep.join([r["img"], r["cap"], f'"{tgt}"' if tgt else "", r["label"]]))
    lines.insert(3, sep.join(["only", "three", "fields"]))  # wrong number of fields: skipped, reported
    table = tmp_path / f"data.{fmt}"
    table.write_text("\n".join(lines) + "\n")
    s = make_shards(str(table), str(tmp_path / "out"), image_col="img", caption_col="cap", targets_col="tgt",
                    progress=False)
    assert s.kind == fmt and s.written == 3, s.skipped
    assert kinds(s) == {"bad_row": 1, "missing_file": 1}, s.skipped
    got = read_back(s)
    first, second, last = (got[k]["json"] for k in sorted(got))
    assert first == {"source_prompt": "a house", "target_prompts": ["a red house", "a house at night"], "label": "007",
                     "path": "imgs/0.jpg"}  # the image path as the table wrote it (lineage)
    assert second == {"source_prompt": "a tree", "target_prompts": ["a tree in the snow"], "label": "008",
                      "path": str(tmp_path / "imgs" / "1.jpg")}
    assert last == {"label": "010", "path": "imgs/2.jpg"}  # label kept as text ("010", not 10)


def test_jsonl_with_bad_lines(tmp_path):
    rows = _table_rows(tmp_path)
    text = "\n".join(json.dumps({**r, "tgt": [r["cap"] + ", watercolor"] if r["cap"] else None}) for r in rows)
    table = tmp_path / "data.jsonl"
    table.write_text(text + "\n{not json\n[1, 2]\n")
    s = make_shards(str(table), str(tmp_path / "out"), image_col="img", caption_col="cap", targets_col="tgt",
                    progress=False)
    assert s.written == 3 and kinds(s) == {"bad_row": 2, "missing_file": 1}, s.skipped
    assert read_back(s)["000000000"]["json"]["target_prompts"] == ["a house, watercolor"]


def test_parquet_with_image_bytes_and_urls_from_a_local_server(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "x.png").write_bytes(image_bytes(seed=5))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "web"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        table = pa.table({
            "image": [{"bytes": image_bytes(seed=1), "path": None}, {"bytes": b"garbage", "path": None},
                      {"bytes": None, "path": f"{base}/x.png"}, {"bytes": None, "path": f"{base}/missing.png"}],
            "caption": ["one", "two", "three", "four"],
            "score": [0.5, float("nan"), 1.0, 2.0],
        })
        pq.write_table(table, tmp_path / "d.parquet")
        s = make_shards(str(tmp_path / "d.parquet"), str(tmp_path / "out"), timeout=5, progress=False,
                        allow_private=True)  # the test server is on 127.0.0.1
    finally:
        server.shutdown()
    assert s.kind == "parquet" and s.columns["image"] == "image" and s.written == 2, s.skipped
    assert kinds(s) == {"decode": 1, "http_error": 1} and any("HTTP 404" in r for _, r in s.skipped)
    got = read_back(s)
    assert [g["json"]["source_prompt"] for g in got.values()] == ["one", "three"]


def test_hf_dataset_on_disk_and_as_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    import io

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": image_bytes(seed=i), "path": None} for i in range(3)] + [{"bytes": b"bad", "path": None}],
         "label": [0, 1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}))
    ds.save_to_disk(str(tmp_path / "saved"))
    s = make_shards(str(tmp_path / "saved"), str(tmp_path / "out1"), progress=False)
    assert s.kind == "hf-dataset" and s.written == 3 and kinds(s) == {"decode": 1}
    got = read_back(s)
    assert got["000000001"]["json"] == {"label": "dog", "label_id": 1}
    assert Image.open(io.BytesIO(got["000000000"]["png"])).size == (96, 80)

    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    s = make_shards(str(tmp_path / "dd"), str(tmp_path / "out2"), progress=False)
    assert s.written == 3 and read_back(s)["train-000000000"]["json"] == {"label": "cat", "label_id": 0, "split": "train"}

    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    s = make_shards(str(tmp_path / "hub"), str(tmp_path / "out3"), progress=False)  # a folder of Parquet files
    assert s.kind == "parquet" and s.written == 3 and read_back(s)["000000002"]["json"]["label"] == "cat"


def test_object_store_dest(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    import pipeline.ingest

    (tmp_path / "bucket").mkdir()
    monkeypatch.setattr(pipeline.ingest, "object_store",
                        lambda url: (pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), url[len("s3://"):]))
    src = tmp_path / "f"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(image_bytes(seed=i))
        (src / f"{i}.txt").write_text(f"caption {i}")
    s = make_shards(str(src), "s3://bucket/shards/", samples_per_shard=2, progress=False)
    assert s.shards == ["s3://bucket/shards/shard-000000.tar", "s3://bucket/shards/shard-000001.tar"]
    assert sorted(p.name for p in (tmp_path / "bucket" / "shards").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(list(read_raw_samples(str(tmp_path / "bucket" / "shards" / "shard-000001.tar")))) == 1


def test_cli_summary_and_clean_errors(tmp_path):
    src = tmp_path / "f"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes())
    (src / "a.txt").write_text("a caption")
    (src / "b.png").write_bytes(b"junk")
    run = CliRunner().invoke
    res = run(app, ["shards", str(src), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote 1 samples to 1 shard(s)" in res.output and "skipped 1: decode 1" in res.output and "b.png" in res.output
    # DEST holding shards: refused unless --overwrite (a job would read the old shards too)
    res = run(app, ["shards", str(src), str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 2 and "already holds 1 .tar" in res.output and "Traceback" not in res.output
    assert run(app, ["shards", str(src), str(tmp_path / "out"), "--no-progress", "--overwrite"]).exit_code == 0
    for args, msg in [([str(tmp_path / "nope"), str(tmp_path / "o2")], "no such file or folder"),
                      ([str(src / "a.txt"), str(tmp_path / "o2")], "unsupported file type"),
                      ([str(src), str(tmp_path / "o2"), "--samples-per-shard", "0"], "at least 1")]:
        res = run(app, ["shards", *args, "--no-progress"])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
    table = tmp_path / "t.csv"
    table.write_text("photo,words\nf/a.png,hello\n")
    res = run(app, ["shards", str(table), str(tmp_path / "o3"), "--no-progress"])
    assert res.exit_code == 2 and "no image column among photo, words; name it with --image-col" in res.output
    res = run(app, ["shards", str(table), str(tmp_path / "o3"), "--image-col", "pic", "--no-progress"])
    assert res.exit_code == 2 and "--image-col 'pic': no such column" in res.output
    res = run(app, ["shards", str(src / "b.png").replace("b.png", ""), str(tmp_path / "o4"), "--no-progress",
                    "--caption-col", "x"])
    assert res.exit_code == 2 and "for tables and datasets" in res.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    res = run(app, ["shards", str(tmp_path / "bad"), str(tmp_path / "o5"), "--no-progress"])
    assert res.exit_code == 2 and "no samples written" in res.output


def test_the_ingest_error_is_a_value_error():
    assert issubclass(IngestError, ValueError)


# -- input.shards pointing at images or a folder of them -------------------------


def test_shard_list_refuses_image_folders_and_image_globs_with_the_fix(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(image_bytes())
    (photos / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"is a folder without \.tar shards \(it holds 2 entries, 1 of them images\).*imprint shards"):
        expand_shards([str(photos)])
    with pytest.raises(ValueError, match=r"a\.png' is a \.png file, not a WebDataset shard.*imprint shards"):
        expand_shards([str(photos / "*.png")])
    with pytest.raises(ValueError, match="is a folder without .tar shards .it is empty"):
        (tmp_path / "empty").mkdir()
        expand_shards([str(tmp_path / "empty")])
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\nshards = ["{photos}"]\ntemplates = ["{{source}}, x"]\n[run]\nexecutor = "inline"\n'
                   f'[output]\npath = "{tmp_path / "out"}"\n')
    res = CliRunner().invoke(app, ["run", str(job), "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"imprint shards {photos} SHARDS_FOLDER" in res.output


# -- templates over json fields, the empty source prompt ------------------------


def decode(raw, **input_fields):
    from pipeline.data import decode_sample

    raw = {"__key__": "k", "png": image_bytes(), **raw}
    raw = {k: json.dumps(v).encode() if isinstance(v, dict) else v.encode() if isinstance(v, str) else v
           for k, v in raw.items()}
    return decode_sample(raw, "shard", InputSpec(**input_fields), ImageSpec(), 64)


def test_templates_use_json_fields_and_a_missing_field_is_an_error_row_naming_it():
    from pipeline.data import ERROR_TYPES

    assert "template_field" in ERROR_TYPES
    s = decode({"json": {"label": "cat", "n": 3}}, source_prompt="a photo of a {label}",
               templates=["{label} in the snow", "a painting of {n} {label}s", "{source}, at night"])
    assert not s.error, s.error
    assert s.source_prompt == "a photo of a cat"
    assert s.target_prompts == ["cat in the snow", "a painting of 3 cats", "a photo of a cat, at night"]
    assert s.meta == {"label": "cat", "n": 3}
    # the sample's own caption is {source} in the source template
    s = decode({"txt": "a tabby", "json": {"label": "cat"}}, source_prompt="{source}, a {label}", templates=["x"])
    assert s.source_prompt == "a tabby, a cat"
    for raw, fields, needle in [
        ({"json": {"species": "cat"}}, {"templates": ["{label} in the snow"]}, "{label}: the sample's json has no field 'label'"),
        ({"json": {"label": ["cat"]}}, {"source_prompt": "a {label}", "templates": ["x"]}, "'label' is a list, not a string"),
        ({"json": {"label": None}}, {"source_prompt": "a {label}", "templates": ["x"]}, "'label' is null"),
        ({"json": {"label": "cat"}}, {"source_prompt": "{source} {label}", "templates": ["x"]}, "{source}: the sample has no caption"),
    ]:
        s = decode(raw, **({"source_prompt": ""} | fields))
        assert s.error_type == "template_field" and needle in s.error, (raw, s.error)
        assert s.image is None


def test_empty_source_prompt_is_an_explicit_choice():
    s = decode({"txt": "a caption that is ignored"}, source_prompt="", templates=["a cat in the snow"])
    assert not s.error and s.source_prompt == "" and s.target_prompts == ["a cat in the snow"]
    s = decode({"json": {"target_prompts": ["a dog"]}}, source_prompt="")  # no caption at all: fine
    assert not s.error and s.source_prompt == ""
    s = decode({"json": {"target_prompts": ["a dog"]}})  # unset: the caption is required, and the error says what to do
    assert s.error_type == "prompt_missing" and "input.source_prompt" in s.error
    s = decode({"txt": ""}, source_prompt="", templates=["{source}"])  # {source} is empty: an error, not an empty target
    assert s.error_type == "template_field"


def test_source_prompt_in_the_spec_schema_and_hash():
    from pipeline.spec import job_json_schema, load_spec

    base = {"input": {"shards": ["a.tar"], "templates": ["{label}, snow"]}}
    assert job_json_schema()["properties"]["input"]["properties"]["source_prompt"] == {"type": "string"}
    unset, empty = load_spec(raw=base), load_spec(raw=base, overrides=['input.source_prompt=""'])
    assert unset.input.source_prompt is None and empty.input.source_prompt == ""
    assert unset.hash() != empty.hash()
    assert load_spec(raw=unset.to_dict()).input.source_prompt is None  # a spec's own dict loads back (None = unset)
    assert load_spec(raw=empty.to_dict()).hash() == empty.hash()
    saved = json.loads((__import__("pathlib").Path(__file__).parent.parent / "schemas" / "job.schema.json").read_text())
    assert saved == job_json_schema()


# -- the user's own data through a job ------------------------------------------


def tiny_job(tmp_path, shards, out, **input_fields):
    from pipeline.spec import load_spec

    return load_spec(raw={
        "input": {"shards": [str(s) for s in shards], **input_fields},
        "model": {"id": "tiny"}, "inversion": {"steps": 4, "skip": 1},
        "output": {"path": str(tmp_path / out), "image_format": "png"},
        "score": {"enabled": False}, "run": {"executor": "inline", "threads": 1},
    })


def test_tar_cf_of_files_and_an_img2dataset_shard_run_through_a_job(tmp_path):
    import subprocess

    from pipeline.data import write_shards
    from pipeline.executor import run_job
    from pipeline.store import OutputStore

    files = tmp_path / "files"
    files.mkdir()
    for i, ext in enumerate(("jpg", "png")):
        (files / f"img{i}.{ext}").write_bytes(image_bytes("RGB", (96, 80), "JPEG" if ext == "jpg" else "PNG", seed=i))
        (files / f"img{i}.txt").write_text(f"a photo number {i}")
    plain = tmp_path / "plain.tar"
    # the README's command: a sample's files must be adjacent (sorted), and "./img0.jpg" is the sample "img0"
    subprocess.run(["tar", "--sort=name", "-cf", str(plain), "-C", str(files), "."], check=True)
    meta = {"url": "https://example.com/0.jpg", "caption": "a cat on a sofa", "key": "000000000", "status": "success",
            "error_message": None, "width": 96, "height": 80, "original_width": 960, "original_height": 800,
            "exif": "{}", "sha256": "ab" * 32}
    i2d = write_shards([{"__key__": "000000000", "jpg": image_bytes("RGB", (96, 80), "JPEG", seed=7),
                         "txt": "a cat on a sofa", "json": meta}], str(tmp_path / "00000.tar"))
    spec = tiny_job(tmp_path, [plain, i2d], "out", templates=["{source}, oil painting"])
    report = run_job(spec, progress=False)
    assert not report.failed and report.errors == 0
    sources = {r["key"]: r for r in OutputStore.open(spec.output.path).read_table("sources").to_pylist()}
    assert {k: r["source_prompt"] for k, r in sources.items()} == {
        "img0": "a photo number 0", "img1": "a photo number 1", "000000000": "a cat on a sofa"}
    assert all(r["status"] == "ok" for r in sources.values())
    assert json.loads(sources["000000000"]["meta"]) == meta  # img2dataset's json fields, all of them, in `meta`
    results = OutputStore.open(spec.output.path).read_table("results").to_pylist()
    assert sorted(r["target_prompt"] for r in results if r["key"] == "000000000") == ["a cat on a sofa, oil painting"]


def test_labelled_images_to_shards_to_a_job_with_the_empty_source_prompt(tmp_path):
    from pipeline.executor import run_job
    from pipeline.store import OutputStore

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(seed=i))
    (tmp_path / "labels.csv").write_text("file_name,label\nimgs/0.png,cat\nimgs/1.png,dog\nimgs/2.png,\n")
    s = make_shards(str(tmp_path / "labels.csv"), str(tmp_path / "shards"), progress=False)
    assert s.written == 3 and s.uncaptioned == 3
    spec = tiny_job(tmp_path, [tmp_path / "shards"], "out", source_prompt="", templates=["a {label} in the snow"])
    report = run_job(spec, progress=False)
    assert not report.failed and report.errors == 1
    sources = {r["key"]: r for r in OutputStore.open(spec.output.path).read_table("sources").to_pylist()}
    assert sources["000000000"]["status"] == "ok" and sources["000000000"]["source_prompt"] == ""
    assert sources["000000002"]["status"] == "error" and "no field 'label'" in sources["000000002"]["error"]
    results = OutputStore.open(spec.output.path).read_table("results").to_pylist()
    assert sorted((r["key"], r["target_prompt"]) for r in results) == [
        ("000000000", "a cat in the snow"), ("000000001", "a dog in the snow")]


def test_lineage_a_csv_rows_url_and_id_reach_the_result_row_and_the_export(tmp_path):
    """Issue 33: the image's URL (or path) and the table's own id column
    (--key-col) travel from the CSV through the shards to the results' meta
    and the export; the id is the sample's key."""
    import subprocess
    import sys

    import webdataset as wds

    from pipeline.executor import run_job
    from pipeline.store import OutputStore

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "x.png").write_bytes(image_bytes(seed=5))
    (tmp_path / "local.png").write_bytes(image_bytes(seed=6))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "web"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
    (tmp_path / "t.csv").write_text(f"id,url,caption\nphoto-17,{url},a red house\nphoto-18,local.png,a tree\n")
    try:
        runner = CliRunner()
        res = runner.invoke(app, ["shards", str(tmp_path / "t.csv"), str(tmp_path / "shards"), "--key-col", "id",
                                  "--allow-private", "--no-progress"])
    finally:
        server.shutdown()
    assert res.exit_code == 0, res.output
    spec = tiny_job(tmp_path, [tmp_path / "shards"], "out", templates=["{source}, oil painting"])
    report = run_job(spec, progress=False)
    assert not report.failed and report.errors == 0
    rows = OutputStore.open(spec.output.path).read_table("results").to_pylist()
    assert {r["key"]: json.loads(r["meta"]) for r in rows} == {
        "photo-17": {"id": "photo-17", "url": url}, "photo-18": {"id": "photo-18", "path": "local.png"}}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", spec.output.path, str(tmp_path / "exp")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = list(wds.WebDataset(str(tmp_path / "exp" / "edits-000000.tar"), shardshuffle=False).decode())
    assert {g["json"]["key"]: g["json"]["meta"] for g in got} == {
        "photo-17": {"id": "photo-17", "url": url}, "photo-18": {"id": "photo-18", "path": "local.png"}}


def test_key_col_names_a_column_and_an_empty_id_skips_the_row(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(seed=1))
    (tmp_path / "t.csv").write_text("id,image\nx.1,a.png\n,a.png\nx.1,a.png\n")
    with pytest.raises(IngestError, match="--key-col 'nope': no such column"):
        make_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), key_col="nope", progress=False)
    s = make_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), key_col="id", progress=False)
    assert s.written == 2 and kinds(s) == {"no_key": 1}
    got = read_back(s)
    assert sorted(got) == ["x_1", "x_1-2"] and got["x_1"]["json"] == {"id": "x.1", "path": "a.png"}


def test_shards_warns_of_samples_without_targets_and_gives_a_folder_targets(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, name in enumerate(("cat", "dog")):
        (src / f"{name}.png").write_bytes(image_bytes(seed=i))
        (src / f"{name}.txt").write_text(f"a {name}")
    (src / "dog.json").write_text(json.dumps({"target_prompts": ["a wolf"]}))
    res = CliRunner().invoke(app, ["shards", str(src), str(tmp_path / "a"), "--no-progress"])
    assert res.exit_code == 0 and "warning: 1 of 2 sample(s) have no target prompts" in res.output, res.output
    assert "--target-template" in res.output
    s = make_shards(str(src), str(tmp_path / "b"), targets=["a photo at night"],
                    target_templates=["{source}, in the snow"], progress=False)
    got = read_back(s)
    assert got["cat"]["json"]["target_prompts"] == ["a photo at night", "a cat, in the snow"]
    assert got["dog"]["json"]["target_prompts"] == ["a wolf", "a photo at night", "a dog, in the snow"]
    assert s.untargeted == 0 and not any("no target prompts" in line for line in summary_lines(s))
    with pytest.raises(IngestError, match=r"--target-template: '\{source!r\}' is not a valid template"):
        make_shards(str(src), str(tmp_path / "c"), target_templates=["{source!r}"], progress=False)
    s = make_shards(str(src), str(tmp_path / "d"), target_templates=["a {label}"], progress=False)
    assert s.written == 0 and kinds(s) == {"template_field": 2}
    assert "no field 'label'" in s.skipped[0][1]


LONG = "a photo of " + " and ".join(f"a small red house number {i}" for i in range(20))  # well over 77 tokens


def test_long_prompts_are_truncated_and_marked_unless_the_job_says_no(tmp_path, capfd):
    """input.truncate_prompts (default true, as diffusers): a prompt over
    input.max_prompt_tokens is cut by the text encoder and each row of the
    sample says meta.truncated_prompt; false keeps the error row. The
    tokenizer's "indexing errors" warning is not shown."""
    from pipeline.data import write_shards
    from pipeline.executor import run_job
    from pipeline.store import OutputStore

    shard = write_shards([{"__key__": "long", "png": image_bytes(seed=1), "json": {"source_prompt": "a house",
                                                                                   "target_prompts": [LONG]}},
                          {"__key__": "short", "png": image_bytes(seed=2), "json": {"source_prompt": "a house",
                                                                                    "target_prompts": ["a barn"]}}],
                         str(tmp_path / "s.tar"))
    spec = tiny_job(tmp_path, [shard], "out")
    report = run_job(spec, progress=False)
    assert not report.failed and report.errors == 0
    rows = {r["key"]: r for r in OutputStore.open(spec.output.path).read_table("results").to_pylist()}
    assert rows["long"]["status"] == "ok" and rows["long"]["target_prompt"] == LONG
    assert json.loads(rows["long"]["meta"]) == {"truncated_prompt": True}
    assert json.loads(rows["short"]["meta"] or "{}") == {}
    assert "indexing errors" not in "".join(capfd.readouterr())

    strict = tiny_job(tmp_path, [shard], "strict", truncate_prompts=False)
    assert strict.hash() != spec.hash()
    report = run_job(strict, progress=False)
    assert report.errors == 1 and dict(report.error_types) == {"prompt_too_long": 1}


def test_source_in_a_target_template_with_the_empty_source_prompt_is_an_error_row():
    """input.source_prompt = "" and a target template "{source} in the snow"
    would edit towards "in the snow": an error row saying why instead."""
    s = decode({"txt": "a cat"}, source_prompt="", templates=["{source} in the snow"])
    assert s.error_type == "template_field" and "source prompt is empty" in s.error, s.error
    s = decode({"json": {"label": "cat"}}, source_prompt="", templates=["a {label} in the snow"])  # the way to do it
    assert not s.error and s.target_prompts == ["a cat in the snow"]


def test_source_prompt_in_a_template_is_refused_by_name():
    from pipeline.data import SampleError, TemplateFields, render_templates
    from pipeline.spec import SpecError, load_spec

    for field in ("input.templates", "input.source_prompt"):
        value = '["{source_prompt}, at night"]' if field == "input.templates" else '"{source_prompt}"'
        with pytest.raises(SpecError, match=r"\{source_prompt\} is not a template field: \{source\} is the source prompt"):
            load_spec(raw={"input": {"shards": ["a.tar"], "templates": ["x"]}}, overrides=[f"{field}={value}"])
    with pytest.raises(SampleError, match=r"\{source\} is the source prompt"):
        render_templates(["{source_prompt}"], TemplateFields({"label": "cat"}, "a cat"))
