"""A plain `pip install .` (no extras) runs every `triage` subcommand.

The test suite's own venv has the `[test]` extra, so an import of a test-only package from the
CLI (an HTTP client, the openai SDK) passes every other test and only breaks for users. This
builds a fresh venv, installs the project the way `deploy/Dockerfile` does (the same four paths,
runtime dependencies from PyPI, no extras), and runs the CLI from a folder outside the checkout,
so nothing is imported from the source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.loopback import closed_port_url, free_port

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
# What deploy/Dockerfile copies before `pip install .`.
PACKAGE_PATHS = ("pyproject.toml", "README.md", "router", "classifiers")
SUBCOMMANDS = {"serve", "check-config", "route", "stats", "render"}
# pip's words for "could not reach the index": no verdict on the package, so skip.
NETWORK_ERRORS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
)


def _clean_env() -> dict[str, str]:
    """The environment without the test venv leaking into the fresh one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("TRIAGE_")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The `triage` script of a fresh venv that holds the project and its runtime dependencies."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in PACKAGE_PATHS:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    env_dir = root / "venv"
    started = time.monotonic()
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    proc = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            "--disable-pip-version-check",
            str(src),
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=root,
        timeout=900,
    )
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(marker in output for marker in NETWORK_ERRORS):
            pytest.skip(f"the package index is unreachable:\n{output[-2000:]}")
        pytest.fail(f"`pip install .` failed:\n{output[-4000:]}")
    sys.stderr.write(f"\nfresh venv + `pip install .`: {time.monotonic() - started:.0f} s\n")
    yield env_dir / "bin" / "triage"


def _run(triage: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(triage), *args], capture_output=True, text=True, env=_clean_env(), cwd=cwd, timeout=120
    )


def test_no_extra_is_installed(installed: Path) -> None:
    python = installed.parent / "python"
    for module in ("openai", "pytest", "hypothesis"):
        found = subprocess.run(
            [str(python), "-c", f"import importlib.util as u; print(u.find_spec({module!r}) is None)"],
            capture_output=True,
            text=True,
            env=_clean_env(),
            check=True,
        )
        assert found.stdout.strip() == "True", f"{module} is installed without extras"


# httpx2 is installed without extras (the tokenizer's hub client depends on it), so what must
# hold is that no module of the product imports it or any other test-only package.
_IMPORT_ALL = """
import importlib, pkgutil, sys
import classifiers, router
for pkg in (router, classifiers):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
import router.__main__
from classifiers.cli import DEFAULT_MODEL
from classifiers.learned import LearnedScorer
LearnedScorer.load(DEFAULT_MODEL).score_text("How do I bake bread?")
print(sorted(m for m in ("httpx2", "openai", "pytest", "hypothesis") if m in sys.modules))
"""


def test_no_module_imports_a_test_only_package(installed: Path, tmp_path: Path) -> None:
    python = installed.parent / "python"
    out = subprocess.run(
        [str(python), "-c", _IMPORT_ALL], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_subcommand_runs_without_extras(installed: Path, tmp_path: Path) -> None:
    top = _run(installed, "--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    listed = re.search(r"\{([a-z,-]+)\}", top.stdout)
    assert listed is not None, top.stdout
    subcommands = listed.group(1).split(",")
    assert SUBCOMMANDS <= set(subcommands)
    for name in subcommands:
        sub = _run(installed, name, "--help", cwd=tmp_path)
        assert sub.returncode == 0, f"triage {name} --help:\n{sub.stderr}"
        assert sub.stdout.startswith(f"usage: triage {name}")


def test_check_config_on_the_shipped_config(installed: Path, tmp_path: Path) -> None:
    # Outside the checkout, the relative classifier path resolves to the installed package data.
    shutil.copy2(REPO_ROOT / "config.yaml", tmp_path / "config.yaml")
    proc = _run(installed, "check-config", "config.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "config.yaml: OK" in proc.stdout


def test_stats_reports_an_unreachable_gateway(installed: Path, tmp_path: Path) -> None:
    url = closed_port_url()
    proc = _run(installed, "stats", "--url", url, "--timeout-s", "2", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"triage stats: cannot reach {url}/metrics")


def _healthz(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
            status: int = resp.status
            return status
    except OSError:  # refused, reset, timed out: not up yet
        return None


def test_serve_starts_and_stops_cleanly(installed: Path, tmp_path: Path) -> None:
    raw: dict[str, Any] = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    for model in raw["models"]:
        model["endpoints"] = [closed_port_url() + "/v1"]  # /healthz needs no upstream
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(installed), "serve", "--config", str(config), "--port", str(port), "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while _healthz(url) != 200:
            assert proc.poll() is None, f"triage serve exited:\n{proc.communicate()[0]}"
            assert time.monotonic() < deadline, "triage serve did not answer /healthz in 60 s"
            time.sleep(0.1)
        # The dashboard's page and assets are package data: served from the installed package.
        for path, kind in (
            ("/ui", "text/html"),
            ("/ui/ui.js", "text/javascript"),
            ("/ui/ui.css", "text/css"),
        ):
            with urllib.request.urlopen(url + path, timeout=5) as resp:
                assert resp.status == 200 and resp.headers["content-type"].startswith(kind), path
                assert len(resp.read()) > 1000, path
        with urllib.request.urlopen(url + "/ui/api/summary", timeout=5) as resp:
            assert json.loads(resp.read())["decisions"]["source"] == "memory"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so supervisors see it.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    assert "Application shutdown complete" in output, output
