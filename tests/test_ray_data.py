"""Ray Data interop (pipeline/ray_data.py): a WebDataset shard read with
`ray.data.read_webdataset` and edited by `ImprintEdits` on an actor pool of a
local Ray cluster gives the edits `imprint run` writes for the same job
(same seeds, same bytes), bad rows as error rows. Tiny model, CPU."""

import json
import tempfile

import pytest

from helpers_data import image_bytes
from pipeline.data import write_shards

JOB = {"input": {"templates": ["{source}, oil painting"]}, "model": {"id": "tiny"},
       "inversion": {"steps": 3, "skip": 1}, "edit": {"seeds": 2}, "batch": {"images": 2},
       "output": {"image_format": "png"},
       "score": {"clip_model": "toy-clip", "clip_pretrained": "random", "lpips_pretrained": False},
       "run": {"executor": "inline", "seed": 5, "threads": 1}}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    tmp = tempfile.mkdtemp(prefix="imprint-rd-", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=tmp, logging_level="warning",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow  # 55 s here (a local cluster's start, an actor loading the model and scorers): make test-slow
def test_read_webdataset_then_imprint_edits_equals_imprint_run(ray_cluster, tmp_path):
    from pipeline.executor import run_job
    from pipeline.ray_data import OUTPUT_COLUMNS, edit_dataset
    from pipeline.spec import load_spec
    from pipeline.store import OutputStore

    samples = [{"__key__": f"k{i}", "png": image_bytes(size=(96, 80), seed=i),
                "json": {"source_prompt": f"a photo {i}", "url": f"https://example.com/{i}.png"}} for i in range(2)]
    samples.append({"__key__": "junk", "png": b"not an image", "json": {"source_prompt": "x"}})
    shard = write_shards(samples, str(tmp_path / "part-000.tar"))

    raw = json.loads(json.dumps(JOB))
    raw["input"]["shards"] = [shard]
    raw["output"]["path"] = str(tmp_path / "out")
    report = run_job(load_spec(raw=raw), progress=False)
    assert not report.failed and report.errors == 1
    want = {(r["key"], r["target_index"], r["seed_index"]): r
            for r in OutputStore.open(str(tmp_path / "out")).read_table("results").to_pylist()}

    ds = ray_cluster.data.read_webdataset(shard, decoder=None)
    got = edit_dataset(ds, JOB, concurrency=1, batch_size=4).take_all()
    assert set(got[0]) == set(OUTPUT_COLUMNS)
    errors = [r for r in got if r["error"]]
    assert [(r["key"], r["error_type"]) for r in errors] == [("junk", "decode")]
    edits = {(r["key"], r["target_index"], r["seed_index"]): r for r in got if not r["error"]}
    assert set(edits) == set(want) and len(edits) == 2 * 2
    for k, r in edits.items():
        w = want[k]
        assert (r["seed"], r["target_prompt"], r["method"], r["width"], r["height"]) == (
            w["seed"], w["target_prompt"], w["method"], w["width"], w["height"])
        assert r["edit"] == w["image"]["bytes"]  # the same engine: the same edit, byte for byte
        assert r["clip_text"] == pytest.approx(w["clip_text"], abs=1e-5) and r["lpips"] == pytest.approx(w["lpips"], abs=1e-5)
        assert json.loads(r["meta"]) == {"url": f"https://example.com/{k[0][1]}.png"}
