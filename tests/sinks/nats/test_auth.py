"""The ``nats`` sink against a private nats-server that requires a user and password: the
password comes from a file read at start (a file gone by then is a start-up error), and a
server that refuses the credentials makes the events a sink fault, never a dead letter."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.components import OutcomeKind
from edge.errors import FatalStartupError
from tests.nats.support import unique
from tests.sinks.nats.support import event, open_sink, read_stream, stored

AUTH = 'authorization { user: gw, password: "pw-9f3" }\n'


def _extra(password_file: Path) -> str:
    return ("auth: {type: user_password, user: gw, password_file: "
            f"{password_file}}}\ncreate_stream: {{storage: memory}}\n")


async def test_user_and_password_file_publish_into_jetstream(nats_servers, tmp_path: Path):
    server = nats_servers(AUTH)
    (tmp_path / "pw").write_text("pw-9f3\n")
    name = unique("EDGE_")
    async with open_sink(name, "t.{site}.p{partition}.{type}", url=server.url,
                         extra=_extra(tmp_path / "pw")) as sink:
        outcomes = await sink.send(stored([event("inspection.result", "A", n)
                                           for n in range(3)]))
        assert [o.kind for o in outcomes] == [OutcomeKind.delivered] * 3
        assert sink._js is not None
        msgs = await read_stream(sink._js, name)
    assert [m.doc["data"]["n"] for m in msgs] == [0, 1, 2]


async def test_refused_credentials_are_a_sink_fault(nats_servers, tmp_path: Path):
    server = nats_servers(AUTH)
    (tmp_path / "pw").write_text("wrong\n")
    async with open_sink(unique("EDGE_"), "t.{site}.p{partition}.{type}", url=server.url,
                         extra=_extra(tmp_path / "pw")) as sink:
        outcomes = await sink.send(stored([event("inspection.result", "A", n)
                                           for n in range(2)]))
    assert [o.kind for o in outcomes] == [OutcomeKind.sink_fault] * 2
    assert outcomes[0].reason.startswith("auth:")
    assert "wrong" not in outcomes[0].reason


async def test_a_password_file_gone_at_start_is_a_start_up_error(tmp_path: Path):
    from edge.components import ComponentContext
    from edge.config import load_config_text
    from edge.sinks.nats.sink import NatsSink
    from edge.telemetry import Metrics
    from tests.sinks.nats.support import nats_sink_yaml

    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    cfg = load_config_text("site: s\n" + nats_sink_yaml("S", "t.{site}.{type}",
                                                         extra=_extra(pw)))
    pw.unlink()  # e.g. a systemd credential that was not provisioned
    sink = NatsSink(cfg.sinks[0], ComponentContext(site="s", state_dir=".", metrics=Metrics()))
    with pytest.raises(FatalStartupError, match="password_file"):
        await sink.start()
