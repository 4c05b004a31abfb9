"""The commands that read stored traffic (`triage export --distill`, `triage replay`) given bad input:
each says what is wrong on one line and exits non-zero, never with a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from router.__main__ import main
from router.config import StoreConfig
from router.store import Database
from router.store.schema import request_row
from router.workload import request_family
from tests.conftest import base_config
from tests.loopback import closed_port_url
from tests.router.test_export import stored

REPO = Path(__file__).resolve().parents[2]
URLS = {"small": "http://127.0.0.1:9", "large": "http://127.0.0.1:9", "teacher": "http://127.0.0.1:9"}


def config_file(folder: Path, name: str, store: dict[str, Any] | None, **classifier: str) -> Path:
    raw = base_config(URLS)
    if store is not None:
        raw["store"] = store
    if classifier:
        raw["classifier"] = classifier
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def stores(tmp_path: Path) -> dict[str, Path]:
    """Configs naming stores that cannot be read, or hold nothing."""
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "traffic.db").write_text("not a database, only text " * 10)
    (tmp_path / "folder" / "traffic.db").mkdir(parents=True)
    empty = Database.connect(StoreConfig(data_dir=tmp_path / "empty"))
    assert empty is not None
    empty.close()
    return {
        name: config_file(tmp_path, name, {"data_dir": str(tmp_path / name)})
        for name in ("missing", "garbage", "folder", "empty")
    }


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("triage: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["export", "replay"])
@pytest.mark.parametrize(
    ("store", "extra", "code", "says"),
    [
        ("missing", [], 2, "no traffic store at"),
        ("garbage", [], 2, "file is not a database"),
        ("folder", [], 2, "cannot read the traffic store"),
        ("empty", [], 1, "no stored requests: nothing to read"),
        ("empty", ["--since", "2026-11-01"], 1, "no stored requests since 2026-11-01T00:00:00"),
        ("empty", ["--since", "2026-11-02", "--until", "2026-11-01"], 2, "must be before --until"),
    ],
)
def test_a_store_that_cannot_be_read_or_holds_nothing_is_one_line(
    stores: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    store: str,
    extra: list[str],
    code: int,
    says: str,
) -> None:
    config = stores[store]
    if command == "export":
        args = ["export", "--distill", "--config", str(config), "--out", str(tmp_path / "out.jsonl")]
    else:
        args = ["replay", "--config", str(config), "--current", str(config)]
    assert main(args + extra) == code
    assert says in one_line_error(capsys)


def test_a_postgres_store_that_does_not_answer_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port_url().rsplit(":", 1)[1]
    monkeypatch.setenv("TRIAGE_TEST_DSN", f"postgresql://triage@127.0.0.1:{port}/triage")
    config = config_file(tmp_path, "pg", {"kind": "postgres", "dsn_env": "TRIAGE_TEST_DSN"})
    assert main(["export", "--distill", "--config", str(config)]) == 2
    line = one_line_error(capsys)
    assert "cannot read the traffic store at the PostgreSQL database in $TRIAGE_TEST_DSN" in line
    assert "refused" in line


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--out", "{tmp}/no/such/folder/out.jsonl"], "cannot write"),
        (["--out", "{tmp}"], "cannot write"),
        (["--score-min", "0.9", "--score-max", "0.1"], "is above --score-max"),
    ],
)
def test_export_refuses_bad_arguments_on_one_line(
    stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    args = ["export", "--distill", "--config", str(stores["empty"])]
    assert main(args + [a.format(tmp=tmp_path) for a in extra]) == 2
    assert says in one_line_error(capsys)


@pytest.mark.parametrize(
    "extra", [["--since", "nan"], ["--until", "inf"], ["--score-min", "nan"], ["--score-max", "inf"]]
)
def test_times_and_scores_must_be_finite(
    stores: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", "--distill", "--config", str(stores["empty"]), *extra])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {extra[0]}: {extra[1]!r} is not a" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"not a classifier artifact"])
def test_replay_with_a_classifier_that_cannot_be_loaded_is_one_line(
    stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    artifact = tmp_path / "router.joblib"
    artifact.write_bytes(content)
    candidate = config_file(tmp_path, "candidate", None, kind="learned", path=str(artifact))
    assert main(["replay", "--config", str(candidate), "--current", str(stores["empty"])]) == 2
    assert f"cannot load the candidate's classifier {artifact}" in one_line_error(capsys)


def test_replay_with_a_candidate_that_fails_validation_names_the_field(
    stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = base_config(URLS, threshold=0.5)  # not a routing key
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(raw))
    assert main(["replay", "--config", str(candidate), "--current", str(stores["empty"])]) == 2
    err = capsys.readouterr().err
    assert "routing.threshold" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "messages", ["a string", [None], ["a string"], {"role": "user"}, [{"role": "user", "content": 5}]]
)
def test_odd_stored_messages_have_a_family_and_do_not_stop_a_command(messages: Any) -> None:
    # A store written by another version, or by hand, may hold anything in these columns.
    record = stored(1, "q", "an answer", messages=messages, prompt=None)
    assert request_family(record) == "unknown"


def test_an_export_whose_reader_leaves_early_stops_with_one_line(tmp_path: Path) -> None:
    # More examples than a pipe holds, so the export is still writing when its reader leaves.
    db = Database.connect(StoreConfig(data_dir=tmp_path / "full"))
    assert db is not None
    records = [
        stored(i, f"question {i} about things", f"The answer to question {i} is {i}.") for i in range(2000)
    ]
    db.write(
        [
            request_row("w", i, r, r.prompt, orjson.dumps(r.messages).decode(), r.answer)
            for i, r in enumerate(records)
        ],
        [],
    )
    db.close()
    config = config_file(tmp_path, "full", {"data_dir": str(tmp_path / "full")})
    cmd = [sys.executable, "-m", "router", "export", "--distill", "--config", str(config)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert orjson.loads(proc.stdout.readline())["messages"][-1]["role"] == "assistant"
        proc.stdout.close()  # as `| head -1` does
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 1
    assert err == "triage: the output was closed before the export finished\n"


@pytest.mark.parametrize("command", ["export", "replay"])
def test_a_config_that_is_not_text_is_one_line(
    stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"models: [\xc3\x28]\n")  # not UTF-8
    if command == "export":
        args = ["export", "--distill", "--config", str(binary)]
    else:
        args = ["replay", "--config", str(binary), "--current", str(stores["empty"])]
    assert main(args) == 2
    assert f"cannot read config {binary}: not UTF-8 text" in one_line_error(capsys)
