"""The bundle's README and sample agree with the code: every option of the config models is
documented, the response policy table gives every status the outcome ``judge_response``
gives it, and ``sample.yaml`` and the README's example load as a gateway config.

A README that drifts from the code is a defect: these tests fail when an option is added
without documenting it, or a status moves between the policy sets without the table.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

import edge.sinks.http
from edge.components import OutcomeKind
from edge.config import deprecations, load_config_text
from edge.sinks.http.auth import REFRESH_STATUSES
from edge.sinks.http.config import HttpSinkConfig, OAuth2Auth
from edge.sinks.http.request import RETRY_STATUSES, SINK_FAULT_4XX, judge_response
from edge.sinks.http.transport import Reply
from tests.support import config_models, config_options

BUNDLE = Path(edge.sinks.http.__file__).parent
README = (BUNDLE / "README.md").read_text()
ENV = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-gateway.service"}
DUPLICATE_STATUSES = HttpSinkConfig.model_fields["duplicate_statuses"].get_default(
    call_default_factory=True)


# ------------------------------------------------------------------ options


MODELS = config_models(HttpSinkConfig)
OPTIONS = config_options(MODELS)


def test_the_walk_reaches_every_nested_model():
    assert {"HttpSinkConfig", "RouteConfig", "NoAuth", "ApiKeyAuth", "BearerAuth",
            "OAuth2Auth", "TlsConfig", "RetryConfig", "CircuitBreakerConfig",
            "StormGuardConfig"} <= set(MODELS)


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_every_option_is_in_the_readme(model, option):
    assert f"`{option}`" in README, f"{model}.{option} is not documented in {BUNDLE}/README.md"


@pytest.mark.parametrize("kind", sorted(
    typing.get_args(model.model_fields["type"].annotation)[0]
    for model in MODELS.values() if model.__name__.endswith("Auth")))
def test_every_auth_kind_is_in_the_readme(kind):
    assert f"| `{kind}` |" in README


@pytest.mark.parametrize("old", sorted(
    old for model in MODELS.values() for old in getattr(model, "renamed_keys", {})))
def test_every_deprecated_name_is_in_the_readme(old):
    assert f"`{old}`" in README


# ------------------------------------------------------------------ response policy


def _policy_rows() -> list[tuple[str, OutcomeKind]]:
    """(answer cell, outcome) of every row of the README's response policy table."""
    section = README.split("\n## Response policy\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        kind = re.fullmatch(r"`(\w+)`", cells[1]) if len(cells) == 3 else None
        if kind:  # not the header, not the separator
            rows.append((cells[0], OutcomeKind(kind.group(1))))
    return rows


def _table() -> tuple[dict[int, OutcomeKind], dict[int, OutcomeKind], OutcomeKind]:
    """Statuses named in the table, status classes (``4xx`` → 4), and the outcome of
    "any status not listed". A status or class named in two rows fails here."""
    explicit: dict[int, OutcomeKind] = {}
    classes: dict[int, OutcomeKind] = {}
    default = None
    for answer, kind in _policy_rows():
        for first, last in re.findall(r"\b([1-5]\d\d)(?:\s*[–-]\s*([1-5]\d\d))?\b", answer):
            for status in range(int(first), int(last or first) + 1):
                assert status not in explicit, f"{status} is in two rows of the table"
                explicit[status] = kind
        for digit in re.findall(r"\b([1-5])xx\b", answer):
            assert int(digit) not in classes, f"{digit}xx is in two rows of the table"
            classes[int(digit)] = kind
        if "any status not listed" in answer:
            default = kind
    assert default is not None, "the table has no row for 'any status not listed'"
    return explicit, classes, default


def _judged(status: int) -> OutcomeKind:
    return judge_response(Reply(status, "", {}), DUPLICATE_STATUSES).kind


def test_the_table_has_its_rows():
    kinds = {kind for _, kind in _policy_rows()}
    assert kinds == {OutcomeKind.delivered, OutcomeKind.duplicate, OutcomeKind.retry,
                     OutcomeKind.dead_letter, OutcomeKind.sink_fault}


@pytest.mark.parametrize("status", sorted(
    RETRY_STATUSES | SINK_FAULT_4XX | REFRESH_STATUSES | set(DUPLICATE_STATUSES)))
def test_every_status_of_the_policy_code_is_named_in_the_table(status):
    explicit, _, _ = _table()
    assert status in explicit, f"{status} is missing from the README's response policy table"


def test_every_status_gets_the_outcome_the_table_gives_it():
    explicit, classes, default = _table()
    wrong = []
    for status in range(100, 600):
        documented = explicit.get(status) or classes.get(status // 100) or default
        if _judged(status) is not documented:
            wrong.append(f"{status}: README {documented.value}, code {_judged(status).value}")
    assert not wrong, "the README's response policy table disagrees with the code:\n" + \
        "\n".join(wrong)


# ------------------------------------------------------------------ sample and example


def _load(sinks_block: str):
    return load_config_text("site: plant-01\n" + sinks_block, env=ENV, check_files=False)


def test_the_sample_is_a_complete_erp_sink():
    cfg = _load((BUNDLE / "sample.yaml").read_text())
    assert deprecations(cfg) == []
    [sink] = cfg.sinks
    assert isinstance(sink, HttpSinkConfig)
    assert isinstance(sink.auth, OAuth2Auth)
    assert sink.auth.client_secret_file == ENV["CREDENTIALS_DIRECTORY"] + "/erp"
    assert sink.tls is not None and sink.tls.ca_file
    assert len(sink.routes) == 2
    assert [r.max_batch > 1 for r in sink.routes] == [False, True]


def test_the_readme_example_loads():
    [example] = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    [sink] = _load(example).sinks
    assert isinstance(sink, HttpSinkConfig)
