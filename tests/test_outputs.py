"""Outputs at dataset scale: part files and the commit protocol (crashes at
every commit step, damaged parts, write errors), incremental datasets and
--force, reading while a job runs, Hugging Face `datasets` and the export.
Tiny model, few steps, scoring off: each job is a few seconds."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers_data import image_bytes, write
from pipeline.data import shard_name
from pipeline.executor import JobError, run_job
from pipeline.spec import load_spec, to_toml
from pipeline.store import DONE, FAILED, REPLACED, STAGING, OutputStore, OutputWriteError, committed_files, read_table

HERE = Path(__file__).resolve().parent
SEEDS = 2


def samples(prefix: str, n: int) -> list[dict]:
    """n samples; even ones carry a json with their own target and extra fields."""
    out = []
    for i in range(n):
        s = {"__key__": f"{prefix}{i:03d}", "png": image_bytes("RGB", (96 + 16 * (i % 2), 80), "PNG", seed=i)}
        if i % 2 == 0:
            s["json"] = {"source_prompt": f"photo {i}", "target_prompts": [f"painting {i}"],
                         "url": f"https://example.com/{prefix}{i}.png", "license": "cc-by"}
        else:
            s["txt"] = f"caption {i}"
        out.append(s)
    return out


def edits_of(n: int) -> int:
    return sum((2 if i % 2 == 0 else 1) * SEEDS for i in range(n))


def raw_job(out, shards, **sections) -> dict:
    raw = {
        "input": {"shards": [str(s) for s in shards], "templates": ["{source}, oil painting"]},
        "model": {"id": "tiny"},
        "inversion": {"steps": 4, "skip": 1},
        "edit": {"seeds": SEEDS},
        "batch": {"images": 2},
        "output": {"path": str(out), "noise": True, "image_format": "png"},
        "score": {"enabled": False},
        "run": {"executor": "inline", "seed": 3, "threads": 1},
    }
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return raw


def job(out, shards, **sections):
    return load_spec(raw=raw_job(out, shards, **sections))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return [write(d / "a-000.tar", samples("a", 3)), write(d / "b-001.tar", samples("b", 4)),
            write(d / "c-002.tar", samples("c", 2))]


@pytest.fixture(scope="module")
def done_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    spec = job(out, shards[:2])
    report = run_job(spec, progress=False)
    assert report.done == 2 and not report.failed
    return spec, out


def edit_keys(rows) -> list[tuple]:
    return sorted((r["shard"], r["key"], r["target_index"], r["seed_index"]) for r in rows)


def check_readers(out: Path, expected: int) -> None:
    """`results/*.parquet` through DuckDB, polars, pandas and pyarrow: exactly
    the expected rows, each once."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    glob = f"{out}/results/*.parquet"
    n, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT (shard, key, target_index, seed_index)) "
                             f"FROM read_parquet('{glob}')").fetchall()[0]
    assert n == distinct == expected
    assert pl.scan_parquet(glob).select(pl.len()).collect().item() == expected
    assert len(pd.read_parquet(out / "results")) == expected
    t = ds.dataset(out / "results", format="parquet").to_table(columns=["shard", "key", "target_index", "seed_index"])
    assert len(set(zip(*[t[c].to_pylist() for c in t.column_names]))) == t.num_rows == expected


def check_no_partial_files(out: Path) -> None:
    """Only complete Parquet parts under the table folders, never a temp name."""
    for table in ("results", "sources", "noise"):
        for p in (out / table).iterdir() if (out / table).is_dir() else []:
            assert p.suffix == ".parquet" and not p.name.startswith((".", "_")), p
            pq.read_metadata(p)  # a complete file (footer present)


# ---------------------------------------------------------------------------


def test_parts_markers_and_done_shards(done_run, shards):
    spec, out = done_run
    store = OutputStore.open(str(out))
    names = {shard_name(s) for s in shards[:2]}
    assert store.done_shards(spec.hash()) == names
    assert store.done_shards("0" * 16) == set()
    for marker in (out / DONE).iterdir():
        shard, h, _digest, _ = marker.name.rsplit(".", 3)
        assert shard in names and h == spec.hash()
        body = json.loads(marker.read_text())
        assert {f["path"].split("/")[0] for f in body["files"]} == {"results", "sources", "noise"}
        for f in body["files"]:
            data = (out / f["path"]).read_bytes()
            assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    assert not list((out / STAGING).iterdir())
    check_no_partial_files(out)


def test_done_shards_uses_listings_only(done_run, monkeypatch):
    spec, out = done_run
    store = OutputStore.open(str(out))
    calls = {"list": 0, "open": 0}
    real_list = OutputStore._list

    def counting_list(self, rel, recursive=False, **kw):
        calls["list"] += 1
        return real_list(self, rel, recursive, **kw)

    monkeypatch.setattr(OutputStore, "_list", counting_list)
    monkeypatch.setattr(OutputStore, "read_text", lambda *a: calls.__setitem__("open", calls["open"] + 1))
    assert len(store.done_shards(spec.hash())) == 2
    assert calls == {"list": 4, "open": 0}  # _done/ and the three table folders, whatever the shard count


def test_sources_hold_the_model_view_and_meta_is_carried(done_run):
    from PIL import Image

    _, out = done_run
    src = read_table(str(out), "sources").to_pylist()
    for s in src:
        img = Image.open(io.BytesIO(s["image"]["bytes"]))
        assert s["image_format"] == "png" and img.size == (s["width"], s["height"])
        assert (s["width"], s["height"]) != (s["orig_width"], s["orig_height"])  # resized/cropped to the model's geometry
    meta = {s["key"]: json.loads(s["meta"]) for s in src}
    assert meta["a000"] == {"url": "https://example.com/a0.png", "license": "cc-by"} and meta["a001"] == {}
    res = read_table(str(out), "results").to_pylist()
    assert {json.loads(r["meta"]).get("url") for r in res if r["key"] == "b002"} == {"https://example.com/b2.png"}
    # an edit is pixel-aligned with its stored source: same size
    sizes = {s["key"]: (s["width"], s["height"]) for s in src}
    assert all((r["width"], r["height"]) == sizes[r["key"]] for r in res)


@pytest.mark.parametrize("point", ["part-partial", "between-tables", "before-marker", "after-marker"])
def test_crash_at_each_commit_step_then_rerun_gives_every_row_once(point, shards, tmp_path):
    out = tmp_path / "out"
    spec_path = tmp_path / "job.toml"
    spec_path.write_text(to_toml(job(out, shards[:2])))
    res = subprocess.run([sys.executable, str(HERE / "crash_commit.py"), str(spec_path), point],
                         capture_output=True, text=True)
    assert res.returncode == 17, res.stderr[-2000:]
    # the frozen state a reader sees at the crash: complete files only, and
    # read_table gives the committed shards' rows only
    check_no_partial_files(out)
    committed = len(read_table(str(out), "results"))
    assert committed == edits_of(3)  # the first shard only
    if point == "part-partial":
        assert list((out / STAGING).iterdir())  # the staged half-file, outside every table folder
    if point == "before-marker":
        import duckdb  # the glob sees the uncommitted (complete) parts; read_table does not

        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/results/*.parquet')").fetchall()[0][0]
        assert n == edits_of(3) + edits_of(4) and committed == edits_of(3)
    report = run_job(load_spec(spec_path), progress=False)
    assert report.skipped == 1 and report.done == 1 and not report.failed
    assert not list((out / STAGING).iterdir())  # prepare swept the crashed attempt's leftovers
    check_no_partial_files(out)
    check_readers(out, edits_of(3) + edits_of(4))
    assert len(read_table(str(out), "results")) == edits_of(3) + edits_of(4)


def test_damaged_or_missing_part_makes_the_shard_redo(done_run, shards, tmp_path):
    spec, src_out = done_run
    out = tmp_path / "out"
    shutil.copytree(src_out, out)
    spec = job(out, shards[:2])
    a, b = (shard_name(s) for s in shards[:2])
    part = next((out / "results").glob(f"{a}.*.parquet"))
    part.write_bytes(part.read_bytes()[:-100])  # truncated
    store = OutputStore.open(str(out))
    assert store.done_shards(spec.hash()) == {b}
    report = run_job(spec, progress=False)
    assert report.done == 1 and report.skipped == 1
    next((out / "noise").glob(f"{b}.*.00000.parquet")).unlink()  # missing
    assert store.done_shards(spec.hash()) == {a}
    report = run_job(spec, progress=False)
    assert report.done == 1 and report.skipped == 1
    check_readers(out, edits_of(3) + edits_of(4))
    assert len(read_table(str(out), "noise")) == (3 + 4) * SEEDS


def test_spec_hash_covers_only_what_changes_a_row(shards, tmp_path):
    base = job(tmp_path / "o", shards[:1]).hash()
    same = [
        {"input": {"shards": [str(s) for s in shards]}}, {"batch": {"images": 7, "max_unet_batch": 3, "prefetch": 2}},
        {"model": {"compile": True, "device": "cpu"}}, {"score": {"batch_size": 3}},
        {"run": {"executor": "ray", "max_workers": 3, "threads": 2, "max_attempts": 5, "ray_address": "auto"}},
        {"output": {"path": str(tmp_path / "elsewhere")}},
    ]
    for change in same:
        assert job(tmp_path / "o", shards[:1], **change).hash() == base, change
    differ = [{"edit": {"seeds": 3}}, {"edit": {"cfg_target": 9.0}}, {"inversion": {"skip": 2}},
              {"run": {"seed": 4}}, {"input": {"templates": ["{source}, sketch"]}}, {"image": {"resolution": 64}},
              {"output": {"image_format": "webp"}}, {"output": {"noise": False}}, {"model": {"dtype": "float16"}},
              {"filter": {"write_rejected": True}}, {"score": {"recon_psnr": True}}]
    for change in differ:
        assert job(tmp_path / "o", shards[:1], **change).hash() != base, change


def test_adding_shards_processes_only_the_new_ones(done_run, shards, tmp_path):
    _, src_out = done_run
    out = tmp_path / "out"
    shutil.copytree(src_out, out)
    # poll the table folders while the job runs: complete Parquet files only
    import threading

    errors, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                check_no_partial_files(out)
            except FileNotFoundError:
                pass  # a part swept between listing and reading
            except Exception as exc:  # noqa: BLE001 - report any other failure
                errors.append(repr(exc))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        report = run_job(job(out, shards, batch={"images": 3}), progress=False)
    finally:
        stop.set()
        poller.join()
    assert errors == []
    assert report.skipped == 2 and report.done == 1 and report.total == 3
    check_readers(out, edits_of(3) + edits_of(4) + edits_of(2))


def test_force_moves_the_previous_spec_aside(done_run, shards, tmp_path):
    old_spec, src_out = done_run
    out = tmp_path / "out"
    shutil.copytree(src_out, out)
    new = job(out, shards[:1], edit={"seeds": 1})
    with pytest.raises(JobError, match="another job spec"):
        run_job(new, progress=False)
    report = run_job(new, force=True, progress=False)
    assert report.done == 1
    aside = out / REPLACED / old_spec.hash()
    assert len(list((aside / "results").glob("*.parquet"))) == 2 and len(list((aside / DONE).iterdir())) == 2
    res = pq.read_table(out / "results").to_pylist()  # the table holds the new spec's rows only
    assert len(res) == edits_of(3) // SEEDS and {r["seed_index"] for r in res} == {0}
    assert {pq.read_schema(p).metadata[b"imprint.spec_hash"] for p in (out / "results").iterdir()} == {new.hash().encode()}
    # --force again, twice, with the same spec: moved aside under new names each time
    run_job(new, force=True, progress=False)
    run_job(new, force=True, progress=False)
    for name in (new.hash(), f"{new.hash()}.2"):
        assert len(list((out / REPLACED / name / "results").glob("*.parquet"))) == 1, name
    check_readers(out, edits_of(3) // SEEDS)


def test_a_write_error_fails_that_shard_with_one_line_and_the_job_goes_on(shards, tmp_path, monkeypatch):
    from pipeline import store as store_mod

    real = store_mod.OutputStore.write_bytes
    bad = shard_name(shards[1])

    def write_bytes(self, rel, data):
        if rel.startswith("sources/") and rel.split("/")[1].startswith(bad):
            raise OutputWriteError(f"cannot write {self._p(rel)}: [Errno 28] No space left on device\n(detail)")
        real(self, rel, data)

    monkeypatch.setattr(store_mod.OutputStore, "write_bytes", write_bytes)
    out = tmp_path / "out"
    report = run_job(job(out, shards[:2], run={"max_attempts": 2}), progress=False)
    assert report.done == 1 and list(report.failed) == [shards[1]]
    reason = report.failed[shards[1]]
    assert "No space left on device" in reason and "\n" not in reason
    info = json.loads((out / FAILED / f"{bad}.json").read_text())
    assert info["error"] == reason and info["attempts"] == 2
    assert not [p for t in ("results", "sources", "noise") for p in (out / t).glob(f"{bad}.*")]  # nothing left of it
    check_readers(out, edits_of(3))

    # the output itself becomes unusable (not even a failure record can be
    # written): the job stops with one message
    def nothing_writes(self, rel, data):
        raise OutputWriteError(f"cannot write {self._p(rel)}: Permission denied")

    monkeypatch.setattr(store_mod.OutputStore, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(store_mod.OutputStore, "write_bytes", nothing_writes)
    with pytest.raises(JobError, match=r"no longer writable; shard .* failed: .*Permission denied"):
        run_job(job(tmp_path / "out2", shards[2:], run={"max_attempts": 1}), progress=False)


def test_writer_thread_errors_fail_the_shard_and_leave_no_thread(shards, tmp_path, monkeypatch):
    import threading

    from pipeline.worker import ShardWorker

    spec = job(tmp_path / "out", shards[1:2], batch={"images": 1, "prefetch": 1})
    worker = ShardWorker(spec)
    monkeypatch.setattr(worker, "_write_batch", lambda *a: (_ for _ in ()).throw(ValueError("encoder broke")))
    before = threading.active_count()
    with pytest.raises(ValueError, match="encoder broke"):
        worker.process(shards[1])
    assert threading.active_count() == before
    assert not list((tmp_path / "out" / "results").glob("*.parquet"))


def test_read_table_and_committed_files(done_run):
    import duckdb

    spec, out = done_run
    import pipeline

    assert pipeline.read_table(str(out), "results").num_rows == edits_of(3) + edits_of(4)
    files = committed_files(str(out), "results")
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet({files})").fetchall()[0][0] == edits_of(3) + edits_of(4)


def test_hugging_face_datasets_decodes_images(done_run, tmp_path):
    import datasets
    from PIL import Image

    _, out = done_run
    ds = datasets.load_dataset("parquet", data_files=committed_files(str(out), "results"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (ds[0]["width"], ds[0]["height"])
    src = datasets.load_dataset("parquet", data_files=committed_files(str(out), "sources"), split="train",
                                cache_dir=str(tmp_path / "hf"))
    assert isinstance(src[0]["image"], Image.Image)


def test_export_webdataset_and_files(done_run, tmp_path):
    import webdataset as wds
    from PIL import Image

    _, out = done_run
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), str(tmp_path / "wds"),
                          "--maxcount", "5"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    tars = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    assert len(tars) == -(-(edits_of(3) + edits_of(4)) // 5)
    got = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(got) == edits_of(3) + edits_of(4)
    for s in got:
        assert isinstance(s["edit.png"], Image.Image) and s["edit.png"].size == s["source.png"].size
        rec = s["json"]
        assert rec["target_prompt"] and rec["source_prompt"] and rec["method"] == "edit-friendly"
        assert rec["params"]["num_steps"] == 4 and isinstance(rec["seed"], int)
    assert {s["json"]["meta"].get("license") for s in got if s["json"]["key"] == "a000"} == {"cc-by"}

    # keys: the shard's file stem, the sample key, target, seed, method; no path
    keys = {s["__key__"] for s in got}
    assert len(keys) == len(got)
    assert all(k.split("_")[0] in ("a-000", "b-001") and str(tmp_path) not in k and len(k) < 60 for k in keys), keys

    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), str(tmp_path / "files"),
                          "--format", "files"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in (tmp_path / "files" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == edits_of(3) + edits_of(4)
    for rec in lines:
        assert Image.open(tmp_path / "files" / rec["file_name"]).size == Image.open(tmp_path / "files" / rec["source_file_name"]).size
    # a Hugging Face imagefolder with every field: the edit and its source as images, prompts, method, seed, ...
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "files"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(lines)
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["source"], datasets.Image)
    want = {"image", "source", "key", "shard", "source_prompt", "target_prompt", "target_index", "seed_index", "seed",
            "method", "params", "model_id", "width", "height", "meta"}
    assert want <= set(ds.column_names), set(ds.column_names)
    by_file = {r["file_name"]: r for r in lines}
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == row["source"].size == (row["width"], row["height"])
    assert row["target_prompt"] and row["source_prompt"] and row["method"] == "edit-friendly"
    assert json.loads(row["params"])["num_steps"] == 4 and isinstance(row["seed"], int)
    assert {(r["key"], r["target_prompt"], r["seed"]) for r in ds} == {(r["key"], r["target_prompt"], r["seed"]) for r in by_file.values()}
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), str(tmp_path / "x"),
                          "--format", "zip"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "imprint: error: --format: must be one of webdataset, files, got 'zip'"


class _Exported:
    """`imprint export` run in this process (no interpreter start): exit code, stdout, stderr."""

    def __init__(self, out, dest, *flags):
        from typer.testing import CliRunner

        from pipeline.cli import app

        res = CliRunner().invoke(app, ["export", str(out), str(dest), *flags])
        self.returncode, self.stdout, self.stderr = res.exit_code, res.stdout, res.stderr


_export = _Exported


def test_reexport_never_duplicates(done_run, tmp_path):
    """A second export into the same folder is refused (DEST must be empty);
    --overwrite replaces the folder whole: the old job's tars, images and
    stray files are gone and the edits read back exactly once."""
    import webdataset as wds

    _, out = done_run
    want = edits_of(3) + edits_of(4)
    dest = tmp_path / "wds"
    assert _export(out, dest, "--maxcount", "5").returncode == 0
    (dest / "edits-000099.tar").write_bytes(b"an older job's shard")
    before = sorted(p.name for p in dest.iterdir())
    again = _export(out, dest, "--maxcount", "50")
    assert again.returncode == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr, again.stderr
    assert sorted(p.name for p in dest.iterdir()) == before  # nothing touched
    res = _export(out, dest, "--maxcount", "50", "--overwrite")
    assert res.returncode == 0, res.stderr
    tars = sorted(str(p) for p in dest.glob("*.tar"))
    assert [os.path.basename(t) for t in tars] == ["edits-000000.tar"]
    assert f"({len(tars)} file(s))" in res.stdout
    assert len(list(wds.WebDataset(tars, shardshuffle=False))) == want
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    files = tmp_path / "files"
    assert _export(out, files, "--format", "files").returncode == 0
    (files / "edits" / "older_edit.png").write_bytes(b"x")
    (files / "sources" / "older_source.png").write_bytes(b"x")
    assert _export(out, files, "--format", "files", "--overwrite").returncode == 0
    lines = (files / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == want
    assert len(list((files / "edits").iterdir())) == want
    assert not (files / "edits" / "older_edit.png").exists() and not (files / "sources" / "older_source.png").exists()


def test_export_refuses_an_unfinished_output_unless_partial(done_run, tmp_path):
    _, out = done_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    marker = sorted((copy / DONE).iterdir())[0]
    marker.unlink()  # one shard of the job is now left to do
    res = _export(copy, tmp_path / "x")
    assert res.returncode == 2 and "unfinished" in res.stderr and "--partial" in res.stderr, res.stderr
    assert not (tmp_path / "x").exists()
    res = _export(copy, tmp_path / "y", "--partial")
    assert res.returncode == 0 and "partial export" in res.stderr, res.stderr
    assert 0 < int(res.stdout.split("exported ")[1].split()[0]) < edits_of(3) + edits_of(4)


def test_exported_json_is_strict(tmp_path):
    """A NaN score (a scorer that failed on one edit) is null in both formats, never a bare NaN."""
    from pipeline.export import _export_files, _export_webdataset

    rec = {"key": "k", "shard": "s", "source_prompt": "a", "target_prompt": "b", "target_index": 0, "seed_index": 0,
           "seed": 1, "method": "edit-friendly", "params": {"x": float("nan")}, "model_id": "tiny", "width": 8,
           "height": 8, "scores": {"clip_text": float("nan"), "lpips": 0.5}, "meta": {"v": float("inf")}}

    def edits():
        yield dict(rec), b"png", "png", b"src", "png"

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {text}"))

    import webdataset as wds

    (tmp_path / "w").mkdir()
    _export_webdataset(edits(), str(tmp_path / "w"), 10)
    got = next(iter(wds.WebDataset(str(tmp_path / "w" / "edits-000000.tar"), shardshuffle=False)))
    j = strict(got["json"].decode())
    assert j["scores"] == {"clip_text": None, "lpips": 0.5} and j["params"] == {"x": None} and j["meta"] == {"v": None}
    (tmp_path / "f").mkdir()
    _export_files(edits(), str(tmp_path / "f"))
    line = strict((tmp_path / "f" / "metadata.jsonl").read_text())
    assert line["clip_text"] is None and strict(line["params"]) == {"x": None}


def test_no_edits_write_no_empty_tar(tmp_path):
    from pipeline.export import _export_webdataset

    done = _export_webdataset(iter([]), str(tmp_path), 10)
    assert done == {"edits": 0, "files": []} and not list(tmp_path.iterdir())
