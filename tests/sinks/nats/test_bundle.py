"""The ``nats`` sink's bundle agrees with its code: every option of the config model (the
connection, auth, TLS, create_stream, retry, circuit breaker and storm guard models
included) is documented in ``README.md``, and ``sample.yaml`` and the README's example
load as a gateway config; bad values are refused at load with the field named."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

import edge.sinks.nats
from edge.config import SinkConfigBase, deprecations, load_config_text
from edge.errors import ConfigError
from edge.nats.config import NatsConnection
from edge.sinks.nats import CreateStreamConfig, NatsSinkConfig
from edge.sinks.nats.config import default_stream_subjects
from tests.support import config_models, config_options

BUNDLE = Path(edge.sinks.nats.__file__).parent
README = (BUNDLE / "README.md").read_text()
ENV = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-gateway.service"}

MODELS = config_models(NatsSinkConfig)
OPTIONS = config_options(MODELS)


def test_the_walk_reaches_every_nested_model() -> None:
    assert {"NatsSinkConfig", "CreateStreamConfig", "TlsConfig", "UserPasswordAuth",
            "TokenAuth", "NkeyAuth", "CredsAuth", "RetryConfig", "CircuitBreakerConfig",
            "StormGuardConfig"} <= set(MODELS)


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_every_option_is_in_the_readme(model: str, option: str) -> None:
    assert f"`{option}`" in README, f"{model}.{option} is not documented in {BUNDLE}/README.md"


@pytest.mark.parametrize("auth_type", ["none", "user_password", "token", "nkey", "creds"])
def test_every_auth_type_is_in_the_readme(auth_type: str) -> None:
    assert f"| `{auth_type}` |" in README


def _load(sinks_block: str) -> typing.Any:
    return load_config_text("site: plant-01\n" + sinks_block, env=ENV, check_files=False)


def test_the_sample_is_a_complete_sink() -> None:
    cfg = _load((BUNDLE / "sample.yaml").read_text())
    assert deprecations(cfg) == []
    [sink] = cfg.sinks
    assert isinstance(sink, NatsSinkConfig)
    assert sink.auth.type == "user_password"
    assert sink.auth.password_file == ENV["CREDENTIALS_DIRECTORY"] + "/nats"
    assert sink.tls is not None and sink.tls.ca_file
    own = set(NatsSinkConfig.model_fields) - set(SinkConfigBase.model_fields)
    assert own - sink.model_fields_set == set()
    assert sink.create_stream is not None
    assert set(CreateStreamConfig.model_fields) - sink.create_stream.model_fields_set == set()
    assert set(NatsConnection.model_fields) <= own


def test_the_readme_examples_load() -> None:
    [example] = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    [sink] = _load(example).sinks
    assert isinstance(sink, NatsSinkConfig)
    assert sink.stream == "EDGE_EVENTS" and sink.partitions == 16
    assert sink.events == ["*"] and sink.create_stream is None


@pytest.mark.parametrize(("extra", "location", "words"), [
    ("subject: 'plant.{site}.{lot}'", "subject", "unknown placeholder"),
    ("subject: 'plant.*.{type}'", "subject", "not a valid subject token"),
    ("subject: 'plant..{type}'", "subject", "not a valid subject token"),
    ("subject: '$JS.{type}'", "subject", "reserved"),
    ("stream: 'EDGE.EVENTS'", "stream", "letters"),
    ("partitions: 0", "partitions", "greater than or equal to 1"),
    ("events: []", "events", "at least 1"),
    ("servers: ['http://127.0.0.1:4222']", "servers", "nats:// or tls://"),
    ("auth: {type: token, token: abc}", "auth.token.token", "unknown key"),
    ("create_stream: {replicas: 7}", "create_stream.replicas", "less than or equal"),
    ("create_stream: {discard: drop}", "create_stream.discard", "must be one of new, old"),
])
def test_bad_values_are_refused_at_load_naming_the_field(extra: str, location: str,
                                                          words: str) -> None:
    text = "sinks:\n  - id: js\n    type: nats\n    stream: EDGE_EVENTS\n"
    for line in extra.split("\n"):
        key = line.split(":")[0]
        text = re.sub(rf"\n    {key}: .*", "", text)
        text += f"    {line}\n"
    with pytest.raises(ConfigError) as err:
        _load(text)
    assert f"sinks[0].{location}" in str(err.value)
    assert words in str(err.value)


def test_the_stream_is_required() -> None:
    with pytest.raises(ConfigError, match=r"sinks\[0\]\.stream"):
        _load("sinks:\n  - {id: js, type: nats}\n")


@pytest.mark.parametrize(("template", "subjects"), [
    ("plant.{site}.p{partition}.{type}", ["plant.plant-01.*.>"]),
    ("edge.{site}.{class}.{source}", ["edge.plant-01.*.*"]),
    ("{type}", [">"]),
    ("x.{partition}.y.{type}.z", ["x.*.y.>"]),
])
def test_create_stream_derives_subjects_covering_the_template(template: str,
                                                              subjects: list[str]) -> None:
    assert default_stream_subjects(template, "plant-01") == subjects


@pytest.mark.parametrize(("patterns", "event_type", "expected"), [
    (["*"], "quality.hold", True),
    (["quality.hold"], "quality.hold", True),
    (["quality.*"], "quality.hold", True),
    (["quality.*"], "quality", False),
    (["quality.hold"], "quality.release", False),
])
def test_events_match_event_types_like_every_sink(patterns: list[str], event_type: str,
                                                   expected: bool) -> None:
    cfg = NatsSinkConfig(id="js", type="nats", stream="S", events=patterns)
    assert cfg.matches(event_type) is expected
