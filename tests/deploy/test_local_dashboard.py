"""The dashboard over a real run on the local CPU models, in chromium; it takes the README's screenshot.

`triage serve` runs the shipped config (learned classifier, calibrated threshold) in front of the
SmolLM2 student and the Gemma teacher from ``deploy/local``, with three client keys and a metrics
token. A mixed workload (easy, medium and hard prompts, some streamed) goes through the official
SDK; then the page, logged in with the token, must show what /metrics says. The screenshot is
written to the test's temp folder, and to ``$TRIAGE_DASHBOARD_SCREENSHOT`` when that is set:

    TRIAGE_DASHBOARD_SCREENSHOT=deploy/dashboard.png \\
        .venv/bin/python -m pytest tests/deploy/test_local_dashboard.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import pytest
import yaml

from tests.browser import Chromium, available
from tests.deploy.conftest import LocalModels, shipped_config
from tests.loopback import triage_process
from tests.router.test_dashboard_browser import READ_PAGE, key_spend, page_equals_metrics, scrape

pytestmark = [
    pytest.mark.local_models,
    pytest.mark.skipif(not available(), reason="needs Debian's chromium (tests/setup.sh as root)"),
]

TOKEN = "local-metrics-token"
KEYS = {"web-app": "sk-local-web", "batch-jobs": "sk-local-batch", "ci": "sk-local-ci"}
PROMPTS = [
    "Say hello.",
    "What is the capital of France?",
    "Thanks, that helped!",
    "Give me a synonym for 'happy'.",
    "Translate 'good morning' into Spanish.",
    "What colour is the sky on a clear day?",
    "Name three fruits.",
    "Summarise in one sentence why people enjoy reading novels.",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is and when to use one.",
    "Compare TCP and UDP for a video call application, with trade-offs.",
    "Prove that the square root of 2 is irrational, step by step, and explain each step.",
    "Derive the closed form of the sum of the first n cubes by induction and explain the inductive step.",
    "Design a database schema for a library with loans, reservations and fines; justify each table.",
    "Analyze the time complexity of quicksort in the best, average and worst case, with proofs.",
    "Hi!",
]
# JSON mode with a budget too small for a whole object: the student's cut-off answer fails its
# checks and the request falls back to the teacher.
JSON_PROMPTS = [
    "Return a JSON object describing a fictional person with name, age, city and three hobbies.",
    "Return a JSON object listing four planets with their order from the sun and one fact each.",
]


def test_dashboard_on_the_local_models(local_models: LocalModels, tmp_path: Path) -> None:
    raw = shipped_config(local_models.student_url, local_models.teacher_url)
    raw["auth"] = {"keys_env": "TRIAGE_LOCAL_KEYS", "metrics_token_env": "TRIAGE_LOCAL_METRICS"}
    raw.setdefault("routing", {})["target_student_share"] = 0.75
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "TRIAGE_LOCAL_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
        "TRIAGE_LOCAL_METRICS": TOKEN,
    }
    with triage_process(cfg, env=env, log=tmp_path / "triage.log") as served:
        keys = list(KEYS.values())
        for i, prompt in enumerate(PROMPTS):
            sdk = openai.OpenAI(
                base_url=served.url + "/v1", api_key=keys[i % len(keys)], max_retries=0, timeout=120
            )
            messages: list[openai.types.chat.ChatCompletionMessageParam] = [
                {"role": "user", "content": prompt}
            ]
            if i % 4 == 3:
                stream = sdk.chat.completions.create(
                    model="auto", messages=messages, max_tokens=48, temperature=0, stream=True
                )
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            elif i % 8 == 5:
                reply = sdk.chat.completions.create(
                    model="auto",
                    messages=[{"role": "user", "content": JSON_PROMPTS[i // 8]}],
                    max_tokens=12,
                    temperature=0,
                    response_format={"type": "json_object"},
                )
                assert reply.choices[0].message.content
            else:
                reply = sdk.chat.completions.create(
                    model="auto", messages=messages, max_tokens=48, temperature=0
                )
                assert reply.choices[0].message.content

        with Chromium(width=1440, height=1200) as browser:
            browser.navigate(served.url + "/ui?every=1")
            browser.wait_for("!document.getElementById('login').hidden", "the token form")
            browser.evaluate(
                f"document.getElementById('token').value = {TOKEN!r};"
                "document.getElementById('login').requestSubmit(); true"
            )
            # A few updates, so the savings line has points to join.
            browser.wait_for("Number(document.body.dataset.polls) >= 3", "three updates", timeout_s=30)
            page = browser.evaluate(READ_PAGE)
            s = scrape(served.url, TOKEN)
            assert s.requests == len(PROMPTS)
            page_equals_metrics(page, s, key_spend(served.url, TOKEN))
            assert set(dict(page["keys"])) == set(KEYS)
            assert len(page["decisions"]) == len(PROMPTS)
            shot = tmp_path / "dashboard.png"
            browser.screenshot(shot)
            assert browser.console == []
    assert shot.stat().st_size > 50_000
    target = os.environ.get("TRIAGE_DASHBOARD_SCREENSHOT")
    if target:
        shutil.copy2(shot, target)
