"""The `state:` section: its URL comes from the environment and is checked at load, never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.config import ConfigError, load_config
from tests.conftest import base_config


def write(tmp_path: Path, **state: object) -> Path:
    raw = base_config({"small": "http://a", "large": "http://b", "teacher": "http://c"})
    raw["state"] = {"redis_url_env": "TRIAGE_TEST_REDIS", **state}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_state_url_must_be_set_and_a_redis_url(tmp_path: Path) -> None:
    path = write(tmp_path, on_failure="fail_closed", timeout_s=0.05)
    with pytest.raises(ConfigError, match=r"state.redis_url_env  environment variable TRIAGE_TEST_REDIS"):
        load_config(path, {})
    with pytest.raises(ConfigError, match=r"state.redis_url_env  TRIAGE_TEST_REDIS must hold") as bad:
        load_config(path, {"TRIAGE_TEST_REDIS": "http://user:hunter2@redis:6379"})
    assert "hunter2" not in str(bad.value)
    config = load_config(path, {"TRIAGE_TEST_REDIS": "redis://:hunter2@redis:6379/0"})
    assert config.state is not None and config.state.on_failure == "fail_closed"
    # check-config only warns about an unset variable.
    missing: list[str] = []
    load_config(path, {}, missing_secrets=missing)
    assert missing and "TRIAGE_TEST_REDIS" in missing[0]


def test_state_rejects_unknown_keys_and_bad_modes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"state.on_failure"):
        load_config(write(tmp_path, on_failure="fail_sometimes"), {"TRIAGE_TEST_REDIS": "redis://r"})
    with pytest.raises(ConfigError, match=r"state.redis_host  Extra inputs are not permitted"):
        load_config(write(tmp_path, redis_host="r"), {"TRIAGE_TEST_REDIS": "redis://r"})
