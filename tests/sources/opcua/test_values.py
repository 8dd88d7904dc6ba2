"""Values, statuses and sample keys of the ``opcua`` source.

Timestamps in dedupe keys are written by ``edge.timefmt.iso_z``. A key that changed its
form between two versions would store a sample twice (read live before an upgrade, from
history after it), so these tests pin the exact text: the keys below were written by the
formatter ``iso_z`` replaced, ``ts.isoformat().replace("+00:00", "Z")``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asyncua import ua

from edge.sources.opcua.values import OVERFLOW_BITS, jsonable, sample_key, source_ts, status_name
from edge.timefmt import iso_z


def _former_iso(ts: datetime) -> str:
    """What the source wrote into keys before ``iso_z`` (kept here as the reference)."""
    return ts.isoformat().replace("+00:00", "Z")


AWARE = [
    datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC),
    datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=UTC),
    datetime(2026, 3, 1, 8, 0, 0, 500, tzinfo=UTC),
    datetime(1601, 1, 1, tzinfo=UTC),  # asyncua's "no time" (FILETIME 0)
    ua.win_epoch_to_datetime(133_500_001_234_567_891),  # as asyncua decodes a DateTime
]


@pytest.mark.parametrize("ts", AWARE, ids=str)
def test_timestamps_are_written_byte_for_byte_as_before(ts):
    assert iso_z(ts) == _former_iso(ts)


def test_asyncua_decodes_timestamps_as_aware_utc():
    # The guarantee the test above relies on: what comes off the wire is aware UTC.
    assert ua.win_epoch_to_datetime(133_500_000_000_000_000).utcoffset() == timedelta(0)


def test_a_naive_timestamp_is_keyed_as_utc_as_before():
    # Every timestamp the source formats went through source_ts (or the watermark
    # parser), which makes a naive one UTC: the key is what it always was.
    naive = datetime(2026, 3, 1, 8, 0, 0, 123000)
    ts = source_ts(ua.DataValue(ua.Variant(1.0), SourceTimestamp=naive))
    assert ts.tzinfo is not None
    assert iso_z(naive) == iso_z(ts) == _former_iso(ts) == "2026-03-01T08:00:00.123000Z"
    assert sample_key("ns=2;s=T", ts, 1.0, None) == sample_key("ns=2;s=T", naive, 1.0, None)


def test_sample_keys_keep_their_exact_form():
    tick = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
    micro = datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=UTC)
    good = ua.StatusCode(ua.UInt32(0))
    assert sample_key("ns=2;s=T", micro, 21.5, good) == \
        "ns=2;s=T@2026-03-01T08:00:00.123456Z#b22e42019b77"
    assert sample_key("ns=2;s=T", tick, [1, "x", None], None) == \
        "ns=2;s=T@2026-03-01T08:00:00Z#16907bc9022e"
    value = jsonable(datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    flagged = ua.StatusCode(ua.UInt32(0x408F0000 | OVERFLOW_BITS))
    assert sample_key("ns=2;s=T", tick, value, flagged) == \
        "ns=2;s=T@2026-03-01T08:00:00Z#6e7327f79d57"


def test_values_become_json():
    assert jsonable(ua.LocalizedText("hot", "en")) == "hot"
    assert jsonable([1, 2.5, True]) == [1, 2.5, True]
    assert jsonable(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2024-01-02T03:04:05Z"
    assert jsonable(datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05Z"  # naive = UTC
    assert jsonable(b"\x00\x01") == "AAE="
    assert jsonable(ua.NodeId("a", 2)) == "ns=2;s=a"
    assert jsonable(ua.QualifiedName("Temp", 2)) == "2:Temp"
    assert jsonable(ua.Range(Low=0.0, High=10.0)) == {"Low": 0.0, "High": 10.0}


@pytest.mark.parametrize("ts", AWARE, ids=str)
def test_datetime_values_are_written_as_before(ts):
    assert jsonable(ts) == _former_iso(ts)


def test_status_names_show_a_server_queue_overflow():
    assert status_name(None) == "Good"
    assert status_name(ua.StatusCode(0x808C0000)) == "BadSensorFailure"
    assert status_name(ua.StatusCode(0x00000480)) == "Good|Overflow"
