"""MQTT topic templates (shared by the source and the sink): parse, filter, match."""

from __future__ import annotations

import pytest

from edge.mqtt.topics import CompiledTopic, TopicTemplate

INSPECTION = "plant/{site}/line/{line}/station/{station}/inspection"


@pytest.mark.parametrize(("template", "fragment"), [
    ("plant/st-{station}/x", "must be a whole topic level"),
    ("plant/#/x", "'#' must be the last level"),
    ("plant/{a}/{a}", "used twice"),
    ("plant/{9x}", "not a valid {name}"),
    ("", "must not be empty"),
])
def test_bad_topic_templates(template: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("{", r"\{").replace("}", r"\}")):
        TopicTemplate.parse(template)


def test_site_is_filled_from_the_gateway_and_names_are_captured() -> None:
    t = CompiledTopic.build(TopicTemplate.parse(INSPECTION), "plant-01")
    assert t.filter == "plant/plant-01/line/+/station/+/inspection"
    assert t.match("plant/plant-01/line/3/station/st7/inspection") == {"line": "3",
                                                                      "station": "st7"}
    assert t.match("plant/plant-02/line/3/station/st7/inspection") is None
    assert t.match("plant/plant-01/line/3/station/st7") is None
    assert t.match("plant/plant-01/line/3/station/st7/inspection/x") is None


def test_plus_and_hash_match_without_capturing() -> None:
    t = CompiledTopic.build(TopicTemplate.parse("a/+/{b}/#"), "s")
    assert t.filter == "a/+/+/#"
    assert t.match("a/x/y") == {"b": "y"}
    assert t.match("a/x/y/z/w") == {"b": "y"}
    assert t.match("$SYS/x/y") is None


def test_hash_also_matches_the_parent_level_and_sites_are_literal() -> None:
    t = CompiledTopic.build(TopicTemplate.parse("a/{b}/#"), "s")
    assert t.match("a/x") == {"b": "x"}
    assert t.match("a") is None
    assert CompiledTopic.build(TopicTemplate.parse("#"), "s").match("$SYS/x") is None
    dotted = CompiledTopic.build(TopicTemplate.parse("p/{site}/x"), "plant.01")
    assert dotted.match("p/plant.01/x") == {} and dotted.match("p/plantX01/x") is None
    assert dotted.match("p/plant.01/x\n") is None
