"""`triage render` turns config.yaml's serve blocks into compose and Kubernetes files that match it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

CONFIG = {
    "server": {"host": "0.0.0.0", "port": 8080},
    "models": [
        {
            "name": "student-small",
            "role": "student",
            "endpoints": ["http://student-1-5b:8000/v1", "http://student-1-5b-b:8000/v1"],
            "upstream_model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            "max_score": 0.3,
            "context_window": 16384,
            "serve": {"reasoning_parser": "deepseek_r1"},
        },
        {
            "name": "student-large",
            "role": "student",
            "endpoints": ["http://student-32b:8001/v1"],
            "upstream_model": "r1-32b",
            "max_score": 0.6,
            "serve": {
                "hf_model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
                "gpus": 2,
                "max_model_len": 32768,
                "replicas": 2,
                "extra_args": ["--max-num-seqs=64"],
            },
        },
        {
            "name": "teacher",
            "role": "teacher",
            "endpoints": ["https://api.example.com/v1"],
            "upstream_model": "frontier",
            "api_key_env": "TEACHER_API_KEY",
        },
    ],
    "classifier": {"kind": "heuristic"},
}


def run_render(target: str, tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`triage render` on `config`; it must succeed."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "router", "render", target, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TEACHER_API_KEY": "x", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def render(target: str, tmp_path: Path) -> str:
    return run_render(target, tmp_path, CONFIG).stdout


def test_compose_matches_config(tmp_path: Path) -> None:
    compose = yaml.safe_load(render("compose", tmp_path))
    services = compose["services"]
    assert set(services) == {"triage", "student-1-5b", "student-1-5b-b", "student-32b"}
    large = services["student-32b"]
    assert large["command"][0] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert "--served-model-name=r1-32b" in large["command"]
    assert "--port=8001" in large["command"]
    assert "--tensor-parallel-size=2" in large["command"]
    assert "--max-num-seqs=64" in large["command"]
    small = services["student-1-5b"]["command"]
    assert "--max-model-len=16384" in small and "--reasoning-parser=deepseek_r1" in small
    # GPUs are handed out without overlap: 1 + 1 + 2.
    devices = [
        tuple(services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        for s in ("student-1-5b", "student-1-5b-b", "student-32b")
    ]
    assert devices == [("0",), ("1",), ("2", "3")]
    assert services["triage"]["environment"] == {"TEACHER_API_KEY": "${TEACHER_API_KEY:-}"}
    assert set(services["triage"]["depends_on"]) == {"student-1-5b", "student-1-5b-b", "student-32b"}


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_k8s_validates_and_matches_config(tmp_path: Path, version: str) -> None:
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(render("k8s", tmp_path)) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ConfigMap", "triage-config") in kinds
    for host in ("student-1-5b", "student-1-5b-b", "student-32b"):
        assert ("Deployment", host) in kinds and ("Service", host) in kinds
    large = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "student-32b")
    container = large["spec"]["template"]["spec"]["containers"][0]
    assert large["spec"]["replicas"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "student-32b")
    assert service["spec"]["ports"][0]["port"] == 8001
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == CONFIG


DEPLOY_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "deploy").rglob("config.yaml"))


@pytest.mark.parametrize("path", ["config.yaml", *DEPLOY_CONFIGS])
def test_shipped_configs_pass_check_config(path: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "router", "check-config", str(REPO / path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TEACHER_API_KEY": "set-in-deployment", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr


def test_state_adds_redis_to_compose_and_k8s(tmp_path: Path) -> None:
    config = {**CONFIG, "state": {"redis_url_env": "TRIAGE_REDIS_URL"}}
    out = {}
    for target in ("compose", "k8s"):
        proc = run_render(target, tmp_path, config)
        assert "TRIAGE_REDIS_URL" in proc.stderr  # unset here: a warning, not an error
        out[target] = proc.stdout
    services = yaml.safe_load(out["compose"])["services"]
    gateway = services["triage"]
    assert gateway["environment"]["TRIAGE_REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "--appendonly" in services["redis"]["command"]
    docs = [d for d in yaml.safe_load_all(out["k8s"]) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "redis"), ("Service", "redis")} <= kinds
    # Without state: no Redis.
    assert "redis" not in yaml.safe_load(render("compose", tmp_path))["services"]
