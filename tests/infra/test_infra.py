"""The deployment files in infra/: they parse, use only KubeRay/Kubernetes field names for their kind, and
their image and commands are the ones the Dockerfile builds and the CLI accepts.

No Kubernetes here: the field names are checked against the KubeRay v1 CRD types (ray-operator/apis/ray/v1:
RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec, RayCronJobSpec), the commands are parsed by the
real CLI, and the local scripts are run.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import typer.main
import yaml

from pipeline.cli import app
from pipeline.ops.schedule_export import DEFAULT_IMAGE, export_manifest, ray_cluster_spec
from pipeline.ops.schedule_state import Schedule

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"

# The example schedule the static manifests were exported from (infra/README.md shows the commands).
NIGHTLY = Schedule(name="nightly", cron="0 3 * * *", config="s3://maskdiet-data/configs/nightly.yaml")
NIGHTLY_STATE = "s3://maskdiet-data/maskdiet/schedules.json"

# KubeRay v1 CRD field names (json tags), by struct.
RAY_CLUSTER_SPEC = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_SPEC = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "suspend"}
WORKER_GROUP_SPEC = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "scaleStrategy",
    "numOfHosts", "suspend", "idleTimeoutSeconds",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy", "env", "envFrom",
    "securityContext", "version", "volumeMounts",
}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
RAY_JOB_SPEC = {
    "entrypoint", "runtimeEnvYAML", "metadata", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
    "rayClusterSpec", "clusterSelector", "submitterPodTemplate", "submitterConfig", "activeDeadlineSeconds",
    "backoffLimit", "deletionStrategy", "managedBy",
}  # fmt: skip
RAY_CRON_JOB_SPEC = {"schedule", "jobTemplate", "suspend", "timeZone"}
CRON_JOB_SPEC = {
    "schedule", "timeZone", "startingDeadlineSeconds", "concurrencyPolicy", "suspend", "jobTemplate",
    "successfulJobsHistoryLimit", "failedJobsHistoryLimit",
}  # fmt: skip


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _keys_within(
    obj: dict[str, Any], allowed: set[str], where: str, required: set[str] = frozenset()
) -> None:  # type: ignore[assignment]
    unknown = set(obj) - allowed
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)}"
    missing = set(required) - set(obj)
    assert not missing, f"{where}: missing {sorted(missing)}"


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    _keys_within(spec, RAY_CLUSTER_SPEC, where, {"headGroupSpec"})
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion must match the pinned Ray"
    assert spec["enableInTreeAutoscaling"] is True
    _keys_within(spec["autoscalerOptions"], AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    _keys_within(spec["authOptions"], AUTH_OPTIONS, f"{where}.authOptions")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    _keys_within(head, HEAD_GROUP_SPEC, f"{where}.headGroupSpec", {"template"})
    head_res = _containers(head["template"])[0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {}), "the head is a CPU node"
    groups = spec["workerGroupSpecs"]
    for g in groups:
        _keys_within(g, WORKER_GROUP_SPEC, f"{where}.workerGroupSpecs[{g.get('groupName')}]", {"groupName"})
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] > g["minReplicas"], "worker groups autoscale"
    gpu_groups = [
        g for g in groups if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"]
    ]
    assert gpu_groups, f"{where}: needs a GPU worker group"


def check_ray_job_spec(spec: dict[str, Any], where: str) -> None:
    _keys_within(spec, RAY_JOB_SPEC, where, {"entrypoint"})
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")


def _all_images() -> list[tuple[str, str]]:
    """(file, image) for every container image named in infra/."""
    found = []
    for path in sorted(INFRA.rglob("*.yaml")):
        for image in re.findall(r"^\s*(?:-\s*)?image:\s*(\S+)", path.read_text(), re.MULTILINE):
            found.append((path.name, image))
    return found


def _cli_accepts(argv: list[str]) -> None:
    """Parse `maskdiet ...` with the real CLI (no execution): unknown commands or options fail here."""
    assert argv[0] == "maskdiet"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["maskdiet"] == "pipeline.cli:main"
    command: Any = typer.main.get_command(app)
    args = argv[1:]
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        assert args[0] in command.commands, f"maskdiet has no command {args[0]!r}"
        command = command.commands[args[0]]
        args = args[1:]
    command.make_context(" ".join(argv[:2]), list(args))


# ---------------------------------------------------------------------------------------------- tests


def test_every_yaml_parses_and_names_a_kind() -> None:
    files = sorted(INFRA.rglob("*.yaml"))
    assert {p.name for p in files} >= {
        "raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "aws.yaml", "secrets.example.yaml",
    }  # fmt: skip
    for path in K8S.glob("*.yaml"):
        for doc in _docs(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path


def test_example_maskdiet_configs_load() -> None:
    """infra/configs/ holds maskdiet configs (not manifests): each loads as the CLI would load it."""
    from pipeline.core.config import load_config

    configs = sorted((INFRA / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(str(path))
        assert config.data.input, path
    gpu = load_config(str(INFRA / "configs" / "score-1m-gpu.yaml"))
    assert gpu.score.use_gpu and gpu.score.model == "resnet18" and gpu.ray.address == "auto"


def test_raycluster_has_cpu_head_and_autoscaled_gpu_workers() -> None:
    (doc,) = _docs(K8S / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(doc["spec"], "RayCluster")
    assert doc["spec"] == ray_cluster_spec()
    # The run-due CronJob reaches this cluster through KubeRay's head Service: <name>-head-svc.
    (cron,) = _docs(K8S / "cronjob.yaml")
    env = {e["name"]: e for e in _containers(cron["spec"]["jobTemplate"]["spec"]["template"])[0]["env"]}
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == f"http://{doc['metadata']['name']}-head-svc:8265"


def test_rayjob_and_raycronjob_run_maskdiet_run() -> None:
    (job,) = _docs(K8S / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_ray_job_spec(job["spec"], "RayJob")
    (cron,) = _docs(K8S / "raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    _keys_within(cron["spec"], RAY_CRON_JOB_SPEC, "RayCronJob", {"schedule", "jobTemplate"})
    check_ray_job_spec(cron["spec"]["jobTemplate"], "RayCronJob.jobTemplate")
    for spec in (job["spec"], cron["spec"]["jobTemplate"]):
        argv = shlex.split(spec["entrypoint"])
        assert argv[:2] == ["maskdiet", "run"] and "--previous" in argv
        _cli_accepts(argv)
    # The files are what `maskdiet schedule export` writes for the example schedule.
    assert [job] == list(yaml.safe_load_all(export_manifest(NIGHTLY, "rayjob")))
    assert [cron] == list(yaml.safe_load_all(export_manifest(NIGHTLY, "raycronjob")))


def test_k8s_cronjob_calls_run_due() -> None:
    (doc,) = _docs(K8S / "cronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    _keys_within(doc["spec"], CRON_JOB_SPEC, "CronJob", {"schedule", "jobTemplate"})
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = _containers(doc["spec"]["jobTemplate"]["spec"]["template"])
    assert container["command"][:3] == ["maskdiet", "schedule", "run-due"]
    _cli_accepts(container["command"])
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"  # never inline
    assert [doc] == list(yaml.safe_load_all(export_manifest(NIGHTLY, "k8s-cronjob", state_url=NIGHTLY_STATE)))


def test_images_match_the_dockerfile() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", dockerfile, re.MULTILINE)
    assert base and base.group(1).startswith(f"rayproject/ray:{ray.__version__}-py311")
    assert "FROM ${RAY_IMAGE}" in dockerfile
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [pattern.rstrip("*") for pattern in find["include"]]
    for package in packages:
        assert re.search(rf"^COPY .*\b{package} \./{package}$", dockerfile, re.MULTILINE), package
    assert re.search(r"^RUN pip install --no-cache-dir \. ", dockerfile, re.MULTILINE)
    readme = (INFRA / "README.md").read_text()
    assert f"docker build -f infra/Dockerfile -t {DEFAULT_IMAGE} ." in readme
    images = _all_images()
    assert len(images) >= 8
    assert {image for _, image in images} == {DEFAULT_IMAGE}, images
    launcher = yaml.safe_load((INFRA / "cluster-launcher" / "aws.yaml").read_text())
    assert launcher["docker"]["image"] == DEFAULT_IMAGE
    assert (
        launcher["provider"]["type"] == "aws"
        and launcher["head_node_type"] in launcher["available_node_types"]
    )
    assert all("RAY_AUTH_MODE=token ray start" in " ".join(launcher[k]) for k in ("head_start_ray_commands",))


def test_start_ray_head_uses_real_ray_start_flags() -> None:
    script = (INFRA / "local" / "start-ray-head.sh").read_text()
    subprocess.run(["bash", "-n", str(INFRA / "local" / "start-ray-head.sh")], check=True)
    help_text = subprocess.run(["ray", "start", "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"(--[a-z][a-z-]+)=", script))
    assert {"--include-dashboard", "--dashboard-port", "--port"} <= flags
    for flag in flags:
        assert flag in help_text, f"ray start has no {flag}"
    assert "--head" in script and 'exec ray start "${args[@]}" "$@"' in script


def test_start_s3_serves_s3(tmp_path: Path) -> None:
    """Run infra/local/start-s3.sh for real, make a bucket and an object through s3fs, stop it."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "S3_PORT": str(port)}
    proc = subprocess.Popen(
        ["bash", str(INFRA / "local" / "start-s3.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.3)
        fs = s3fs.S3FileSystem(
            key="local",
            secret="local",
            client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
            skip_instance_cache=True,
        )
        fs.mkdir("maskdiet-data")
        fs.pipe_file("maskdiet-data/hello.txt", b"hi")
        assert fs.cat_file("maskdiet-data/hello.txt") == b"hi"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.mark.parametrize("fmt", ["rayjob", "raycronjob"])
def test_export_ships_a_local_config_in_a_configmap(tmp_path: Path, fmt: str) -> None:
    config = tmp_path / "nightly.yaml"
    config.write_text("output: s3://maskdiet-data/out\n")
    local = Schedule(name="nightly", cron="0 3 * * *", config=str(config))
    config_map, job = yaml.safe_load_all(export_manifest(local, fmt))
    spec = job["spec"] if fmt == "rayjob" else job["spec"]["jobTemplate"]
    check_ray_job_spec(spec, fmt)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    mount = _containers({"spec": head})[0]["volumeMounts"][0]["mountPath"]
    assert spec["entrypoint"].endswith(f"--config {mount}/config.yaml")
    _cli_accepts(shlex.split(spec["entrypoint"]))
