"""Config validation: every error reported at once, under its YAML path; secrets stay in env."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, load_config, resolve_api_key

CONFIGS = Path(__file__).parent / "configs"
ROOT = Path(__file__).parents[2]


def errors_of(name: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / name, environ={})
    return str(exc.value)


def test_every_error_listed_with_its_path() -> None:
    message = errors_of("many_errors.yaml")
    assert "server.port  Input should be less than or equal to 65535" in message
    assert "models.0.endpoints.0  Input should be a valid URL" in message
    assert "models.0.connect_timeout_s  Input should be greater than 0" in message
    assert "models.1.role  Input should be 'student', 'teacher' or 'embedding'" in message
    assert "routing.colour  Extra inputs are not permitted" in message


def test_cross_field_rules() -> None:
    assert "exactly one model must have role: teacher (found 2)" in errors_of("two_teachers.yaml")


def test_missing_env_key_and_classifier_file() -> None:
    message = errors_of("missing_key.yaml")
    assert "models.0.api_key_env  environment variable TRIAGE_TEST_UNSET_KEY is not set" in message
    assert "classifier.path  file not found" in message


def test_not_yaml() -> None:
    assert "is not valid YAML" in errors_of("not_yaml.yaml")


def test_key_resolved_from_env_only() -> None:
    cfg = CONFIGS / "missing_key.yaml"
    text = cfg.read_text().replace("nowhere/model.joblib", str(ROOT / "config.yaml"))
    good = cfg.parent / "_tmp_key.yaml"
    good.write_text(text)
    try:
        config = load_config(good, environ={"TRIAGE_TEST_UNSET_KEY": "sk-secret"})
    finally:
        good.unlink()
    assert "sk-secret" not in config.model_dump_json()
    assert resolve_api_key(config.teacher, {"TRIAGE_TEST_UNSET_KEY": "sk-secret"}) == "sk-secret"


def test_serve_exits_nonzero_on_bad_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "router", "serve", "--config", str(CONFIGS / "many_errors.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "5 error(s)" in proc.stderr
    assert "routing.colour" in proc.stderr


def test_shipped_config_is_valid() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "router", "check-config", str(ROOT / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
