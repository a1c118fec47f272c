"""The batch pipeline end to end on the tiny model: inline and through Ray,
bad samples next to good ones, resume, crash recovery, determinism, and the
job-level error paths."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from helpers_data import bad_samples, good_samples, write
from pipeline.data import shard_name
from pipeline.executor import JobError, run_job
from pipeline.spec import SpecError, load_spec
from pipeline.store import OutputStore

STEPS, SKIP, SEEDS = 6, 2, 2
# even samples carry a json target (plus the template): 2 targets; odd ones a txt caption: 1
N_EDITS = sum((2 if i % 2 == 0 else 1) * SEEDS for i in range(6))


def job(tmp_path, shards, out="out", **sections):
    raw = {
        # bad_samples' long prompt is an error row only when truncation is off (it is on by default)
        "input": {"shards": [str(s) for s in shards], "templates": ["{source}, oil painting"], "truncate_prompts": False},
        "model": {"id": "tiny"},
        "inversion": {"steps": STEPS, "skip": SKIP},
        "edit": {"seeds": SEEDS},
        "batch": {"images": 2},
        "output": {"path": str(tmp_path / out), "noise": True, "image_format": "png"},
        "score": {"clip_model": "imprint-tiny-clip", "clip_pretrained": "none", "lpips_net": "squeeze",
                  "lpips_pretrained": False},
        "run": {"executor": "inline", "seed": 7, "threads": 2},
    }
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return load_spec(raw=raw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    bad = list(bad_samples().values())
    goods = good_samples("g", 6)
    a = write(d / "part-000.tar", goods[:3])
    b = write(d / "part-001.tar", [goods[3], bad[0], bad[1], goods[4], *bad[2:], goods[5]])
    return [a, b]


def spec_hash(path):
    return load_spec(path).hash()


def rows(out, table):
    return OutputStore.open(str(out)).read_table(table).to_pylist()


def edit_key(r):
    return (r["key"], r["target_index"], r["seed_index"])


@pytest.fixture(scope="module")
def inline_run(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inline")
    spec = job(tmp, shards)
    report = run_job(spec, progress=False)
    return spec, report, tmp / "out"


def test_inline_end_to_end_with_bad_samples(inline_run):
    spec, report, out = inline_run
    assert report.done == 2 and not report.failed
    src = rows(out, "sources")
    ok = {r["key"] for r in src if r["status"] == "ok"}
    errors = {r["key"]: r["error"] for r in src if r["status"] == "error"}
    assert ok == {f"g{i:03d}" for i in range(6)}
    assert set(errors) == set(bad_samples())
    assert all(errors.values())
    res = rows(out, "results")
    # (sample's own targets + the template) x N seeds per good image, once each
    assert len(res) == N_EDITS
    assert len({edit_key(r) for r in res}) == len(res)
    for r in res:
        assert r["image"]["bytes"].startswith(b"\x89PNG") and r["method"] == "edit-friendly"
        assert json.loads(r["params"])["eta"] == 1.0 and r["num_steps"] == STEPS and r["skip"] == SKIP
        assert r["time_edit_s"] > 0 and r["time_invert_s"] > 0
        for col in ("clip_text", "clip_direction", "clip_image", "lpips", "diversity"):
            assert r[col] is not None and r[col] == r[col], col
    # exact reconstruction of every inversion, recorded per source
    assert all(r["recon_error_max"] < 1e-4 for r in src if r["status"] == "ok")
    # noise codes: one per (image, seed), float16, the minimal steps
    noise = rows(out, "noise")
    assert len(noise) == 6 * SEEDS
    assert noise[0]["zs_shape"][0] == STEPS - SKIP and noise[0]["dtype"] == "float16"
    meta = pq.read_schema(OutputStore.open(str(out)).table_files("results")[0]).metadata
    assert meta[b"imprint.schema_version"] == b"2"
    assert meta[b"imprint.model_random_weights"] == b"true"
    assert b"not meaningful" in meta[b"imprint.note"]


def test_outputs_readable_by_pandas_and_duckdb(inline_run):
    import duckdb
    import pandas as pd

    _, _, out = inline_run
    df = pd.read_parquet(out / "results")
    assert len(df) == N_EDITS
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/results/*.parquet') WHERE status = 'ok'").fetchall()[0][0]
    assert n == int(df["kept"].sum())
    errs = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/sources/*.parquet') WHERE status='error'").fetchall()[0][0]
    assert errs == len(bad_samples())


def test_resume_skips_completed_shards(inline_run):
    spec, first, out = inline_run
    again = run_job(spec, progress=False)
    assert again.skipped == 2 and again.done == 0 and again.unet_calls == 0


def test_determinism_same_bytes(inline_run, shards, tmp_path):
    spec, _, out = inline_run
    second = job(tmp_path, shards)
    run_job(second, progress=False)
    a = {edit_key(r): r["image"]["bytes"] for r in rows(out, "results")}
    b = {edit_key(r): r["image"]["bytes"] for r in rows(tmp_path / "out", "results")}
    assert a == b


def test_seeds_do_not_depend_on_batching(inline_run, shards, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    _, _, out = inline_run
    other = job(tmp_path, shards[:1], batch={"images": 1})
    run_job(other, progress=False)
    a = {edit_key(r): r for r in rows(out, "results")}
    for r in rows(tmp_path / "out", "results"):
        ref = a[edit_key(r)]
        assert r["seed"] == ref["seed"]
        x = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])), dtype=float)
        y = np.asarray(Image.open(io.BytesIO(ref["image"]["bytes"])), dtype=float)
        assert np.abs(x - y).max() <= 2  # same code; batch size only changes float rounding


def test_status_command(inline_run):
    _, _, out = inline_run
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out), "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["total"] == 2 and len(st["done"]) == 2 and not st["left"] and st["errors"] == len(bad_samples())
    # bad samples counted per kind (Sample.error_type; "other" where none is set)
    assert sum(st["error_types"].values()) == st["errors"]
    stats = [json.loads(p.read_text()) for p in sorted((out / "_stats").glob("*.json"))]
    assert len(stats) == 2 and sum(sum(x["error_types"].values()) for x in stats) == st["errors"]
    assert all(x["samples"] == x["images"] + x["errors"] and x["host"] for x in stats)
    markers = [json.loads(p.read_text()) for p in sorted((out / "_done").glob("*.json"))]
    assert all(m["host"] and m["pid"] and m["node_id"] is None for m in markers)  # inline: no Ray node


def test_crash_mid_shard_then_rerun_gives_every_row_once(shards, tmp_path):
    spec_path = tmp_path / "job.toml"
    from pipeline.spec import to_toml

    spec_path.write_text(to_toml(job(tmp_path, shards)))
    # The first run's worker kills its process after 5 samples (the second
    # shard's second); the rerun is the plain CLI.
    crash = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
             "from helpers_fault import crashing_worker; from pipeline.executor import run_job; "
             "from pipeline.spec import load_spec; "
             f"run_job(load_spec({str(spec_path)!r}), executor='inline', progress=False, "
             f"worker_cls=crashing_worker(5, {str(tmp_path / 'fired')!r}))")
    crashed = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    store = OutputStore.open(str(tmp_path / "out"))
    assert len(store.done_shards(spec_hash(spec_path))) == 1  # first shard committed, second died mid-way
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(spec_path), "--executor", "inline", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 already done" in done.stdout
    res = rows(tmp_path / "out", "results")
    assert len(res) == N_EDITS and len({edit_key(r) for r in res}) == N_EDITS


def test_job_errors_stop_before_work(shards, tmp_path):
    with pytest.raises(SpecError, match=r"^edit.seeds: must be in"):
        job(tmp_path, shards, edit={"seeds": 0})
    with pytest.raises(SpecError, match=r"^inversion.skip"):
        job(tmp_path, shards, inversion={"skip": 6})
    with pytest.raises(SpecError, match=r"^inversion.method: unknown method 'magic'"):
        job(tmp_path, shards, inversion={"method": "magic"})
    with pytest.raises(SpecError, match=r"^inversion.params.gamma: not a parameter"):
        job(tmp_path, shards, inversion={"params": {"gamma": 1}})
    with pytest.raises(SpecError, match=r"^output.image_format"):
        job(tmp_path, shards, output={"image_format": "gif"})
    with pytest.raises(SpecError, match=r"^edit.bogus: unknown field"):
        job(tmp_path, shards, edit={"bogus": 1})
    with pytest.raises(SpecError, match=r"^batch.images: expected an integer"):
        job(tmp_path, shards, batch={"images": "four"})
    with pytest.raises(JobError, match=r"shard not found: .*nope-000.tar \(and 1 more\)"):
        run_job(job(tmp_path, [*shards, tmp_path / "nope-{000..001}.tar"]), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JobError, match="not writable"):
        run_job(job(tmp_path, shards, out="file/out"), progress=False)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_cli_bad_spec_one_message_nonzero(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[input]\nshards = ["x.tar"]\n[edit]\nseeds = -1\n')
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(p)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["imprint: error: edit.seeds: must be in [1, 1024]"]


def test_set_overrides_and_spec_written(shards, tmp_path):
    spec = load_spec(raw=job(tmp_path, shards).to_dict() | {"filter": {}}, overrides=["edit.seeds=3", "model.id=tiny", "input.templates=['a', 'b']"])
    assert spec.edit.seeds == 3 and spec.input.templates == ["a", "b"]
    with pytest.raises(SpecError, match="KEY=VALUE"):
        load_spec(raw={"input": {"shards": ["x"]}}, overrides=["edit.seeds"])


def test_other_spec_in_same_output_is_refused(inline_run, shards):
    spec, _, out = inline_run
    other = job(out.parent, shards, edit={"cfg_target": 9.0})
    with pytest.raises(JobError, match="another job spec"):
        run_job(other, progress=False)


# ---------------------------------------------------------------------------
# Through Ray
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    tmp = f"/tmp/imprint-ray-{os.getpid()}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="warning",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_ray_equals_inline_and_survives_a_killed_worker(ray_cluster, inline_run, shards, tmp_path):
    import ray.cloudpickle

    import helpers_fault

    _, _, inline_out = inline_run
    # A worker process dies after 4 samples (the first of its second shard);
    # the driver replaces it and requeues that shard. The crashing class
    # travels to the actors by value.
    ray.cloudpickle.register_pickle_by_value(helpers_fault)
    spec = job(tmp_path, shards, run={"executor": "ray", "max_workers": 1})
    report = run_job(spec, progress=False, worker_cls=helpers_fault.crashing_worker(4, str(tmp_path / "fired")))
    assert (tmp_path / "fired").exists(), "the fault was never injected"
    assert report.done == 2 and not report.failed
    a = {edit_key(r): r["image"]["bytes"] for r in rows(inline_out, "results")}
    b = {edit_key(r): r["image"]["bytes"] for r in rows(tmp_path / "out", "results")}
    assert a == b  # every row exactly once, same bytes as inline
    assert len(rows(tmp_path / "out", "results")) == len(a)


def test_unreadable_shard_fails_after_its_attempts_and_the_job_goes_on(shards, tmp_path):
    junk = tmp_path / "junk-000.tar"
    junk.write_bytes(os.urandom(4096))
    spec = job(tmp_path, [shards[0], junk], run={"max_attempts": 2}, score={"enabled": False})
    report = run_job(spec, progress=False)
    assert report.done == 1 and list(report.failed) == [str(junk)]
    assert "cannot read shard" in report.failed[str(junk)]
    failed = OutputStore.open(str(tmp_path / "out")).markers("_failed")
    (info,) = failed.values()
    assert info["attempts"] == 2 and "cannot read shard" in info["error"]
    # the exception's type, message and where it was raised, not just a word
    assert info["type"] and info["message"] in info["error"] and info["traceback"]
    assert any(line.lstrip().startswith("File ") for line in info["traceback"]), info["traceback"]
    assert info["traceback"][-1].startswith(info["type"])
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "out")], capture_output=True, text=True)
    assert "1 failed" in res.stdout and "cannot read shard" in res.stdout
    assert info["traceback"][-1] in res.stdout  # the traceback's last lines too


def test_filters_keep_top_k_and_recon_psnr(shards, tmp_path):
    spec = job(tmp_path, shards[:1], filter={"keep_top_k": 1, "top_k_by": "clip_text"}, score={"recon_psnr": True})
    run_job(spec, progress=False)
    res = rows(tmp_path / "out", "results")
    groups = {}
    for r in res:
        groups.setdefault((r["key"], r["target_index"]), []).append(r)
    for members in groups.values():
        kept = [r for r in members if r["kept"]]
        assert len(kept) == 1 and kept[0]["clip_text"] == max(r["clip_text"] for r in members)
        for r in members:
            assert (r["image"] is not None) == r["kept"] and r["status"] == ("ok" if r["kept"] else "rejected")
    src = rows(tmp_path / "out", "sources")
    assert all(s["num_kept"] == len({k for k in groups if k[0] == s["key"]}) for s in src)
    assert all(s["recon_psnr"] is not None and 0 < s["recon_psnr"] < 100 for s in src)


def test_output_to_a_non_local_filesystem(shards, tmp_path):
    # fsspec's in-memory filesystem through pyarrow's adapter: the same code
    # path as s3:// or gs:// (no local paths, move-then-marker commits).
    import fsspec

    url = f"memory://imprint-test-{os.getpid()}/out"
    spec = job(tmp_path, shards[:1], score={"enabled": False})
    spec.output.path = url
    report = run_job(spec, progress=False)
    assert report.done == 1
    store = OutputStore.open(url)
    res = store.read_table("results").to_pylist()
    assert len(res) == sum(2 * SEEDS if i % 2 == 0 else SEEDS for i in range(3))
    assert store.done_shards(spec.hash()) == {shard_name(shards[0])} and store.read_json("job.json")["spec_hash"] == spec.hash()
    mem = fsspec.filesystem("memory")
    leftovers = [p for p in mem.find(f"/imprint-test-{os.getpid()}") if "/.tmp-" in p or "/_tmp/" in p]
    assert leftovers == []
    assert run_job(spec, progress=False).skipped == 1  # resume works there too


def test_reader_thread_ends_when_a_shard_fails_mid_way(shards, tmp_path, monkeypatch):
    import threading

    from pipeline.worker import ShardWorker

    spec = job(tmp_path, shards[1:], batch={"prefetch": 1, "images": 1}, score={"enabled": False})
    worker = ShardWorker(spec)
    monkeypatch.setattr(worker, "_run_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("model failed")))
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="model failed"):
        worker.process(shards[1])
    assert threading.active_count() == before  # the reader did not stay blocked on its queue
