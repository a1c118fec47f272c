"""`imprint edit-codes` on a tampered noise/ file: every bad code row becomes
an error row for its sample and the good codes of the same file are edited."""

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers_data import good_samples, write
from pipeline.executor import run_job
from pipeline.spec import load_spec
from pipeline.store import OutputStore
from pipeline.tables import table_from_rows


def tamper_cases(row):
    """case name -> (function changing a copy of a good code row, expected message part)."""
    nan16 = np.full(len(row["zs"]) // 2, np.nan, np.float16).tobytes()
    inf16 = np.full(len(row["x_start"]) // 2, np.inf, np.float16).tobytes()
    c, h, w = row["x_start_shape"]

    def params(**kw):
        return json.dumps({**json.loads(row["params"]), **kw})

    return {
        "grid": (lambda r: r.update(x_start_shape=[c, h * 2, w // 2]), "latent grid"),
        "grid_size": (lambda r: r.update(width=r["width"] * 2), "latent grid"),
        "method": (lambda r: r.update(method="magic"), "unknown method"),
        "params_list": (lambda r: r.update(params="[1, 2]"), "params must be a JSON object"),
        "params_junk": (lambda r: r.update(params="{not json"), "params are not JSON"),
        "eta_zero": (lambda r: r.update(params=params(eta=0)), "eta"),
        "steps": (lambda r: r.update(num_steps=5000), "num_steps 5000"),
        "timesteps": (lambda r: r.update(timesteps=[t + 1 for t in r["timesteps"]]), "timesteps do not match"),
        "null_width": (lambda r: r.update(width=None), "width"),
        "nan_maps": (lambda r: r.update(zs=nan16), "NaN or infinite"),
        "inf_start": (lambda r: r.update(x_start=inf16), "NaN or infinite"),
        "short_maps": (lambda r: r.update(zs=r["zs"][:-2]), "bytes"),
        "skip": (lambda r: r.update(skip=99), "skip"),
        "model": (lambda r: r.update(model_id="someone/else"), "made with model"),
    }


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    d = tmp_path_factory.mktemp("codes")
    shard = write(d / "s.tar", good_samples(n=2))
    common = {"model": {"id": "tiny"}, "inversion": {"steps": 3, "skip": 1}, "edit": {"seeds": 2},
              "score": {"enabled": False}, "run": {"executor": "inline", "threads": 2, "max_attempts": 1},
              "output": {"image_format": "png"}}
    spec = load_spec(raw={**common, "input": {"shards": [shard], "templates": ["{source}"]},
                          "output": {**common["output"], "path": str(d / "first"), "noise": True}})
    assert run_job(spec, progress=False).done == 1
    rows = OutputStore.open(str(d / "first")).read_table("noise").to_pylist()
    assert len(rows) == 4
    good = [r for r in rows if r["key"] == "g000"]
    out_rows = list(rows)
    cases = tamper_cases(good[0])
    for name, (change, _) in cases.items():
        for r in good:
            bad = copy.deepcopy(r)
            bad["key"] = f"bad_{name}"
            change(bad)
            out_rows.append(bad)
    (d / "codes" / "noise").mkdir(parents=True)
    pq.write_table(table_from_rows("noise", out_rows, {}), d / "codes" / "noise" / "part-000.parquet")
    edit = load_spec(raw={**common, "input": {"codes": str(d / "codes"), "templates": ["{source}, at night"]},
                          "output": {**common["output"], "path": str(d / "edited")}})
    report = run_job(edit, progress=False)
    return report, OutputStore.open(str(d / "edited")), cases


def test_bad_code_rows_are_error_rows_and_good_codes_are_edited(tampered):
    report, store, cases = tampered
    assert report.done == 1 and not report.failed
    sources = {r["key"]: r for r in store.read_table("sources").to_pylist()}
    assert sources["g000"]["status"] == "ok" and sources["g001"]["status"] == "ok"
    for name, (_, message) in cases.items():
        row = sources[f"bad_{name}"]
        assert row["status"] == "error" and message in row["error"], (name, row["error"])
    results = store.read_table("results").to_pylist()
    assert {r["key"] for r in results} == {"g000", "g001"} and len(results) == 4
