"""Offline checks of the deploy files: Kustomize overlays, compose stack, Dockerfile.

Nothing here needs a cluster, a Docker engine or the network. The overlays are rendered with
``kubectl kustomize`` (skipped when kubectl is absent) and validated against the Kubernetes
OpenAPI schemas bundled in the ``kubernetes-validate`` package.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
# The oldest Kubernetes we claim to support, and the newest schema the package ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# CRDs have no schema in kubernetes-validate (it bundles core Kubernetes only); the
# ServiceMonitor (Prometheus Operator) is checked structurally in test_overlay_wiring.
CRD_KINDS = {"ServiceMonitor"}
COMPOSE_SERVICES = {"triage", "redis", "student-1-5b", "student-7b", "teacher", "prometheus", "grafana"}

Doc = dict[str, Any]


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def _render(overlay: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cannot render the Kustomize overlays")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"{kind}/{name} not in the rendered output")


def _container(deployment: Doc) -> Doc:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _probe_port(container: Doc, probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[port])


def _served_name(args: list[str]) -> str:
    names = [a.split("=", 1)[1] for a in args if a.startswith("--served-model-name=")]
    assert len(names) == 1, f"exactly one --served-model-name= expected in {args}"
    return names[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str, version: str) -> None:
    docs = _render(overlay)
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_wiring(overlay: str) -> None:
    docs = _render(overlay)
    config = _load_yaml(DEPLOY / "k8s" / "overlays" / overlay / "config.yaml")

    # Gateway: probes, generated config, secret, the port the config listens on.
    gateway = _find(docs, "Deployment", "triage")
    container = _container(gateway)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _probe_port(container, "livenessProbe") == config["server"]["port"] == 8080
    assert gateway["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "replicas" not in gateway["spec"], "the HPA owns replicas"
    config_maps = [
        v["configMap"]["name"] for v in gateway["spec"]["template"]["spec"]["volumes"] if "configMap" in v
    ]
    assert len(config_maps) == 1
    generated = _find(docs, "ConfigMap", config_maps[0])  # hash-suffixed by configMapGenerator
    assert yaml.safe_load(generated["data"]["config.yaml"]) == config
    env = {e["name"]: e for e in container["env"]}
    assert env["TEACHER_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "TEACHER_API_KEY"
    teacher = [m for m in config["models"] if m["role"] == "teacher"]
    assert len(teacher) == 1 and teacher[0]["api_key_env"] == "TEACHER_API_KEY"

    service = _find(docs, "Service", "triage")
    hpa = _find(docs, "HorizontalPodAutoscaler", "triage")
    pdb = _find(docs, "PodDisruptionBudget", "triage")
    monitor = _find(docs, "ServiceMonitor", "triage")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
        gateway["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triage"

    # Every student endpoint is an in-cluster Service backed by a GPU vLLM Deployment that
    # serves exactly the `upstream_model` the gateway will ask for.
    for model in (m for m in config["models"] if m["role"] == "student"):
        for endpoint in model["endpoints"]:
            url = urlsplit(endpoint)
            svc = _find(docs, "Service", str(url.hostname))
            assert url.port in [p["port"] for p in svc["spec"]["ports"]]
            deployment = next(
                d
                for d in docs
                if d["kind"] == "Deployment"
                and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            )
            vllm = _container(deployment)
            assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
            assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
            assert _served_name(vllm["args"]) == model["upstream_model"]


def test_compose_services_and_gpus() -> None:
    compose = _load_yaml(DEPLOY / "compose.yaml")
    services: dict[str, Doc] = compose["services"]
    assert set(services) == COMPOSE_SERVICES
    for name in ("student-1-5b", "student-7b", "teacher"):
        assert services[name]["image"].startswith("vllm/vllm-openai:")
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # No GPU is handed to two servers.
    ids = [
        i
        for s in services.values()
        for d in s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        for i in d["device_ids"]
    ]
    assert len(ids) == len(set(ids))


def test_compose_gateway_config_matches_services() -> None:
    services = _load_yaml(DEPLOY / "compose.yaml")["services"]
    config = _load_yaml(DEPLOY / "compose" / "config.yaml")
    for model in config["models"]:
        (endpoint,) = model["endpoints"]
        host = urlsplit(endpoint).hostname
        assert host in services, f"{model['name']} points at {host}, not a compose service"
        assert _served_name(services[host]["command"]) == model["upstream_model"]


def test_compose_references_existing_files() -> None:
    compose = _load_yaml(DEPLOY / "compose.yaml")
    build = compose["services"]["triage"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO_ROOT
    assert (context / build["dockerfile"]).is_file()
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source in named:
                continue
            assert source.startswith("."), f"{name}: bind mount {source} should be relative"
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_scrapes_compose_services() -> None:
    services = _load_yaml(DEPLOY / "compose.yaml")["services"]
    prometheus = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    hosts = {
        target.rsplit(":", 1)[0]
        for job in prometheus["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert "triage" in hosts
    assert hosts - {"localhost"} <= set(services)


def test_grafana_provisioning() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = _load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    (provider,) = _load_yaml(provisioning / "dashboards" / "triage.yaml")["providers"]
    grafana = _load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/triage.json"].startswith(provider["options"]["path"] + "/")


def test_dockerfile_copies_existing_paths() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert any(line.startswith("CMD ") and "/etc/triage/config.yaml" in line for line in lines)


def _redis_host(url: str) -> str:
    parts = urlsplit(url)
    assert parts.scheme == "redis" and parts.port == 6379, url
    return str(parts.hostname)


def test_compose_gateway_reaches_its_redis() -> None:
    services = _load_yaml(DEPLOY / "compose.yaml")["services"]
    config = _load_yaml(DEPLOY / "compose" / "config.yaml")
    url = services["triage"]["environment"][config["state"]["redis_url_env"]]
    assert _redis_host(url) in services
    assert services["triage"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "--appendonly" in services["redis"]["command"]


def test_prod_gateway_pods_share_one_redis() -> None:
    docs = _render("prod")
    config = _load_yaml(DEPLOY / "k8s" / "overlays" / "prod" / "config.yaml")
    env = {e["name"]: e for e in _container(_find(docs, "Deployment", "triage"))["env"]}
    service = _find(docs, "Service", _redis_host(env[config["state"]["redis_url_env"]]["value"]))
    redis = _find(docs, "StatefulSet", "redis")
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["volumeClaimTemplates"]
