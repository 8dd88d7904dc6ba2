"""``type: http_poll`` — poll a station's JSON endpoint; each new record becomes one event.

An example of an installable source plugin: one package, one entry point
(``pyproject.toml``), built only on ``edge.plugin``.

The station answers ``GET <url>?after=<last id>`` with a JSON array of records (objects)
in ascending order of their ``id_field``. Contract (DESIGN invariants 1 and 3):

- The cursor (the last stored record's id) is written to ``state_dir`` only after the
  outbox committed the records: that is this source's acknowledgement. A crash between the
  commit and the cursor write re-reads the records, and the record id, given to the outbox
  as an identity ``dedupe_key``, maps each one to the event stored the first time.
- Backpressure: while the outbox refuses events the cursor stays and polling waits; the
  station keeps the records.
- An unreachable station, an error status or an answer that is not an array of objects
  with ``id_field`` stores nothing: it is logged, shown as a condition on ``/status``, and
  polled again after ``interval_s``.

Importing this package is cheap (the config model only); httpx is imported by the factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from edge.plugin import ComponentType, SourceConfigBase

if TYPE_CHECKING:
    from edge.plugin import ComponentContext, Source

__all__ = ["COMPONENT", "HttpPollConfig"]


class HttpPollConfig(SourceConfigBase):
    type: Literal["http_poll"]
    url: str = Field(description="the station's endpoint: answers a JSON array of records")
    event: str = Field(description="event type of each record, e.g. inspection.result")
    id_field: str = Field("id", description="record field that numbers the records")
    cursor_param: str = Field("after", description="query parameter carrying the last id")
    interval_s: float = Field(5.0, gt=0, description="wait between polls that found nothing")
    timeout_s: float = Field(10.0, gt=0, description="limit of one request")
    max_records: int = Field(1000, ge=1, description="records stored per poll at most")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {v!r}")
        if parts.username or parts.password:
            raise ValueError("must not contain credentials")
        return v


def _factory(config: HttpPollConfig, ctx: ComponentContext) -> Source:
    from edge_http_poll.source import HttpPollSource  # httpx only when the type is used

    return HttpPollSource(config, ctx)


COMPONENT = ComponentType(
    kind="source",
    type="http_poll",
    config_model=HttpPollConfig,
    factory=_factory,
    description="poll a JSON endpoint; a cursor in state_dir is advanced after the commit",
)
