"""Edge quality rules, as ``edge.config`` reads them; the logic is ``edge.quality``.

``rules:`` items are ``spec_limits`` (an out-of-spec result: nonconformance, and a hold
episode for its lot) and ``capa`` (repeated nonconformances of one supplier's
characteristic: one CAPA request); ``quality:`` holds the lot monitor's settings. See
``edge.quality.rules`` for the fields and ``docs/quality.md`` for the behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel

from edge.quality.engine import QualityRules
from edge.quality.rules import CapaRule, QualityConfig, RuleConfig, SpecLimitsRule

__all__ = ["CapaRule", "QualityConfig", "QualityRules", "RuleConfig", "SpecLimitsRule",
           "build_rules"]


def build_rules(configs: Iterable[BaseModel], site: str) -> QualityRules:
    """The configured rules as the pipeline applies them (``edge.quality.engine``)."""
    return QualityRules(configs, site)
