"""MQTT source config: validated at load with located messages (topic templates: tests/mqtt)."""

from __future__ import annotations

import textwrap

import pytest

from edge.config import load_config_text
from edge.errors import ConfigError

INSPECTION = "plant/{site}/line/{line}/station/{station}/inspection"


def load(source_body: str, *, check_files: bool = False) -> object:
    text = "site: plant-01\nstate_dir: state\napi: {enabled: false}\nsources:\n" + \
        textwrap.indent(textwrap.dedent(source_body), "  ")
    return load_config_text(text, check_files=check_files)


def issues(source_body: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(source_body)
    return [str(i) for i in info.value.issues]


def source(extra: str = "", sub_extra: str = "", url: str = "mqtt://127.0.0.1:1883") -> str:
    return textwrap.dedent(f"""\
        - id: line1
          type: mqtt
          url: {url}
        """) + textwrap.indent(textwrap.dedent(extra), "  ") + textwrap.indent(
        textwrap.dedent(f"""\
        subscriptions:
          - topic: {INSPECTION}
            event: inspection.result
            ordering_key: "lot:{{lot_id}}"
            fields: {{lot_id: lot, serial: sn, result: result}}
        """) + textwrap.indent(textwrap.dedent(sub_extra), "    "), "  ")


def test_the_design_example_loads_with_defaults() -> None:
    cfg = load(source())
    src = cfg.sources[0]  # type: ignore[attr-defined]
    assert src.protocol == "5"
    assert src.port == 1883 and src.host == "127.0.0.1"
    assert src.subscriptions[0].qos == 1
    assert src.max_payload_bytes == 256 * 1024


def test_qos_2_is_refused_with_the_reason() -> None:
    found = issues(source(sub_extra="qos: 2\n"))
    assert len(found) == 1
    assert found[0].startswith("sources[0].subscriptions[0].qos: must be 0 or 1, got 2")


@pytest.mark.parametrize(("given", "expected"), [
    ('"3.1.1"', "3.1.1"), ("311", "3.1.1"), ("5", "5"), ('"5"', "5"), ("5.0", "5"),
])
def test_protocol_spellings(given: str, expected: str) -> None:
    cfg = load(source(extra=f"protocol: {given}\n"))
    assert cfg.sources[0].protocol == expected  # type: ignore[attr-defined]


def test_unknown_protocol_is_located() -> None:
    assert issues(source(extra="protocol: 4\n")) == [
        "sources[0].protocol: must be 3.1.1 or 5, got 4"]


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://127.0.0.1:1883", "must start with mqtt:// or mqtts://"),
    ("mqtt://:1883", "needs a host"),
    ("mqtt://user:pw@broker:1883", "credentials do not belong in the url"),
    ("mqtt://broker:1883/x", "without a path"),
])
def test_bad_urls(url: str, fragment: str) -> None:
    found = issues(source(url=url))
    assert found and found[0].startswith("sources[0].url: ") and fragment in found[0]


def test_tls_needs_mqtts() -> None:
    found = issues(source(extra="tls: {ca_file: ca.pem}\n"))
    assert any("use mqtts://" in f for f in found)


def test_secret_files_are_checked_at_load() -> None:
    with pytest.raises(ConfigError) as info:
        load(source(extra="username: gw\npassword_file: missing-secret\n"), check_files=True)
    assert any(i.location == "sources[0].password_file" and "file not found" in i.message
               for i in info.value.issues)


def test_unknown_key_lists_the_allowed_ones() -> None:
    found = issues(source(extra="keepalive: 5\n"))
    assert found[0].startswith("sources[0].keepalive: unknown key (allowed: ")
    assert "keepalive_s" in found[0]


def test_ordering_key_must_name_a_known_field() -> None:
    found = issues(source(sub_extra='dedupe_key: "{serial_no}"\n'))
    assert "dedupe_key uses {serial_no}" in found[0]
    # captures, static fields and site are fine
    load(source(sub_extra='dedupe_key: "{station}:{serial}:{site}"\n'))


def test_duplicate_topics_are_refused() -> None:
    body = source() + textwrap.indent(textwrap.dedent(f"""\
          - topic: {INSPECTION}
            event: machine.reading
        """), "    ")
    assert any("repeats subscriptions[0]" in f for f in issues(body))


def test_a_site_that_cannot_be_a_topic_level_is_refused() -> None:
    from edge.components import ComponentContext
    from edge.sources.mqtt import COMPONENT
    from edge.telemetry import Metrics

    text = "site: plant/01\nstate_dir: state\napi: {enabled: false}\nsources:\n" + \
        textwrap.indent(source(), "  ")
    cfg = load_config_text(text, check_files=False)
    ctx = ComponentContext(site=cfg.site, state_dir="state", metrics=Metrics(),
                           ingest=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"cannot fill \{site\}"):
        COMPONENT.factory(cfg.sources[0], ctx)  # type: ignore[attr-defined]
