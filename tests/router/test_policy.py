"""The routing policy seam: `load_policy` builds the configured policy, which decides from a
`RequestContext` alone and owns the share controller's feedback.

Unit tests: no sockets, since a policy never talks to an upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from router.config import ApiName, Capability, Config
from router.errors import InvalidRequest
from router.policy import POLICIES, RequestContext, RoutingPolicy, load_policy
from router.routing import ThresholdPolicy
from tests.conftest import base_config

# Nothing listens here: a policy only reads the config.
URLS = dict.fromkeys(("small", "large", "teacher"), "http://127.0.0.1:9")


def config(models: dict[str, dict[str, Any]] | None = None, **routing: Any) -> Config:
    """base_config, with fields of some models replaced."""
    raw = base_config(URLS, **routing)
    for entry in raw["models"]:
        entry.update((models or {}).get(entry["name"], {}))
    return Config.model_validate(raw)


class Changes:
    """An `on_change` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def policy_for(cfg: Config, changes: Changes | None = None) -> RoutingPolicy:
    return load_policy(cfg, changes if changes is not None else Changes())


def ctx(
    score: float | None = 0.1,
    *,
    api: ApiName = "chat",
    requested: str = "auto",
    override: str | None = None,
    tokens: int = 10,
    needs: tuple[Capability, ...] = (),
    key: str | None = None,
) -> RequestContext:
    return RequestContext(api, requested, override, score, tokens, frozenset(needs), key)


def test_registry_and_loader() -> None:
    assert POLICIES["threshold"] is ThresholdPolicy
    cfg = config()
    assert cfg.routing.policy == "threshold"
    policy = load_policy(cfg, Changes())
    assert isinstance(policy, ThresholdPolicy)
    assert policy.thresholds() == {"student-small": 0.3, "student-large": 0.5}


def test_scores_pick_the_first_student_below_its_threshold() -> None:
    policy = policy_for(config())
    assert policy.decide(ctx(0.1)).model.name == "student-small"
    assert policy.decide(ctx(0.4)).model.name == "student-large"
    top = policy.decide(ctx(0.7))
    assert (top.model.name, top.reason, top.score) == ("teacher", "classifier", 0.7)


def test_needs_score() -> None:
    policy = policy_for(config())
    assert policy.needs_score("auto", None, "chat")
    assert policy.needs_score("auto", None, "messages")
    assert not policy.needs_score("auto", None, "embeddings")
    assert not policy.needs_score("student-small", None, "chat")  # pinned
    assert not policy.needs_score("teacher", None, "responses")
    assert not policy.needs_score("auto", "teacher", "chat")  # the override header decides
    # With the header ignored, an override does not decide, so the score does.
    ignoring = policy_for(config(allow_override_header=False))
    assert ignoring.needs_score("auto", "teacher", "chat")
    assert ignoring.decide(ctx(0.1, override="teacher")).model.name == "student-small"


@pytest.mark.parametrize("needs", [("vision",), ("tools", "json_schema"), ("vision", "tools", "json_schema")])
def test_named_models_skip_capability_and_size_checks(needs: tuple[Capability, ...]) -> None:
    no_caps = {"capabilities": {"vision": False, "tools": False, "json_schema": False}}
    policy = policy_for(config({"student-small": no_caps}))
    # Routed, such a request skips student-small: it cannot take it.
    routed = policy.decide(ctx(0.1, needs=needs))
    assert routed.model.name != "student-small"
    assert routed.reason == "capability"
    # Named, the client chose: far past the 200-token window and needing what it lacks.
    pinned = policy.decide(ctx(None, requested="student-small", tokens=50_000, needs=needs))
    assert (pinned.model.name, pinned.reason, pinned.score) == ("student-small", "pinned", None)
    override = policy.decide(ctx(0.9, override="student-small", tokens=50_000, needs=needs))
    assert (override.model.name, override.reason) == ("student-small", "override")


def test_context_window_skips_students() -> None:
    policy = policy_for(config())
    assert policy.decide(ctx(0.1, tokens=200)).model.name == "student-small"
    over_small = policy.decide(ctx(0.1, tokens=201))
    assert (over_small.model.name, over_small.reason) == ("student-large", "context")
    over_both = policy.decide(ctx(0.1, tokens=8001))
    assert (over_both.model.name, over_both.reason) == ("teacher", "context")


def test_estimate_counts_images_by_setting() -> None:
    assert policy_for(config()).estimate_tokens(4000, images=2) == 1000 + 2 * 1000
    assert policy_for(config(image_tokens=9000)).estimate_tokens(10, images=1) == 3 + 9000
    assert policy_for(config(chars_per_token=2.0)).estimate_tokens(4000) == 2000


def test_student_without_the_api_or_chat_is_skipped_for_it() -> None:
    cfg = config({"student-small": {"api": ["messages"]}})
    policy = policy_for(cfg)
    small = cfg.models[0]
    assert not policy.serves(small, "chat")
    assert policy.serves(small, "messages")
    for api in ("chat", "completions", "responses"):
        decision = policy.decide(ctx(0.1, api=api))
        assert (decision.model.name, decision.reason) == ("student-large", "capability"), api
    native = policy.decide(ctx(0.1, api="messages"))
    assert (native.model.name, native.reason) == ("student-small", "classifier")
    # Named for a format it cannot serve, it is the client's error.
    with pytest.raises(InvalidRequest, match="does not serve the chat API"):
        policy.decide(ctx(None, requested="student-small"))


def test_chat_speaker_serves_other_formats_through_chat() -> None:
    policy = policy_for(config())
    for api in ("messages", "responses"):
        decision = policy.decide(ctx(0.1, api=api))
        assert (decision.model.name, decision.reason) == ("student-small", "classifier")


def test_embeddings_are_unscored() -> None:
    raw = base_config(URLS)
    raw["models"].append(
        {"name": "embedder", "role": "embedding", "endpoints": [URLS["large"]], "upstream_model": "e5"}
    )
    changes = Changes()
    policy = policy_for(Config.model_validate(raw), changes)
    decision = policy.decide(ctx(None, api="embeddings"))
    assert (decision.model.name, decision.reason, decision.score) == ("embedder", "unscored", None)
    with pytest.raises(InvalidRequest, match="does not serve the embeddings API"):
        policy.decide(ctx(None, api="embeddings", requested="student-small"))
    assert changes.calls == 0


def test_share_controller_feedback_is_the_policys() -> None:
    changes = Changes()
    policy = policy_for(config(target_student_share=0.5, share_window=100, share_update_every=25), changes)
    assert policy.decide(ctx(0.25)).model.name == "student-small"  # 0.25 < 0.3
    # Every request scores 0.1 and goes to a student: the controller lowers the thresholds
    # toward the median score so only about half would.
    for _ in range(99):
        assert policy.decide(ctx(0.1)).model.role == "student"
    assert changes.calls == 4  # once every 25 scored decisions
    thresholds = policy.thresholds()
    assert thresholds["student-large"] < 0.25
    assert thresholds["student-small"] / thresholds["student-large"] == pytest.approx(0.3 / 0.5)
    assert policy.decide(ctx(0.25)).model.name == "teacher"
    # Decisions that did not use the score teach it nothing.
    for _ in range(100):
        policy.decide(ctx(None, requested="teacher"))
        policy.decide(ctx(0.9, override="student-small"))
    assert changes.calls == 4
    assert policy.thresholds() == thresholds


def test_without_a_target_the_thresholds_stay() -> None:
    changes = Changes()
    policy = policy_for(config(share_update_every=10), changes)
    for _ in range(50):
        policy.decide(ctx(0.1))
    # The share is still reported (for the metric) but nothing moves.
    assert changes.calls == 5
    assert policy.observed_share == 1.0
    assert policy.thresholds() == {"student-small": 0.3, "student-large": 0.5}
