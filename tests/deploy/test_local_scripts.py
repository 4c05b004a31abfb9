"""`deploy/local` scripts without the real build: ports from the config, teardown, preflight.

A fake `llama-server` (a few lines of stdlib Python that answer `/health` and record their
arguments) stands in for the real one through `LLAMA_SERVER_BIN`, and a private
`TRIAGE_CACHE_DIR` holds empty model files, so these run in seconds on any machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import LOCAL_DIR, REPO_ROOT, local_settings
from tests.loopback import free_port

FAKE_SERVER = """\
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
if "--version" in args:
    print("fake llama-server")
    sys.exit(0)
alias = args[args.index("--alias") + 1]
with open(os.path.join(os.environ["FAKE_LLAMA_ARGS_DIR"], alias + ".json"), "w") as f:
    json.dump(args, f)


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), Health).serve_forever()
"""


@dataclass
class Local:
    """A private cache dir with a fake llama-server, empty models and a config with free ports."""

    env: dict[str, str]
    config: Path
    run_dir: Path
    args_dir: Path
    student_port: int
    teacher_port: int
    gateway_port: int

    def script(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(LOCAL_DIR / name), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def server_args(self, role: str) -> list[str]:
        model = local_settings()[f"{role.upper()}_MODEL_NAME"]
        args: list[str] = json.loads((self.args_dir / f"{model}.json").read_text())
        return args

    def write_config(self, mutate: Any = None) -> None:
        raw: dict[str, Any] = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
        raw["server"]["port"] = self.gateway_port
        student, teacher = raw["models"]
        student["endpoints"] = [f"http://127.0.0.1:{self.student_port}/v1"]
        teacher["endpoints"] = [f"http://127.0.0.1:{self.teacher_port}/v1"]
        raw["classifier"] = {"kind": "heuristic"}
        if mutate is not None:
            mutate(raw)
        self.config.write_text(yaml.safe_dump(raw))


def _ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    settings = local_settings()
    for key in ("STUDENT_GGUF", "TEACHER_GGUF"):
        (cache / "models" / Path(settings[key]).name).write_bytes(b"GGUF")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llama-server"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    fake.chmod(0o755)
    args_dir = tmp_path / "args"
    args_dir.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIAGE_", "LLAMA_")) and k != "XDG_CACHE_HOME"
    }
    student, teacher, gateway = _ports(3)
    local = Local(
        env={
            **env,
            "TRIAGE_CACHE_DIR": str(cache),
            "LLAMA_SERVER_BIN": str(fake),
            "FAKE_LLAMA_ARGS_DIR": str(args_dir),
            "TRIAGE_CONFIG": str(tmp_path / "config.yaml"),
            "TRIAGE_HEALTH_TIMEOUT_S": "20",
        },
        config=tmp_path / "config.yaml",
        run_dir=cache / "run",
        args_dir=args_dir,
        student_port=student,
        teacher_port=teacher,
        gateway_port=gateway,
    )
    local.write_config()
    try:
        yield local
    finally:
        local.script("models.sh", "stop")


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            status: int = resp.status
    except OSError:
        return False
    return status == 200


def _running(local: Local, role: str) -> bool:
    pidfile = local.run_dir / f"{role}.pid"
    if not pidfile.exists():
        return False
    cmdline = Path(f"/proc/{pidfile.read_text().strip()}/cmdline")
    return cmdline.exists() and b"llama-server" in cmdline.read_bytes()


def test_models_listen_on_the_ports_in_the_config(local: Local) -> None:
    started = local.script("models.sh", "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.split() == ["student", "teacher"]
    for role, port in (("student", local.student_port), ("teacher", local.teacher_port)):
        assert _answers(port)
        args = local.server_args(role)
        assert args[args.index("--port") + 1] == str(port)
    stopped = local.script("models.sh", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not _answers(local.student_port) and not _answers(local.teacher_port)


def test_models_have_a_bounded_default_length(local: Local) -> None:
    started = local.script("models.sh", "start")
    assert started.returncode == 0, started.stderr
    for role in ("student", "teacher"):
        args = local.server_args(role)
        assert int(args[args.index("--n-predict") + 1]) == 256


def test_remote_teacher_gets_no_local_server(local: Local) -> None:
    def remote_teacher(raw: dict[str, Any]) -> None:
        raw["models"][1]["endpoints"] = ["https://api.example.com/v1"]

    local.write_config(remote_teacher)
    started = local.script("models.sh", "start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.split() == ["student"]
    assert "not starting a local teacher" in started.stderr
    assert "teacher  not local (https://api.example.com/v1)" in local.script("models.sh", "status").stdout


def test_port_clash_points_at_the_config_and_undoes_the_start(local: Local) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", local.teacher_port))
        squatter.listen()
        started = local.script("models.sh", "start")
    assert started.returncode == 1
    assert f"port {local.teacher_port}" in started.stderr
    assert f"endpoints of {local.config}" in started.stderr
    assert "TRIAGE_CONFIG=" in started.stderr
    assert "TRIAGE_TEACHER_PORT" not in started.stderr
    # The student came up before the clash was found; a failed start leaves nothing running.
    assert "stopping what it started: student" in started.stderr
    assert not _running(local, "student") and not _answers(local.student_port)


def test_up_refuses_the_old_port_variables(local: Local) -> None:
    local.env["TRIAGE_STUDENT_PORT"] = str(local.student_port + 1)
    up = local.script("up.sh")
    assert up.returncode == 1
    assert "TRIAGE_STUDENT_PORT is set" in up.stderr
    assert str(local.config) in up.stderr


def test_up_rejects_a_bad_config_before_anything_starts(local: Local) -> None:
    def typo(raw: dict[str, Any]) -> None:
        raw["routing"]["aliass"] = "auto"

    local.write_config(typo)
    up = local.script("up.sh")
    assert up.returncode == 1
    assert "routing.aliass" in up.stderr
    assert f"fix {local.config} first" in up.stderr
    assert "llama-server cached" not in up.stderr  # setup.sh never ran
    assert not (local.run_dir / "student.pid").exists()


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port: int = sock.getsockname()[1]
    return sock, port


def test_up_stops_the_models_it_started_when_the_gateway_fails(local: Local) -> None:
    sock, port = _busy_port()
    with sock:
        up = local.script("up.sh", "--port", str(port), timeout=120)
    assert up.returncode != 0, up.stderr
    assert "the gateway exited with status" in up.stderr
    assert "stopping the models this run started: student teacher" in up.stderr
    assert not _running(local, "student") and not _running(local, "teacher")
    assert not _answers(local.student_port) and not _answers(local.teacher_port)


def test_up_leaves_running_the_models_it_did_not_start(local: Local) -> None:
    before = local.script("models.sh", "start", "student")
    assert before.returncode == 0, before.stderr
    sock, port = _busy_port()
    with sock:
        up = local.script("up.sh", "--port", str(port), timeout=120)
    assert up.returncode != 0
    assert "stopping the models this run started: teacher" in up.stderr
    assert "still running from before this run: student" in up.stderr
    assert "bash deploy/local/models.sh stop" in up.stderr
    assert _running(local, "student") and _answers(local.student_port)
    assert not _running(local, "teacher")


def test_up_fails_fast_when_the_gateway_port_is_taken(local: Local) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", local.gateway_port))
        squatter.listen()
        up = local.script("up.sh", timeout=120)
    assert up.returncode == 1
    assert f"port {local.gateway_port}, where the gateway should listen" in up.stderr
    assert not (local.run_dir / "student.pid").exists()


def test_ctrl_c_stops_the_gateway_and_the_models(local: Local) -> None:
    proc = subprocess.Popen(
        ["bash", str(LOCAL_DIR / "up.sh"), "--log-level", "warning"],
        env=local.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{local.gateway_port}/healthz"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "up.sh did not bring the gateway up"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert "gateway stopped" in err
    assert "stopping the models this run started: student teacher" in err
    assert not _running(local, "student") and not _running(local, "teacher")
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=1)


def _path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH with every program of the current one except `missing`."""
    tools = tmp_path / "path"
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = tools / entry.name
            if entry.name not in missing and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(tools)


def _setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run setup.sh in its own process group, all of which is killed if it outlives 60 s.

    Should the preflight let it through, the download and the compilers must not outlive the test.
    """
    proc = subprocess.Popen(
        ["bash", str(LOCAL_DIR / "setup.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left in the group: good
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_preflight_without_cmake_or_compiler_fails_before_any_download(local: Local, tmp_path: Path) -> None:
    env = {
        **local.env,
        "PATH": _path_without(tmp_path, "cmake", "cc", "c++", "gcc", "g++", "clang", "clang++"),
    }
    del env["LLAMA_SERVER_BIN"]  # not built in this cache dir, so the build step would run
    started = time.monotonic()
    setup = _setup(env)
    assert setup.returncode == 1
    assert time.monotonic() - started < 30
    assert "cmake not found" in setup.stderr
    assert "apt-get install cmake" in setup.stderr
    assert "no C/C++ compiler" in setup.stderr
    assert "build-essential" in setup.stderr
    assert "nothing was built or downloaded" in setup.stderr
    assert not (Path(env["TRIAGE_CACHE_DIR"]) / "llama.cpp").exists()


def test_preflight_checks_free_disk(local: Local) -> None:
    env = {**local.env, "TRIAGE_MIN_FREE_MB": str(10**9)}
    del env["LLAMA_SERVER_BIN"]
    setup = _setup(env)
    assert setup.returncode == 1
    assert "MB free under" in setup.stderr
    assert "TRIAGE_CACHE_DIR" in setup.stderr


def test_preflight_passes_when_everything_is_cached(local: Local) -> None:
    setup = local.script("setup.sh")
    assert setup.returncode == 0, setup.stderr
    assert "llama-server cached" in setup.stderr


def test_build_reports_progress() -> None:
    make_lines = "'[  3%] Building C object a.o' '[ 14%] Building CXX object b.o' '[100%] Linking'"
    script = (
        f'source "{LOCAL_DIR}/setup.sh"; PROGRESS_S=1; '
        f"{{ printf '%s\\n' {make_lines}; sleep 2.5; echo '[50/100] ninja step'; }} "
        "| show_build_progress"
    )
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True
    ).stderr
    assert "building llama-server: 3% done" in out
    assert "building llama-server: 14% done" in out
    assert "building llama-server: 100% done" in out
    assert "still building llama-server... " in out
    assert "building llama-server: 50% done" in out
