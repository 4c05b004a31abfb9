"""Fixtures for deploy tests: the two local llama-servers from ``deploy/local``.

The servers are started with the product's own ``deploy/local/models.sh`` on free ports and
a private run dir, so the test exercises the same script ``up.sh`` uses. Paths and model names
come from ``deploy/local/common.sh`` (the one place that defines them).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.loopback import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_DIR = REPO_ROOT / "deploy" / "local"

_COMMON_VARS = (
    "LLAMA_SERVER_BIN",
    "STUDENT_GGUF",
    "TEACHER_GGUF",
    "STUDENT_MODEL_NAME",
    "TEACHER_MODEL_NAME",
)


@dataclass(frozen=True)
class LocalModels:
    """Where the local student and teacher stand-in answer (OpenAI base URLs end in ``/v1``)."""

    student_url: str
    teacher_url: str
    student_model: str
    teacher_model: str
    run_dir: Path


def local_settings() -> dict[str, str]:
    """Read paths and model names from ``deploy/local/common.sh``."""
    script = f'source "{LOCAL_DIR}/common.sh"; ' + "; ".join(
        f'printf "%s\\n" "${name}"' for name in _COMMON_VARS
    )
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    return dict(zip(_COMMON_VARS, out.splitlines(), strict=True))


def _models_sh(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LOCAL_DIR / "models.sh"), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="session")
def local_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModels]:
    """Start both local llama-servers for the session; skip when they were never built."""
    settings = local_settings()
    missing = [
        settings[key]
        for key in ("LLAMA_SERVER_BIN", "STUDENT_GGUF", "TEACHER_GGUF")
        if not Path(settings[key]).is_file()
    ]
    if missing:
        pytest.skip(
            "local models not set up (missing "
            + ", ".join(missing)
            + "); run `bash deploy/local/setup.sh` once (about 6 min on 2 cores)"
        )
    student_port, teacher_port = free_port(), free_port()
    while teacher_port == student_port:
        teacher_port = free_port()
    run_dir = tmp_path_factory.mktemp("llama-run")
    env = {
        **os.environ,
        "TRIAGE_STUDENT_PORT": str(student_port),
        "TRIAGE_TEACHER_PORT": str(teacher_port),
        "TRIAGE_RUN_DIR": str(run_dir),
    }
    started = _models_sh("start", env)
    try:
        if started.returncode != 0:
            pytest.fail(f"models.sh start failed:\n{started.stderr}")
        yield LocalModels(
            student_url=f"http://127.0.0.1:{student_port}/v1",
            teacher_url=f"http://127.0.0.1:{teacher_port}/v1",
            student_model=settings["STUDENT_MODEL_NAME"],
            teacher_model=settings["TEACHER_MODEL_NAME"],
            run_dir=run_dir,
        )
    finally:
        _models_sh("stop", env)


def shipped_config(student_url: str, teacher_url: str) -> dict[str, Any]:
    """The repo's config.yaml (learned classifier, calibrated threshold) pointed at these servers."""
    raw: dict[str, Any] = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    student, teacher = raw["models"]
    student["endpoints"] = [student_url]
    teacher["endpoints"] = [teacher_url]
    raw["classifier"]["path"] = str(REPO_ROOT / raw["classifier"]["path"])
    return raw


def sdk_client(base_url: str) -> openai.OpenAI:
    """The official SDK against a gateway, with quality escalation off for the request.

    These suites check routing and the wire format with real tiny models, whose answers
    are not reliable enough to pass the quality checks every time.
    """
    return openai.OpenAI(
        base_url=base_url + "/v1",
        api_key="local",
        max_retries=0,
        timeout=120,
        default_headers={"x-triage-fallback": "off"},
    )
