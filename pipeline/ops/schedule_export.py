"""Kubernetes manifests for a schedule: KubeRay `RayJob`/`RayCronJob`, or a plain `CronJob` running `run-due`.

This module only renders YAML from a stored `Schedule` (`schedule_state`); nothing here talks to a cluster.
Three shapes, because they trade different things (see `export_manifest`): one `RayJob` (a single run on its
own cluster); a `RayCronJob` (KubeRay's own cron makes such a RayJob per slot, without our skip/queue or
history); or a `CronJob` that runs `run-due` against a long-lived RayCluster, keeping our idempotent
submission ids, concurrency policy and history (`schedule_policy`).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline.ops.schedule_state import Schedule, ScheduleError

DEFAULT_IMAGE = "maskdiet:0.1.0"  # built by infra/Dockerfile; push it to your registry and pass --image
RAY_VERSION = "2.60.0"
CLUSTER_NAME = "maskdiet"  # KubeRay names the head Service <cluster>-head-svc
TOKEN_SECRET = "maskdiet-ray-token"  # Secret with key `auth_token`: the cluster's Ray token
S3_SECRET = "maskdiet-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL
CONFIG_MOUNT = "/etc/maskdiet"
EXPORT_FORMATS = ("raycronjob", "k8s-cronjob", "rayjob")


def _container(name: str, image: str, resources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "resources": resources,
        **extra,
    }


def ray_cluster_spec(image: str = DEFAULT_IMAGE, config_map: str | None = None) -> dict[str, Any]:
    """The RayCluster spec maskdiet runs on: a CPU head (runs the job driver, schedules, no GPU), an
    autoscaled GPU worker group for pretraining and scoring, and an autoscaled CPU group for decode.

    With `config_map`, the head mounts it at /etc/maskdiet (the job driver reads its config there).
    """
    head_extra: dict[str, Any] = {
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ]
    }
    head_spec: dict[str, Any] = {}
    if config_map:
        head_extra["volumeMounts"] = [
            {"name": "maskdiet-config", "mountPath": CONFIG_MOUNT, "readOnly": True}
        ]
        head_spec["volumes"] = [{"name": "maskdiet-config", "configMap": {"name": config_map}}]
    head = _container(
        "ray-head",
        image,
        {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
        **head_extra,
    )
    gpu = _container(
        "ray-worker",
        image,
        {
            "requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        },
    )
    cpu = _container(
        "ray-worker",
        image,
        {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "16Gi"}},
    )
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "authOptions": {"mode": "token", "secretName": TOKEN_SECRET},
        "headGroupSpec": {
            # num-cpus 0: the head schedules and runs job drivers; Ray Data and Train go to workers
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head], **head_spec}},
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 4,
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "containers": [gpu],
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                        ],
                    }
                },
            },
            {
                "groupName": "cpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 8,
                "rayStartParams": {},
                "template": {"spec": {"containers": [cpu]}},
            },
        ],
    }


def _config_ref(schedule: Schedule) -> tuple[str, dict[str, Any] | None]:
    """How the pod sees the config: a URL as is; a local file shipped in a ConfigMap (returned too)."""
    if "://" in schedule.config:
        return schedule.config, None
    text = Path(schedule.config).read_text()
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"maskdiet-{schedule.name}-config"},
        "data": {"config.yaml": text},
    }
    return f"{CONFIG_MOUNT}/config.yaml", config_map


def rayjob_spec(schedule: Schedule, image: str = DEFAULT_IMAGE) -> tuple[dict[str, Any], dict | None]:
    """A RayJob spec running the schedule's command on a fresh cluster that is deleted when it ends."""
    config, config_map = _config_ref(schedule)
    cluster = ray_cluster_spec(image, config_map["metadata"]["name"] if config_map else None)
    entrypoint = shlex.join([*schedule.command, "--config", config])
    spec = {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": 12 * 3600,
        "backoffLimit": 1,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": cluster,
    }
    return spec, config_map


def export_manifest(
    schedule: Schedule,
    fmt: str,
    *,
    image: str = DEFAULT_IMAGE,
    state_url: str | None = None,
    namespace: str | None = None,
) -> str:
    """The Kubernetes manifest(s) for the schedule, as multi-document YAML.

    - `rayjob`: one RayJob (a single run now; `kubectl create` it again for the next).
    - `raycronjob`: a RayCronJob (KubeRay >= 1.6, alpha, feature gate RayCronJob=true): KubeRay creates a RayJob
      (with its own cluster) on each cron slot. No skip/queue or history of ours: use k8s-cronjob for those.
    - `k8s-cronjob`: a plain CronJob that runs `maskdiet schedule run-due --only NAME` at each slot against a
      long-lived RayCluster (infra/k8s/raycluster.yaml): our idempotent ids, concurrency policy and history.
    """
    if fmt not in EXPORT_FORMATS:
        raise ScheduleError(f"unknown format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    meta: dict[str, Any] = {
        "name": f"maskdiet-{schedule.name}",
        "labels": {"app.kubernetes.io/name": "maskdiet"},
    }
    if namespace:
        meta["namespace"] = namespace
    if fmt == "k8s-cronjob":
        docs = [_k8s_cronjob(schedule, meta, image, state_url)]
    else:
        docs = _ray_jobs(schedule, meta, image, cron=fmt == "raycronjob")
    return yaml.safe_dump_all(docs, sort_keys=False)


def _ray_jobs(schedule: Schedule, meta: dict[str, Any], image: str, cron: bool) -> list[dict[str, Any]]:
    """A RayJob (one run now) or a RayCronJob (KubeRay creates a RayJob on each slot), after the ConfigMap
    that ships a local config file, when there is one."""
    spec, config_map = rayjob_spec(schedule, image)
    docs = [config_map] if config_map else []
    if cron:
        job = {"kind": "RayCronJob", "spec": {"schedule": schedule.cron, "jobTemplate": spec}}
    else:
        job = {"kind": "RayJob", "spec": spec}
    docs.append({"apiVersion": "ray.io/v1", "kind": job["kind"], "metadata": meta, "spec": job["spec"]})
    return docs


def _check_k8s_cronjob(schedule: Schedule, state_url: str | None) -> str:
    """What a CronJob's pod needs that a laptop does not: state and config in object storage, and no stored
    address (the in-cluster head service must win). Returns the state URL."""
    if not state_url or "://" not in state_url:
        raise ScheduleError(
            "a k8s-cronjob needs the schedule state in object storage (the pod has no disk that lasts): "
            "pass --state s3://bucket/maskdiet/schedules.json"
        )
    if schedule.address:
        raise ScheduleError(
            f"schedule {schedule.name} stores --address {schedule.address}, which would win over the "
            f"CronJob's in-cluster head service ({CLUSTER_NAME}-head-svc): add it again without --address"
        )
    if "://" not in schedule.config:
        raise ScheduleError(
            f"a k8s-cronjob's pod submits the schedule's config, and {schedule.config} is a local file it "
            "does not have: add the schedule with --config s3://bucket/config.yaml (or export a raycronjob, "
            "which ships the file in a ConfigMap)"
        )
    return state_url


def _k8s_cronjob(
    schedule: Schedule, meta: dict[str, Any], image: str, state_url: str | None
) -> dict[str, Any]:
    """A plain CronJob running `maskdiet schedule run-due --only NAME` against the long-lived RayCluster."""
    state_url = _check_k8s_cronjob(schedule, state_url)
    policy = {"skip": "Forbid", "queue": "Forbid", "replace": "Replace"}[schedule.concurrency]
    container = {
        "name": "run-due",
        "image": image,
        "command": ["maskdiet", "schedule", "run-due", "--state", state_url, "--only", schedule.name],
        "env": [
            {"name": "RAY_API_SERVER_ADDRESS", "value": f"http://{CLUSTER_NAME}-head-svc:8265"},
            {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "auth_token"}},
            },
        ],
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {
            "schedule": schedule.cron,
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": policy,
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 2,
                    "template": {"spec": {"restartPolicy": "OnFailure", "containers": [container]}},
                }
            },
        },
    }
