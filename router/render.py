"""`triage render compose|k8s`: deploy files for the vLLM servers, generated from config.yaml.

Each model with a `serve:` block gets one vLLM server per endpoint. The
endpoint URL names the server (`http://student-7b:8000/v1` → service
`student-7b` on port 8000) and `--served-model-name` is the model's
`upstream_model`, so the gateway's view and the deployment cannot drift.
With `state:` the files also hold one Redis (service `redis`, append-only file on a
volume) and, for compose, the gateway's `state.redis_url_env` pointing at it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from router.config import Config, ConfigError, ModelConfig, ServeConfig, load_config

__all__ = ["add_subcommand", "render_compose", "render_k8s", "servers"]

VLLM_PORT = 8000
REDIS_IMAGE = "redis:7.4-alpine"
REDIS_URL = "redis://redis:6379/0"
# Append-only with an fsync a second: a Redis restart loses at most a second of spend.
# noeviction: a full Redis refuses writes (counted as errors) rather than drop budgets.
REDIS_ARGS = [
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--save",
    "",
    "--maxmemory-policy",
    "noeviction",
]


def _vllm_args(model: ModelConfig, serve: ServeConfig, port: int) -> list[str]:
    args = [
        serve.hf_model or model.upstream_model,
        f"--served-model-name={model.upstream_model}",
        f"--port={port}",
        f"--tensor-parallel-size={serve.tensor_parallel_size or serve.gpus}",
        f"--gpu-memory-utilization={serve.gpu_memory_utilization}",
        "--enable-prompt-tokens-details",
    ]
    max_len = serve.max_model_len or model.context_window
    if max_len:
        args.append(f"--max-model-len={max_len}")
    if serve.enable_prefix_caching:
        args.append("--enable-prefix-caching")
    if serve.reasoning_parser:
        args.append(f"--reasoning-parser={serve.reasoning_parser}")
    return args + list(serve.extra_args)


def servers(config: Config) -> list[tuple[str, int, ModelConfig, ServeConfig]]:
    """(service name, port, model, serve block) for every endpoint of every served model."""
    out = []
    for model in config.models:
        if model.serve is None:
            continue
        for url in model.endpoints:
            parts = urlsplit(str(url))
            if not parts.hostname:
                raise ValueError(f"model {model.name!r}: endpoint {url} has no host")
            out.append((parts.hostname, parts.port or VLLM_PORT, model, model.serve))
    names = [s[0] for s in out]
    if len(set(names)) != len(names):
        raise ValueError("two served endpoints share a host name; give each its own service name")
    return out


def render_compose(config: Config, config_file: str) -> dict[str, Any]:
    """A compose file: the gateway plus one vLLM service per served endpoint."""
    services: dict[str, Any] = {
        "triage": {
            "build": {"context": "..", "dockerfile": "deploy/Dockerfile"},
            "image": "triage:local",
            "restart": "unless-stopped",
            "ports": [f"{config.server.port}:{config.server.port}"],
            "volumes": [f"{config_file}:/etc/triage/config.yaml:ro"],
            "environment": {m.api_key_env: f"${{{m.api_key_env}:-}}" for m in config.models if m.api_key_env},
            "depends_on": {},
        }
    }
    gpu = 0
    for name, port, model, serve in servers(config):
        devices = [str(i) for i in range(gpu, gpu + serve.gpus)]
        gpu += serve.gpus
        services[name] = {
            "image": serve.image,
            "ipc": "host",
            "restart": "unless-stopped",
            "command": _vllm_args(model, serve, port),
            "environment": {"HF_TOKEN": "${HF_TOKEN:-}"},
            "volumes": ["hf-cache:/root/.cache/huggingface"],
            "healthcheck": {
                "test": [
                    "CMD",
                    "python3",
                    "-c",
                    f"import urllib.request; urllib.request.urlopen('http://localhost:{port}/health')",
                ],
                "interval": "10s",
                "timeout": "5s",
                "retries": 3,
                "start_period": "15m",
            },
            "deploy": {
                "resources": {
                    "reservations": {
                        "devices": [{"driver": "nvidia", "device_ids": devices, "capabilities": ["gpu"]}]
                    }
                }
            },
        }
        services["triage"]["depends_on"][name] = {"condition": "service_healthy"}
    volumes: dict[str, Any] = {"hf-cache": {}}
    if config.state is not None:
        services["redis"] = {
            "image": REDIS_IMAGE,
            "restart": "unless-stopped",
            "command": ["redis-server", *REDIS_ARGS],
            "volumes": ["redis-data:/data"],
            "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "5s", "retries": 5},
        }
        services["triage"]["environment"][config.state.redis_url_env] = REDIS_URL
        services["triage"]["depends_on"]["redis"] = {"condition": "service_healthy"}
        volumes["redis-data"] = {}
    return {"name": "triage", "services": services, "volumes": volumes}


def _k8s_redis() -> list[dict[str, Any]]:
    """A one-pod Redis StatefulSet with its volume, and its Service `redis`."""
    labels = {"app.kubernetes.io/name": "redis", "app.kubernetes.io/part-of": "triage"}
    container = {
        "name": "redis",
        "image": REDIS_IMAGE,
        "args": REDIS_ARGS,
        "ports": [{"name": "redis", "containerPort": 6379}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    claim = {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "redis", "labels": labels},
            "spec": {
                "serviceName": "redis",
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": "redis"}},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
                "volumeClaimTemplates": [claim],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "redis", "labels": labels},
            "spec": {
                "selector": {"app.kubernetes.io/name": "redis"},
                "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}],
            },
        },
    ]


def render_k8s(config: Config, config_text: str) -> list[dict[str, Any]]:
    """Kubernetes objects: a ConfigMap with the gateway config, a Deployment + Service per server,
    and with `state:` a Redis (the gateway's `state.redis_url_env` should hold `REDIS_URL`)."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "triage-config"},
            "data": {"config.yaml": config_text},
        }
    ]
    for name, port, model, serve in servers(config):
        labels = {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/part-of": "triage",
            "triage.dev/model": model.name,
        }
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": serve.replicas,
                    "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [
                                {
                                    "name": "vllm",
                                    "image": serve.image,
                                    "args": _vllm_args(model, serve, port),
                                    "ports": [{"name": "http", "containerPort": port}],
                                    "resources": {
                                        "requests": {"nvidia.com/gpu": serve.gpus, "memory": serve.memory},
                                        "limits": {"nvidia.com/gpu": serve.gpus},
                                    },
                                    "readinessProbe": {
                                        "httpGet": {"path": "/health", "port": "http"},
                                        "periodSeconds": 10,
                                        "failureThreshold": 3,
                                    },
                                    "startupProbe": {
                                        "httpGet": {"path": "/health", "port": "http"},
                                        "periodSeconds": 10,
                                        "failureThreshold": 90,
                                    },
                                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                                }
                            ],
                            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
                        },
                    },
                },
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "selector": {"app.kubernetes.io/name": name},
                    "ports": [{"name": "http", "port": port, "targetPort": "http"}],
                },
            }
        )
    if config.state is not None:
        docs += _k8s_redis()
    return docs


def _run(args: argparse.Namespace) -> int:
    missing: list[str] = []  # render never calls an upstream: unset secrets only warn
    try:
        config = load_config(args.config, missing_secrets=missing)
        if missing:
            warning = "\n".join(
                ["triage render: warning: secrets not set here (used by `triage serve`):", *missing]
            )
            print(warning, file=sys.stderr)  # noqa: T201
        if args.target == "compose":
            text = yaml.safe_dump(render_compose(config, str(args.config)), sort_keys=False)
        else:
            docs = render_k8s(config, args.config.read_text())
            text = yaml.safe_dump_all(docs, sort_keys=False)
    except (ConfigError, ValueError) as exc:
        print(f"triage render: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    header = f"# Generated by `triage render {args.target} --config {args.config}`; do not edit.\n"
    if args.out:
        args.out.write_text(header + text)
    else:
        sys.stdout.write(header + text)
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `triage render`."""
    parser = subparsers.add_parser("render", help="generate compose or Kubernetes files from config")
    parser.add_argument("target", choices=["compose", "k8s"])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    parser.set_defaults(func=_run)
