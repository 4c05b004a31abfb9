"""Learning from traffic: labels from stored outcomes, the warm-started refit, and the reload swap."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx2 as httpx
import joblib
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from classifiers import learn as L
from classifiers.artifact import save
from classifiers.learned import LearnedScorer
from router.app import create_app
from router.config import load_config
from router.records import RequestRecord, ShadowRecord
from router.store import read_traffic
from tests.conftest import GatewayFactory, Upstreams, base_config
from tests.loopback import serve


def _request(
    i: int, prompt: str | None, quality: str | None = "passed", shadowed: bool = False
) -> RequestRecord:
    """A student-served request; only the fields labels read vary."""
    fixed = ("chat", "auto", "student", ("student",), "score", 0.2, 1.0, 200, False, 10, 5, 0.0, 0.0, 1.0)
    rec = RequestRecord(float(i), f"r{i}", None, *fixed, None, 1.0, None, None, quality, shadowed)
    if prompt is not None:
        rec.captured, rec.prompt = True, prompt
    return rec


def _shadow(i: int, agreement: float, student: str = "student") -> ShadowRecord:
    return ShadowRecord(float(i), f"r{i}", student, agreement, None, 10, 5)


def test_labels_from_checks_and_shadow_agreement() -> None:
    requests = [
        _request(0, "escalated by a check", quality="refusal"),
        _request(1, "disagreed in shadow", shadowed=True),
        _request(2, "agreed in shadow", shadowed=True),
        _request(3, "agreement in between", shadowed=True),
        _request(4, None, shadowed=True),  # not captured: no prompt to learn from
        _request(5, "served, never compared"),
        _request(6, "another student's comparison", shadowed=True),
    ]
    shadows = [_shadow(1, 0.0), _shadow(2, 1.0), _shadow(3, 0.6), _shadow(4, 0.0), _shadow(6, 1.0, "other")]
    examples, counts = L.label_traffic(L.pair_shadows(requests, shadows), L.LabelRule(student="student"))
    assert [(e.prompt, e.label, e.why) for e in examples] == [
        ("escalated by a check", 1, "quality:refusal"),
        ("disagreed in shadow", 1, "shadow"),
        ("agreed in shadow", 0, "shadow"),
    ]
    assert (counts.requests, counts.hard_quality, counts.hard_shadow, counts.easy_shadow) == (7, 1, 1, 1)
    assert (counts.between, counts.no_prompt, counts.other_student, counts.labelled) == (1, 1, 1, 3)
    # Without a student filter the other student's agreement is an easy label.
    examples, _ = L.label_traffic(L.pair_shadows(requests, shadows), L.LabelRule())
    assert ("another student's comparison", 0) in [(e.prompt, e.label) for e in examples]
    with pytest.raises(ValueError):
        L.LabelRule(hard_below=0.9, easy_from=0.5)


def _traffic(n: int) -> list[L.Example]:
    """Prompts where this student fails exactly on the ones about zebras (the shipped model can't know)."""
    topics = ["zebra", "teapot", "bicycle", "violin", "glacier", "lantern"]
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        prompt = f"Question {i}: tell me one fact about a {topic} number {i * 7 % 13}."
        out.append(L.Example(f"r{i}", float(i), prompt, int(topic == "zebra"), "shadow"))
    return out


def test_refit_learns_the_students_weak_spot_and_folds_into_the_artifact(
    model_path: Path, tmp_path: Path
) -> None:
    examples = _traffic(240)
    prompts = [e.prompt for e in examples]
    result = L.learn(model_path, examples, prompts, share=0.7)
    assert result.before.n > 0 and result.after.n == result.before.n
    assert result.after.auroc > 0.9 > result.before.auroc
    assert result.after.apgr > result.before.apgr
    assert result.refit.delta.alpha >= L.ALPHA_MIN

    # The new artifact is the same format, and the hot path scores exactly the fitted model.
    out = tmp_path / "learned.joblib"
    save(result.artifact, out)
    learned = LearnedScorer.load(out)
    artifact = joblib.load(model_path)
    d = L.design(LearnedScorer(artifact), artifact, prompts[:20])
    want = result.refit.delta.decision(d)
    got = np.array([learned.decision(p) for p in prompts[:20]])
    assert np.allclose(got, want, atol=1e-9)
    assert result.artifact["metadata"]["learned_from_traffic"]["labels"] == len(examples)

    # Unseen prompts on the topic score above the others; the threshold keeps the share asked.
    new = learned.score_many(["a fact about a zebra please", "a fact about a teapot please"])
    assert new[0] > new[1]
    assert abs(result.share - 0.7) < 0.02


def test_point_classifier_rewrites_only_the_path(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("# keep me\nclassifier: {path: models/old.joblib}   # the model\nrouting: {alias: auto}\n")
    L.point_classifier(cfg, tmp_path / "new.joblib")
    text = cfg.read_text()
    assert text.startswith("# keep me\n") and "# the model" in text
    assert yaml.safe_load(text)["classifier"]["path"] == str((tmp_path / "new.joblib").resolve())


def _score(url: str, prompt: str) -> float:
    ask = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
    resp = httpx.post(url + "/v1/chat/completions", json=ask)
    assert resp.status_code == 200, resp.text
    return float(resp.headers["x-triage-score"])


def test_reload_swaps_a_learned_model_in_without_a_restart(
    model_path: Path, upstreams: Upstreams, tmp_path: Path
) -> None:
    model = tmp_path / "model.joblib"
    shutil.copy(model_path, model)
    raw = base_config(upstreams.urls)
    raw["classifier"] = {"path": str(model)}
    raw["admin"] = {"reload_endpoint": True}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    zebra = "Question 5: tell me one fact about a zebra number 9."

    result = L.learn(model_path, _traffic(240), [], share=0.7)
    app = create_app(load_config(cfg), registry=CollectorRegistry(), config_path=cfg)
    with serve(app) as url:
        before = _score(url, zebra)
        # The same path, rewritten in place (as `triage learn --out` over the served model does).
        save(result.artifact, model)
        assert httpx.post(url + "/admin/reload").status_code == 200
        after = _score(url, zebra)
        assert after > before + 0.05
        # A changed path loads too: back to the first model under a new name.
        again = tmp_path / "again.joblib"
        shutil.copy(model_path, again)
        L.point_classifier(cfg, again)
        assert httpx.post(url + "/admin/reload").status_code == 200
        assert _score(url, zebra) == pytest.approx(before, abs=1e-3)


def test_capture_labelled_keeps_only_the_prompts_outcomes_label(
    upstreams: Upstreams, make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    raw = base_config(upstreams.urls, shadow_rate=1.0)
    raw["store"] = {"kind": "sqlite", "data_dir": str(tmp_path), "flush_interval_s": 0.05}
    raw["capture"] = {"enabled": True, "sample_rate": 0.0, "labelled": True}
    easy = "thanks"
    hard = "Prove, step by step, that the square root of 2 is irrational; then derive a bound. " * 3
    with make_gateway(raw) as gw:
        for prompt in (easy, hard):
            ask = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
            assert httpx.post(gw.url + "/v1/chat/completions", json=ask).status_code == 200
        time.sleep(0.3)  # the shadow comparison runs after the answer
    assert gw.config.store is not None
    stored = {r.model: r for r in read_traffic(gw.config.store)}
    student, teacher = stored["student-small"], stored["teacher"]
    assert student.shadowed and student.captured and student.prompt == easy and student.answer is None
    assert len(student.shadows) == 1
    assert not teacher.shadowed and not teacher.captured and teacher.prompt is None
    examples, counts = L.label_traffic((r, r.shadows) for r in stored.values())
    assert [e.prompt for e in examples] == [easy] and counts.no_prompt == 0
