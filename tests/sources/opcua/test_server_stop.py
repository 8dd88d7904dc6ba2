"""A station server stopped cleanly (an update, a restart from its HMI) is an outage like
any other: the source logs ``connection lost`` once and reconnects; asyncua's publish loop
adds no traceback for the session the server closed on its way down. (Seen in the fault
campaign's gateway logs after a SIGTERM to an asyncua station: ``Publish iteration
crashed`` with ``BadSessionClosed``; whether the loop sees that status or the closed
socket first depends on timing, so the record asyncua writes is replayed here.)"""

from __future__ import annotations

import logging

import pytest
from asyncua import ua

import edge.sources.opcua.source  # noqa: F401 - installs the filter on asyncua's loggers

SESSION_LOG = "asyncua.client.ua_session.UaSession"


def _publish_loop_crash(exc: Exception) -> None:
    """What asyncua's publish loop logs when a Publish fails (ua_session._publish_loop)."""
    try:
        raise exc
    except Exception:  # noqa: BLE001 - replaying asyncua's own handler
        logging.getLogger(SESSION_LOG).exception("Publish iteration crashed; retrying in 1s")


@pytest.mark.parametrize("exc", [ua.uaerrors.BadSessionClosed(), ua.uaerrors.BadShutdown(),
                                 ua.uaerrors.BadServerHalted(), ConnectionError("closed")])
def test_a_server_going_away_adds_no_publish_traceback(exc: Exception, caplog) -> None:
    caplog.set_level(logging.WARNING)
    _publish_loop_crash(exc)
    assert not [r for r in caplog.records if r.getMessage().startswith("Publish iteration")]


def test_other_publish_failures_stay_visible(caplog) -> None:
    caplog.set_level(logging.WARNING)
    _publish_loop_crash(ua.uaerrors.BadDecodingError())
    assert [r for r in caplog.records if r.getMessage().startswith("Publish iteration")]
