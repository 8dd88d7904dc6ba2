"""The relay's README documents every key of the ``relay:`` section (and nothing else
claims a key the model does not have)."""

from __future__ import annotations

import re
from pathlib import Path

from edge.relay.config import RelayConfig

README = Path(__file__).resolve().parents[2] / "edge" / "relay" / "README.md"


def test_every_relay_option_is_in_the_readme_table() -> None:
    text = README.read_text()
    table = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M))
    fields = set(RelayConfig.model_fields)
    assert fields - table == set(), "options missing from the README"
    assert table - fields == set(), "the README names options the model does not have"
