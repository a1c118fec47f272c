import json
import pathlib
import tomllib

import jsonschema
import pytest

from pipeline.spec import job_json_schema
from pipeline.tables import TABLES, dump_schema_json

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(TABLES))
def test_checked_in_table_schemas_are_current(name):
    assert (ROOT / "schemas" / f"{name}.schema.json").read_text() == dump_schema_json(name), \
        "run `imprint schemas --write schemas/`"


def test_checked_in_job_schema_is_current():
    assert json.loads((ROOT / "schemas" / "job.schema.json").read_text()) == job_json_schema()


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_jobs_validate(job):
    from pipeline.spec import load_spec

    raw = tomllib.loads(job.read_text())
    jsonschema.validate(raw, job_json_schema())
    load_spec(job)


def test_job_schema_rejects_unknown_fields():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"edit": {"seedz": 2}}, job_json_schema())
