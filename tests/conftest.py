"""Shared fixtures: fake upstream model servers and a gateway in front of them, on real sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from classifiers.heuristic import HeuristicScorer
from router.app import create_app
from router.config import Config
from tests.fake_upstream import FakeState, make_fake
from tests.loopback import serve


@dataclass
class Upstreams:
    """Two fake students and a fake teacher, each with its own state and URL."""

    small: FakeState
    large: FakeState
    teacher: FakeState
    urls: dict[str, str]


@dataclass
class Gateway:
    """A running gateway: its base URL, config and metrics registry."""

    url: str
    config: Config
    registry: CollectorRegistry
    app: Any = None  # the ASGI app (its `state.recorder` holds the request records)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@pytest.fixture(scope="session")
def _upstream_servers() -> Iterator[Upstreams]:
    states = [FakeState("small"), FakeState("large"), FakeState("teacher")]
    with ExitStack() as stack:
        urls = {s.name: stack.enter_context(serve(make_fake(s))) for s in states}
        yield Upstreams(states[0], states[1], states[2], urls=urls)


@pytest.fixture
def upstreams(_upstream_servers: Upstreams) -> Upstreams:
    """The fake upstreams, reset to well-behaved for each test."""
    for state in (_upstream_servers.small, _upstream_servers.large, _upstream_servers.teacher):
        state.reset()
    return _upstream_servers


def base_config(urls: dict[str, str], **routing: Any) -> dict[str, Any]:
    """A three-model config (two students, one teacher) pointing at the fakes."""
    return {
        "models": [
            {
                "name": "student-small",
                "role": "student",
                "endpoints": [urls["small"] + "/v1"],
                "upstream_model": "up-small",
                "max_score": 0.3,
                "context_window": 200,
                "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.2},
            },
            {
                "name": "student-large",
                "role": "student",
                "endpoints": [urls["large"] + "/v1"],
                "upstream_model": "up-large",
                "max_score": 0.5,
                "context_window": 8000,
                "price": {"input_per_mtok": 0.3, "output_per_mtok": 0.6},
            },
            {
                "name": "teacher",
                "role": "teacher",
                "endpoints": [urls["teacher"] + "/v1"],
                "upstream_model": "up-teacher",
                "read_timeout_s": 5,
                "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
            },
        ],
        "classifier": {"kind": "heuristic"},
        "routing": {"alias": "auto", "endpoint_cooldown_s": 0.5, **routing},
    }


GatewayFactory = Callable[[dict[str, Any]], AbstractContextManager[Gateway]]


@pytest.fixture
def make_gateway() -> GatewayFactory:
    """Start a gateway for a config dict; the context manager stops it."""

    @contextmanager
    def start(raw: dict[str, Any]) -> Iterator[Gateway]:
        config = Config.model_validate(raw)
        registry = CollectorRegistry()
        scorer = HeuristicScorer() if config.classifier.kind == "heuristic" else None
        app = create_app(config, scorer=scorer, registry=registry)
        with serve(app) as url:
            yield Gateway(url, config, registry, app)

    return start


@pytest.fixture
def gateway(upstreams: Upstreams, make_gateway: GatewayFactory) -> Iterator[Gateway]:
    with make_gateway(base_config(upstreams.urls)) as gw:
        yield gw
