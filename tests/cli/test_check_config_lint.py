"""``check-config`` warns about dead configuration (issue #13 item 7): a route no source,
rule or operator action feeds, a source mapping no route consumes, a rule reading a field no
mapping provides. Warnings are located, exit 0; ``--strict`` exits 1."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edge.cli.main import main
from edge.config import load_config, load_config_text
from edge.config_lint import lint

ROOT = Path(__file__).resolve().parents[2]

MQTT = """\
  - id: line1
    type: mqtt
    url: mqtt://127.0.0.1:1883
    subscriptions:
      - topic: plant/inspection
        event: inspection.result
        fields: {lot_id: lot, measured: value}
      - topic: raw/{device}
        event: machine.reading
"""


def cfg(sources: str = MQTT, sinks: str = "", rules: str = "") -> object:
    text = ("site: t\nsources:\n" + textwrap.dedent(sources)
            + "sinks:\n" + textwrap.indent(textwrap.dedent(sinks), "  ")
            + (("rules:\n" + textwrap.indent(textwrap.dedent(rules), "  ")) if rules else ""))
    return load_config_text(text, check_files=False)


def http(*routes: str, sink_id: str = "qms") -> str:
    items = "".join(f"    - {{events: {r}, method: POST, path: /x}}\n" for r in routes)
    return f"- id: {sink_id}\n  type: http\n  url: http://127.0.0.1:9/\n  routes:\n{items}"


def warnings(config: object) -> dict[str, str]:
    return {w.location: w.message for w in lint(config)}


def test_a_route_for_a_type_nothing_produces_is_a_warning():
    got = warnings(cfg(sinks=http("[inspection.result]", "[machine.reading, supplier.case]")))
    assert list(got) == ["sinks[0].routes[1].events"]
    assert "'supplier.case'" in got["sinks[0].routes[1].events"]
    assert "never sends" in got["sinks[0].routes[1].events"]


def test_a_rule_that_derives_the_type_feeds_the_route():
    rule = "- {type: spec_limits, events: [inspection.result], field: measured, upper: 1}\n"
    got = warnings(cfg(sinks=http("[inspection.result, machine.reading, supplier.case]"),
                       rules=rule))
    assert got == {}


def test_patterns_and_operator_decisions_are_never_dead():
    # lot.status and quality.release come from `edge lot release` even without rules
    got = warnings(cfg(sinks=http('["*"]', '["supplier.*"]', "[lot.status, quality.release]")))
    assert got == {}


def test_the_nats_sink_events_are_checked_too():
    nats = ("- {id: js, type: nats, servers: [nats://127.0.0.1:4222], stream: EDGE, "
            "subject: 'edge.{type}', events: [inspection.result, machine.reading, "
            "quality.hold]}\n")
    got = warnings(cfg(sinks=nats))
    assert list(got) == ["sinks[0].events"] and "'quality.hold'" in got["sinks[0].events"]


def test_a_subscription_no_route_consumes_is_a_warning():
    got = warnings(cfg(sinks=http("[inspection.result]")))
    assert list(got) == ["sources[0].subscriptions[1].event"]
    assert "'machine.reading'" in got["sources[0].subscriptions[1].event"]
    assert warnings(cfg(sinks=http("[inspection.result]", '["machine.*"]'))) == {}


def test_opcua_monitored_items_triggers_and_alarms_are_checked():
    opcua = """\
      - id: station7
        type: opcua
        endpoint: opc.tcp://127.0.0.1:4840
        monitored:
          - {node: "ns=2;s=T", event: machine.reading}
        triggers:
          - {node: "ns=2;s=Done", event: inspection.result, read: {lot_id: "ns=2;s=Lot"}}
        alarms:
          - {}
    """
    got = warnings(cfg(sources=opcua, sinks=http("[inspection.result]")))
    assert set(got) == {"sources[0].monitored[0].event", "sources[0].alarms[0].event"}
    assert "'machine.alarm'" in got["sources[0].alarms[0].event"]


def test_a_rule_reading_a_field_no_mapping_provides_is_a_warning():
    sinks = http('["*"]')
    rule = "- {type: spec_limits, events: [inspection.result], field: diameter, upper: 1}\n"
    got = warnings(cfg(sinks=sinks, rules=rule))
    assert list(got) == ["rules[0].field"] and "'diameter'" in got["rules[0].field"]
    # a mapping with no explicit fields passes the whole payload: it might provide it
    loose = MQTT + "      - {topic: other/results, event: inspection.result}\n"
    assert warnings(cfg(sources=loose, sinks=sinks, rules=rule)) == {}
    # static fields count
    fixed = MQTT.replace("{lot_id: lot, measured: value}",
                         "{lot_id: lot, measured: value}\n        static: {diameter: 10}")
    assert warnings(cfg(sources=fixed, sinks=sinks, rules=rule)) == {}


@pytest.mark.parametrize("name", ["plant.example.yaml", "demo.yaml"])
def test_the_shipped_configs_have_no_dead_configuration(name: str):
    config = load_config(ROOT / "config" / name, check_files=False,
                         env={"CREDENTIALS_DIRECTORY": "/creds"})
    assert lint(config) == []


def test_check_config_prints_warnings_and_strict_exits_1(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "edge.yaml"
    path.write_text("site: t\nsources:\n" + MQTT + "sinks:\n"
                    + textwrap.indent(http("[inspection.result]"), "  "))
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: sources[0].subscriptions[1].event: no sink route consumes" in err
    assert main(["check-config", "--strict", str(path)]) == 1
    assert "--strict" in capsys.readouterr().err
