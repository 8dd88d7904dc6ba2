"""Test support in one place: waiting for a condition, reading a metric, ports, processes,
config builders and event builders.

Tests import helpers from here (pytest fixtures from ``tests/fixtures``), never from another
test module. Wait for the condition a user relies on (``eventually``); never sleep-then-assert.
A sleep is right only where a test proves that something does *not* happen within a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edge.components import Submission
from edge.events import make_event

# --------------------------------------------------------------------------- waiting


async def eventually(check: Callable[[], Any], *, timeout: float = 20.0, what: str = "",
                     interval: float = 0.02) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that.

    After ``timeout`` seconds the test fails with an ``AssertionError`` naming ``what``
    (an async ``check`` that hangs is cancelled at the deadline).
    """
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(interval)
    except TimeoutError:
        if not deadline.expired():
            raise  # the check's own timeout, not ours
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what or _describe(check)}") from None


def sample(gw: Any, name: str, **labels: str) -> float:
    """A gateway metric by the name and labels ``/metrics`` shows
    (``sample(gw, "edge_source_gaps_total", source="line1")``); 0 before its first use."""
    return float(gw.metrics.registry.get_sample_value(name, labels) or 0.0)


def config_models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """``root`` and every config model reachable through its fields, by class name (for
    the bundle tests that check a component's README documents every option)."""
    found: dict[str, type[BaseModel]] = {}
    pending: list[Any] = [root]
    while pending:
        tp = pending.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ not in found:
                found[tp.__name__] = tp
                pending.extend(f.annotation for f in tp.model_fields.values())
        else:
            pending.extend(typing.get_args(tp))
    return found


def config_options(models: dict[str, type[BaseModel]]) -> list[tuple[str, str]]:
    """(model name, option as written in YAML — the alias where there is one), sorted."""
    return sorted({(name, field.alias or option) for name, model in models.items()
                   for option, field in model.model_fields.items()})


def _describe(check: Callable[[], Any]) -> str:
    with contextlib.suppress(OSError, TypeError):
        return inspect.getsource(check).strip()
    return repr(check)


# --------------------------------------------------------------------------- metrics


def metric(collector: Any, *labels: str) -> float:
    """The current value of a prometheus counter or gauge (``labels`` in declaration order).

    Reads through the public collection API, so a test does not depend on the client's
    private fields: ``metric(gw.metrics.sink_paused, "erp")``.
    """
    child = collector.labels(*labels) if labels else collector
    for family in child.collect():
        for sample in family.samples:
            if sample.name in (family.name, family.name + "_total"):
                return float(sample.value)
    raise AssertionError(f"no sample in {collector!r} for labels {labels!r}")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0,
                 sig: int = signal.SIGTERM) -> int:
    """Stop a child process: ``sig`` (SIGTERM), wait up to ``timeout`` s, then SIGKILL.

    Returns the exit status (negative: the signal that ended it). A process that has
    already ended is only reaped.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


async def stop_async_process(proc: asyncio.subprocess.Process, timeout: float = 30.0,
                             sig: int = signal.SIGTERM) -> int:
    """``stop_process`` for a child made with ``asyncio.create_subprocess_exec``."""
    if proc.returncode is None:
        proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
    return await proc.wait()


async def run_edge(*args: str, cwd: Path | str,
                   env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m edge ARGS`` as an operator runs it: (exit status, stdout, stderr).

    The test process's own ``EDGE_API_TOKEN`` is not passed on; ``env`` adds variables.
    """
    base = {k: v for k, v in os.environ.items() if k != "EDGE_API_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", *args, cwd=cwd, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


# --------------------------------------------------------------------------- config builders


def api_yaml(port: int, *, token_file: str | None = None, hosts: list[str] | None = None,
             host: str = "127.0.0.1") -> str:
    """An ``api:`` block listening on ``host:port``."""
    token = f", token_file: {token_file}" if token_file else ""
    names = f", hosts: [{', '.join(repr(h) for h in hosts)}]" if hosts else ""
    listen = f"[{host}]" if ":" in host else host
    return f'api: {{listen: "{listen}:{port}"{token}{names}}}\n'


HTTP_ROUTES = ('[{events: [lot.status, quality.hold], method: PUT, '
               'path: "/lots/{data.lot_id}/status"}, '
               '{events: ["*"], method: POST, path: /events, max_batch: 50}]')


def http_sink_yaml(url: str, *, sink_id: str = "erp", extra: str = "",
                   routes: str = HTTP_ROUTES, max_backoff_s: float = 0.5,
                   max_open_s: float = 1.0) -> str:
    """One ``http`` sink as an item of a ``sinks:`` list, with fast retries.

    Default routes: lot status and holds PUT to ``/lots/{lot_id}/status``, everything else
    POSTed to ``/events`` in batches of up to 50. ``extra`` is YAML added to the sink.
    """
    return (f"  - id: {sink_id}\n"
            "    type: http\n"
            f"    url: {url}\n"
            f"    retry: {{initial_backoff_s: 0.05, max_backoff_s: {max_backoff_s:g}}}\n"
            "    circuit_breaker: {failure_threshold: 5, open_s: 0.2, "
            f"max_open_s: {max_open_s:g}}}\n"
            f"    routes: {routes}\n") + textwrap.indent(textwrap.dedent(extra), " " * 4)


def sink_yaml(url: str, *, max_batch: int = 1, extra: str = "", routes: str | None = None,
              sink_id: str = "erp") -> str:
    """A whole ``sinks:`` block with one ``http`` sink that POSTs every event to ``/events``
    in batches of ``max_batch`` (or ``routes``); retries and the circuit breaker are fast."""
    routes = routes or f'[{{events: ["*"], method: POST, path: /events, max_batch: {max_batch}}}]'
    return "sinks:\n" + http_sink_yaml(url, sink_id=sink_id, extra=extra, routes=routes,
                                       max_backoff_s=0.3, max_open_s=0.5)


def mqtt_source_yaml(url: str, *, protocol: str = "5", source_id: str = "line1",
                     client_id: str = "edge-test-line1", extra: str = "",
                     subscriptions: str | None = None,
                     reconnect_s: tuple[float, float] = (0.05, 0.5)) -> str:
    """A ``sources:`` block with one ``mqtt`` source and fast reconnects.

    Default subscriptions: inspection results under ``plant/{site}/line/{line}/station/
    {station}/inspection`` (mapped fields, ``message_id`` from the payload's ``msg_id``) and
    raw readings under ``raw/{device}`` (the whole payload becomes ``data``).
    """
    subs = subscriptions or textwrap.dedent("""\
        - topic: plant/{site}/line/{line}/station/{station}/inspection
          event: inspection.result
          ordering_key: "lot:{lot_id}"
          fields: {lot_id: lot, serial: sn, result: result, measured: value,
                   message_id: msg_id}
        - topic: raw/{device}
          event: machine.reading
        """)
    head = textwrap.dedent(f"""\
        sources:
          - id: {source_id}
            type: mqtt
            url: {url}
            protocol: "{protocol}"
            client_id: {client_id}
            reconnect_initial_s: {reconnect_s[0]}
            reconnect_max_s: {reconnect_s[1]}
            connect_timeout_s: 5
        """)
    return (head + textwrap.indent(textwrap.dedent(extra), " " * 4)
            + "    subscriptions:\n" + textwrap.indent(subs, " " * 6))


def opcua_source_yaml(endpoint: str, *monitored: str, source_id: str = "station7",
                      extra: str = "") -> str:
    """A ``sources:`` block with one ``opcua`` source.

    Each of ``monitored`` is one item of its ``monitored:`` list as a YAML flow mapping
    (``'{node: "ns=2;s=Station7.Temperature", sampling_ms: 0}'``); ``extra`` is YAML added
    to the source (options, ``triggers:``).
    """
    head = f"sources:\n  - id: {source_id}\n    type: opcua\n    endpoint: {endpoint}\n"
    items = "".join(f"      - {item}\n" for item in monitored)
    return (head + textwrap.indent(textwrap.dedent(extra), " " * 4)
            + ("    monitored:\n" + items if items else ""))


# --------------------------------------------------------------------------- event builders


def submission(lot: str, *, type: str = "inspection.result", **data: Any) -> Submission:
    """An event of lot ``lot`` (ordering key ``lot:<lot>``) from source ``line1``."""
    return Submission(make_event(type=type, site="test-site", source="line1",
                                 data={"lot_id": lot, **data}, ordering_key=f"lot:{lot}"))


def result(lot: str, n: int = 0, **data: Any) -> Submission:
    """A passing ``inspection.result`` of lot ``lot``, numbered ``n``."""
    return submission(lot, **{"result": "pass", "n": n, **data})


def reading(n: int = 0) -> Submission:
    """A ``machine.reading`` (class ``low``, no ordering key), numbered ``n``."""
    return Submission(make_event(type="machine.reading", site="test-site", source="line1",
                                 data={"value": float(n), "n": n}))


def sub(type_: str = "inspection.result", *, key: str | None = None, cls: str | None = None,
        dedupe: str | None = None, source: str = "line1", **data: Any) -> Submission:
    """Any event for the outbox: ``key`` is the ordering key, ``cls`` the class,
    ``dedupe`` the submission's dedupe key; results and readings get valid defaults."""
    if type_ == "inspection.result":
        data.setdefault("lot_id", "L1")
        data.setdefault("result", "pass")
    if type_ == "machine.reading":
        data.setdefault("value", 1.0)
    return Submission(
        make_event(type=type_, site="test-site", source=source, data=data, ordering_key=key,
                   event_class=cls),
        dedupe,
    )


def scribble_middle_leaf(db: Path, table: str = "events", page_size: int = 4096) -> int:
    """Overwrite the middle leaf page of ``table`` in the outbox file ``db`` with random
    bytes (a damaged page, as a failing disk leaves it); returns its page number."""
    import os
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        pages = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,))]
    finally:
        conn.close()
    assert len(pages) > 4, "the table is too small to have a middle"
    page = pages[len(pages) // 2]
    with open(db, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(os.urandom(page_size))
    return page


def hold_quick_check(monkeypatch: Any, timeout: float = 60) -> Any:
    """Make the outbox's full integrity check wait before it reads the file; returns the
    ``threading.Event`` whose ``set()`` lets it go (a slow disk, without timing)."""
    import threading

    from edge.outbox import integrity

    release = threading.Event()
    real = integrity.quick_check

    def held(path: str, **kwargs: Any) -> str | None:
        release.wait(timeout)
        return real(path, **kwargs)

    monkeypatch.setattr(integrity, "quick_check", held)
    return release
