"""Cluster files checked without a cloud: the launcher YAML against Ray's own schema, the KubeRay
manifests against the fields the ray.io/v1 CRDs require, every job config through the config loader,
no secrets in any of them, and the job entrypoints' command lines."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
PAPER = REPO / "jobs" / "configs" / "ab_simclr_vit_s16_800m.yaml"
DATASET_CONFIGS = ["cc12m", "coco", "epic_kitchens", "imagenet"]

# Measured on the 2-core dev machine and one H100 (benchmarks/README.md: crop stage, GPU step):
CROP_IMAGES_PER_S_PER_CPU = 425.8 / 2  # crop stage, 224 px, M = 4 + 2 SimCLR views, 2 actors, 16 passes per execution
GPU_VIEWS_PER_S = 4234  # ViT-S/16 AB_SimCLR M = 4, bf16, batch 128 per H100


def crop_cpus_per_gpu(num_views: int = 4, annotation_views: int = 2) -> int:
    return math.ceil(GPU_VIEWS_PER_S / (num_views + annotation_views) / CROP_IMAGES_PER_S_PER_CPU)


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- Ray cluster launcher


def _ray_schema() -> dict:
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_yaml_passes_rays_schema_and_can_fail_it():
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema, config = _ray_schema(), _yaml(CLUSTER / "ray-cluster.yaml")
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs: defaults filled, then checked
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_train"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    del broken["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_node_groups_sizing_and_security():
    config = _yaml(CLUSTER / "ray-cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_workers = [n for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and cpu_workers, "a GPU worker group and a CPU ingest group"
    for t in types.values():
        assert t.get("min_workers", 0) <= t.get("max_workers", 0) <= config["max_workers"]
    # Each GPU node feeds its GPUs: training workers' CPUs + the crop stage's measured need per GPU.
    paper = load_config(PAPER)
    g = gpu[0]["resources"]
    assert (g["CPU"] - g["GPU"] * paper.train.cpus_per_worker) / g["GPU"] >= crop_cpus_per_gpu()
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any(dst.endswith("/.ray/auth_token") for dst in config["file_mounts"]), "the token must reach every node"


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    data = _yaml(CLUSTER / "runtime_env.yaml")
    env = RuntimeEnv(**data)
    assert env["working_dir"] == "." and "MLFLOW_TRACKING_URI" in env["env_vars"]
    with pytest.raises(Exception):
        RuntimeEnv(**{**data, "env_vars": {"X": 1}})  # Ray refuses non-string env values


# ---------------------------------------------------------------- KubeRay (ray.io/v1)

# The required fields and types of KubeRay's v1 CRDs (ray-operator/config/crd/bases at v1.7.0-rc), for
# the parts these manifests use; no cluster or CRD download is available here to validate against.
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {"name": {"type": "string"}, "image": {"type": "string"}},
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {
            "type": "object",
            "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}},
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["template"],
            "properties": {
                "rayStartParams": _START_PARAMS,
                "template": _POD_TEMPLATE,
                "serviceType": {"type": "string"},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                "properties": {
                    "groupName": {"type": "string"},
                    "replicas": {"type": "integer"},
                    "minReplicas": {"type": "integer"},
                    "maxReplicas": {"type": "integer"},
                    "rayStartParams": _START_PARAMS,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
_RAYJOB_SPEC = {
    "type": "object",
    "required": ["entrypoint", "rayClusterSpec"],
    "properties": {
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": _CLUSTER_SPEC,
    },
}
KUBERAY_SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": _METADATA, "spec": _CLUSTER_SPEC},
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": _METADATA, "spec": _RAYJOB_SPEC},
    },
    # ray.io_raycronjobs.yaml at v1.7.0 (alpha, feature gate RayCronJob): jobTemplate is a RayJob spec.
    "RayCronJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["jobTemplate", "schedule"],
                "properties": {
                    "jobTemplate": _RAYJOB_SPEC,
                    "schedule": {"type": "string"},
                    "timeZone": {"type": "string", "minLength": 1},
                    "suspend": {"type": "boolean"},
                },
            },
        },
    },
}


def _cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec of a RayCluster, RayJob or RayCronJob manifest."""
    spec = manifest["spec"].get("jobTemplate", manifest["spec"])
    return spec.get("rayClusterSpec", spec)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob-sweep.yaml"])
def test_kuberay_manifest_has_what_the_v1_crd_requires(name):
    manifest = _yaml(CLUSTER / "kuberay" / name)
    schema = KUBERAY_SCHEMAS[manifest["kind"]]
    jsonschema.validate(manifest, schema)
    spec = _cluster_spec(manifest)
    assert spec["authOptions"]["mode"] == "token"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    broken = copy.deepcopy(manifest)
    spec = _cluster_spec(broken)
    del spec["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    spec["headGroupSpec"]["rayStartParams"] = {"num-cpus": 0}  # KubeRay wants strings here
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# Every pod gets the production settings from the environment (docs/operations.md): the tracking
# server's address as a value, credentials only through secretKeyRef.
POD_SECRETS = {
    "AWS_ACCESS_KEY_ID": "abpipe-storage",
    "AWS_SECRET_ACCESS_KEY": "abpipe-storage",
    "AWS_ENDPOINT_URL": "abpipe-storage",
    "MLFLOW_TRACKING_USERNAME": "abpipe-mlflow",
    "MLFLOW_TRACKING_PASSWORD": "abpipe-mlflow",
}


def pod_env_findings(spec: dict) -> list[str]:
    """What is wrong with the env of every container of a RayCluster spec (empty: nothing)."""
    found = []
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if not str(env.get("MLFLOW_TRACKING_URI", {}).get("value", "")).startswith("http"):
                found.append(f"{name}: MLFLOW_TRACKING_URI is not a tracking server address")
            for var, secret in POD_SECRETS.items():
                ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
                if "value" in env.get(var, {}) or ref.get("name") != secret:
                    found.append(f"{name}: {var} must come from secretKeyRef {secret}")
    return found


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_pods_take_credentials_from_secrets_and_the_tracking_server_from_env(name):
    manifest = _yaml(CLUSTER / "kuberay" / name)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert pod_env_findings(spec) == []
    broken = copy.deepcopy(spec)
    env = broken["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "AWS_SECRET_ACCESS_KEY").update(value="inline", valueFrom={})
    assert pod_env_findings(broken) == ["gpu-train: AWS_SECRET_ACCESS_KEY must come from secretKeyRef abpipe-storage"]


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def test_kuberay_gpu_group_sizing_and_rayjob_cluster_match():
    cluster, job = _yaml(CLUSTER / "kuberay" / "raycluster.yaml"), _yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
        "rayjob.yaml must run the cluster raycluster.yaml describes"
    )
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    limits = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits["nvidia.com/gpu"]), _cpu(limits["cpu"])
    paper = load_config(PAPER)
    assert (cpus - gpus * paper.train.cpus_per_worker) / gpus >= crop_cpus_per_gpu()
    assert not any(
        "nvidia.com/gpu" in c["resources"]["limits"] for c in groups["cpu-ingest"]["template"]["spec"]["containers"]
    )
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/pretrain.py"] and (REPO / entry[3]).is_file()


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day-of-month month day-of-week


def cron_is_valid(expr: str) -> bool:
    """A standard 5-field cron expression: per field `*`, n, a-b, lists of those, each with an optional /step."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, _CRON_RANGES):
        for item in field.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", item)
            if not match:
                return False
            first, last, step = match.group(2), match.group(3), match.group(4)
            values = [int(v) for v in (first, last) if v is not None]
            if any(not lo <= v <= hi for v in values) or (len(values) == 2 and values[0] > values[1]) or step == "0":
                return False
    return True


def _without_shared_volume(spec: dict, volume: str) -> dict:
    """The cluster spec with the volume `volume` and its mounts taken out (empty lists dropped)."""
    spec = copy.deepcopy(spec)
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        for holder, key in [(pod, "volumes")] + [(c, "volumeMounts") for c in pod["containers"]]:
            kept = [v for v in holder.get(key, []) if v["name"] != volume]
            holder.update({key: kept}) if kept else holder.pop(key, None)
    return spec


def test_scheduled_sweep_raycronjob_runs_the_sweep_entrypoint():
    """cluster/kuberay/raycronjob-sweep.yaml: a valid schedule, raycluster.yaml's cluster plus the shared
    volume on every pod, and an entrypoint that `abpipe sweep` parses into a config whose task data and
    outputs lie on that volume."""
    from pipeline.cli import _load, build_parser

    cron, cluster = _yaml(CLUSTER / "kuberay" / "raycronjob-sweep.yaml"), _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    assert cron_is_valid(cron["spec"]["schedule"]) and cron["spec"].get("suspend") is False
    assert [cron_is_valid(e) for e in ("0 * * *", "61 * * * *", "*/0 * * * *", "5-1 * * * *", "0 3 * * 1-5")] == [
        False
    ] * 4 + [True]
    job = cron["spec"]["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True and 0 < job["activeDeadlineSeconds"] < 3600, (
        "one sweep per hour at most"
    )
    pods = [job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in job["rayClusterSpec"]["workerGroupSpecs"]
    ]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for pod in pods
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert len(set(claims)) == 1, claims
    volume = next(iter(claims))
    mounts = {
        m["mountPath"]
        for pod in pods
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] == volume
    }
    assert len(mounts) == 1 and all(
        any(m["name"] == volume for m in c.get("volumeMounts", [])) for pod in pods for c in pod["containers"]
    )
    assert _without_shared_volume(job["rayClusterSpec"], volume) == cluster["spec"], (
        "the cron job must run raycluster.yaml's cluster"
    )

    entry = job["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/sweep.py"] and (REPO / entry[3]).is_file()
    args, rest = build_parser().parse_known_args(["sweep", *entry[2:]])
    args.overrides += rest
    cfg = _load(args)  # what the job runs: unknown keys or bad values raise here
    mount = next(iter(mounts))
    assert cfg.sweep.experiments and cfg.eval.use_gpu and cfg.paths.root.startswith(mount + "/")
    assert cfg.eval.tasks and all(cfg.eval.task_roots[t].startswith(mount + "/") for t in cfg.eval.tasks)


# ---------------------------------------------------------------- job configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_job_config_loads(path):
    cfg = load_config(path).resolved()
    views_per_image = cfg.views.num_views + cfg.views.annotation_views
    assert cfg.train.total_views >= cfg.train.batch_size * cfg.train.num_workers * views_per_image


def _training_sections(path: Path) -> dict:
    cfg = load_config(path).to_dict()
    cfg["train"].pop("run_name")
    return {k: v for k, v in cfg.items() if k not in ("ingest",)}


def test_paper_configs_share_one_training_setting():
    paper = load_config(PAPER)
    assert (
        paper.model.encoder == "vit_small_patch16_224" and paper.views.view_size == 224 and paper.views.num_views == 4
    )
    assert paper.train.total_views == 800_000_000 and paper.train.max_failures > 0
    for name in DATASET_CONFIGS:
        assert _training_sections(REPO / "jobs" / "configs" / f"{name}.yaml") == _training_sections(PAPER), name
    ablation = _training_sections(REPO / "jobs" / "configs" / "ablation_400m.yaml")
    assert ablation["train"].pop("total_views") == 400_000_000
    reference = _training_sections(PAPER)
    reference["train"].pop("total_views")
    assert ablation == reference
    sources = {name: load_config(REPO / "jobs" / "configs" / f"{name}.yaml").ingest.source for name in DATASET_CONFIGS}
    assert sources == {"cc12m": "cc12m", "coco": "coco", "epic_kitchens": "epic_kitchens", "imagenet": "image_folder"}


# ---------------------------------------------------------------- secrets

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential)", re.I)
_SECRET_VALUE = re.compile(
    r"(AKIA[0-9A-Z]{16}|://[^/\s:@]+:[^/\s@]+@|-----BEGIN [A-Z ]*PRIVATE "
    r"KEY|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,})"
)
_NAMES_NOT_VALUES = {"secretName", "secretRef", "secretKeyRef", "valueFrom", "envFrom"}


def secret_findings(data, where: str = "") -> list[str]:
    """Literal values under secret-looking keys (or env entries), and values that look like credentials."""
    found = []
    if isinstance(data, dict):
        if isinstance(data.get("name"), str) and "value" in data and _SECRET_KEY.search(data["name"]):
            found.append(f"{where}.{data['name']}")  # k8s env entry with a literal value
        for key, value in data.items():
            path = f"{where}.{key}"
            is_path = isinstance(value, str) and value.startswith(("/", "~", "./"))
            if (
                isinstance(value, (str, int))
                and value != ""
                and _SECRET_KEY.search(str(key))
                and str(key) not in _NAMES_NOT_VALUES
                and not is_path
            ):
                found.append(path)
            found += secret_findings(value, path)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += secret_findings(value, f"{where}[{i}]")
    elif isinstance(data, str) and _SECRET_VALUE.search(data):
        found.append(where)
    return found


def _all_config_files() -> list[Path]:
    return CONFIGS + sorted(CLUSTER.rglob("*.yaml"))


def test_no_secrets_in_configs_or_manifests():
    planted = {
        "tracking": {"password": "hunter2"},
        "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}],
        "uri": "http://user:pw@mlflow:5000",
        "ok": {"secretName": "abpipe", "mode": "token", "/home/ray/.ray/auth_token": "~/.ray/auth_token"},
    }
    assert sorted(secret_findings(planted)) == [".env[0].AWS_SECRET_ACCESS_KEY", ".tracking.password", ".uri"]
    for path in _all_config_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert secret_findings(doc) == [], f"{path.relative_to(REPO)} holds a secret-looking value"
            embedded = doc.get("spec", {}).get("runtimeEnvYAML") if isinstance(doc, dict) else None
            if embedded:
                assert secret_findings(yaml.safe_load(embedded)) == [], f"{path.relative_to(REPO)}: runtimeEnvYAML"


# ---------------------------------------------------------------- entrypoints and defaults


@pytest.mark.parametrize(
    "job,command", [("ingest", "ingest"), ("pretrain", "train"), ("evaluate", "eval"), ("sweep", "sweep")]
)
def test_job_entrypoint_help(job, command):
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert f"jobs/{job}.py" in out.stdout and f"abpipe {command}" in out.stdout and "ray job submit" in out.stdout


def test_job_entrypoint_forwards_to_the_abpipe_config_system():
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "ingest.py"),
            "--config",
            str(REPO / "jobs" / "configs" / "tiny.yaml"),
            "ingest.no_such_key=1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",
    )
    assert out.returncode == 2 and "unknown config key 'ingest.no_such_key'" in out.stderr


def test_local_ray_is_loopback_by_default_and_warns_when_exposed_without_auth(monkeypatch, capsys):
    from pipeline.config import RayConfig
    from pipeline.runtime import is_loopback, warn_if_exposed

    assert RayConfig().dashboard is False and is_loopback(RayConfig().dashboard_host)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    warn_if_exposed("0.0.0.0")
    assert "anyone who can reach it can run code" in capsys.readouterr().out
    warn_if_exposed("127.0.0.1")
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- CPU-only crop nodes


def _start_resources(params: dict) -> dict:
    """KubeRay's rayStartParams.resources: a JSON object, quoted once more for `ray start`."""
    raw = params.get("resources", "")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def test_only_the_cpu_crop_nodes_carry_the_resource_crop_actors_ask_for():
    import dataclasses

    from pipeline.config import ConfigError
    from pipeline.data.crop_stage import crop_pool_size, placement

    views = load_config(PAPER, ["views.resources={crop_node: 0.01}"]).views
    assert placement(views) == {"resources": {"crop_node": 0.01}}
    groups = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]["workerGroupSpecs"]
    carrying = [g for g in groups if _start_resources(g["rayStartParams"]).get("crop_node", 0) >= 1]
    assert [g["groupName"] for g in carrying] == ["cpu-crop"]
    limits = carrying[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert _cpu(limits["cpu"]) >= 8 * crop_cpus_per_gpu(), "one crop pod feeds an 8-GPU pod"
    types = _yaml(CLUSTER / "ray-cluster.yaml")["available_node_types"]
    crop_types = [t for t in types.values() if t["resources"].get("crop_node", 0) >= 1]
    assert len(crop_types) == 1 and not crop_types[0]["resources"].get("GPU")
    assert crop_types[0]["resources"]["CPU"] >= 8 * crop_cpus_per_gpu()

    # Pool sizing from the nodes that carry it (ray.nodes() entries): GPU nodes' CPUs do not count.
    nodes = [
        {"Alive": True, "Resources": {"CPU": 192.0, "GPU": 8.0}, "Labels": {}},
        {"Alive": True, "Resources": {"CPU": 32.0, "crop_node": 1000.0}, "Labels": {"node-group": "crop"}},
        {"Alive": False, "Resources": {"CPU": 32.0, "crop_node": 1000.0}, "Labels": {"node-group": "crop"}},
    ]
    assert crop_pool_size(views, nodes) == 32
    assert crop_pool_size(dataclasses.replace(views, cpus_per_actor=2.0), nodes) == 16
    by_label = dataclasses.replace(views, resources={}, label_selector={"node-group": "crop"})
    assert crop_pool_size(by_label, nodes) == 32 and placement(by_label) == {"label_selector": {"node-group": "crop"}}
    assert crop_pool_size(dataclasses.replace(by_label, label_selector={"node-group": "!crop"}), nodes) == 192
    assert crop_pool_size(dataclasses.replace(by_label, label_selector={"node-group": "in(crop,cpu)"}), nodes) == 32
    assert crop_pool_size(dataclasses.replace(views, concurrency=5), nodes) == 5
    with pytest.raises(ConfigError, match=r"no alive node offers views\.resources=\{'crop_node': 0\.01\}"):
        crop_pool_size(views, nodes[:1])
