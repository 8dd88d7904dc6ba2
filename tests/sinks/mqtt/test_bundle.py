"""The ``mqtt`` sink's bundle agrees with its code: every option of the config model (the
nested route, TLS, retry, circuit breaker and storm guard models included) is documented
in ``README.md``, and ``sample.yaml`` and the README's example load as a gateway config.

A README that drifts from the code is a defect: these tests fail when an option is added
without documenting it, or when the sample stops loading or leaves an option out.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

import edge.sinks.mqtt
from edge.config import SinkConfigBase, deprecations, load_config_text
from edge.sinks.mqtt import MqttRouteConfig, MqttSinkConfig
from tests.support import config_models, config_options

BUNDLE = Path(edge.sinks.mqtt.__file__).parent
README = (BUNDLE / "README.md").read_text()
ENV = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-gateway.service"}


MODELS = config_models(MqttSinkConfig)
OPTIONS = config_options(MODELS)


def test_the_walk_reaches_every_nested_model() -> None:
    assert {"MqttSinkConfig", "MqttRouteConfig", "TlsConfig", "RetryConfig",
            "CircuitBreakerConfig", "StormGuardConfig"} <= set(MODELS)


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_every_option_is_in_the_readme(model: str, option: str) -> None:
    assert f"`{option}`" in README, f"{model}.{option} is not documented in {BUNDLE}/README.md"


@pytest.mark.parametrize("old", sorted(
    old for model in MODELS.values() for old in getattr(model, "renamed_keys", {})))
def test_every_deprecated_name_is_in_the_readme(old: str) -> None:
    assert f"`{old}`" in README


def _load(sinks_block: str) -> typing.Any:
    return load_config_text("site: plant-01\n" + sinks_block, env=ENV, check_files=False)


def test_the_sample_is_a_complete_sink() -> None:
    cfg = _load((BUNDLE / "sample.yaml").read_text())
    assert deprecations(cfg) == []
    [sink] = cfg.sinks
    assert isinstance(sink, MqttSinkConfig)
    assert sink.password_file == ENV["CREDENTIALS_DIRECTORY"] + "/mqtt-holds"
    assert sink.tls is not None and sink.tls.ca_file
    # every key of the sink is set, and every route key in some route
    own = set(MqttSinkConfig.model_fields) - set(SinkConfigBase.model_fields)
    assert own - sink.model_fields_set == set()
    used = set().union(*(r.model_fields_set for r in sink.routes))
    assert set(MqttRouteConfig.model_fields) - used == set()


def test_the_readme_example_loads() -> None:
    [example] = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    [sink] = _load(example).sinks
    assert isinstance(sink, MqttSinkConfig)


@pytest.mark.parametrize(("patterns", "event_type", "expected"), [
    (["*"], "quality.hold", True),
    (["quality.hold"], "quality.hold", True),
    (["quality.*"], "quality.hold", True),
    (["quality.*"], "quality", False),
    (["quality.hold"], "quality.release", False),
])
def test_routes_match_event_types_like_every_sink(patterns: list[str], event_type: str,
                                                   expected: bool) -> None:
    route = MqttRouteConfig(events=patterns, topic="plant/{site}/x")
    assert route.matches(event_type) is expected
