"""The `triage` subcommands, driven through an argparse parser built by add_subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from classifiers.cli import add_subcommands


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="triage")
    add_subcommands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_score_round_trips_ids_in_order(model_path: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": f"question {i}: what is {i} + {i}?"} for i in range(2500)]
    rows[7] = {"id": "chat-7", "messages": [{"role": "user", "content": "Prove Fermat's theorem"}]}
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert run("score", "--jsonl", str(src), "--out", str(out), "--model", str(model_path)) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert all(0.0 <= g["score"] <= 1.0 for g in got)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "no id"}', "with an `id`"),
        ('{"id": 3, "prompt": 5}', "needs a string `prompt`"),
    ],
)
def test_score_names_the_bad_line(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "ok"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert run("score", "--jsonl", str(src), "--out", str(out), "--model", str(model_path)) == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and message in err


def test_eval_prints_auroc_and_routing(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "dev.jsonl"
    rows = [
        {"prompt": "thanks", "label": 0, "source": "a", "family": "chat", "strong_score": 1, "weak_score": 1},
        {
            "prompt": "Prove the Riemann hypothesis rigorously.",
            "label": 1,
            "source": "a",
            "family": "math",
            "strong_score": 1,
            "weak_score": 0,
        },
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert run("eval", "--data", str(src), "--model", str(model_path)) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "APGR" in out
    all_line = next(line for line in out.splitlines() if line.startswith("all "))
    assert all_line.split()[1:3] == ["2", "1.000"]
    assert any(line.startswith("family=math") for line in out.splitlines())


def test_calibrate_prints_threshold_and_writes_config(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "sample.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"item {i} " * i}) for i in range(1, 101)))
    cfg = tmp_path / "config.yaml"
    cfg.write_text("models:\n  - name: s\n    role: student\n    max_score: 0.5  # note\n")
    assert (
        run(
            "calibrate",
            "--data",
            str(src),
            "--student-share",
            "0.7",
            "--model",
            str(model_path),
            "--write-config",
            str(cfg),
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sends 70.0% of 100 prompts" in out
    threshold = float(out.split()[1])
    assert f"max_score: {round(threshold, 6)}  # note" in cfg.read_text()
