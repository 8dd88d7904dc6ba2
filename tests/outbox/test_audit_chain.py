"""The hash-chained audit trail (DESIGN invariant 8, docs/audit.md): a realistic run
verifies; an edited, deleted or reordered entry and a deleted checkpoint are named; pruning,
rollbacks and the upgrade of an older file keep the chain verifiable; export ships entries
to a bundle that verifies on its own before retention prunes them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.config import AuditConfig, AuditFileExportConfig, OutboxConfig, load_config_text
from edge.errors import ConfigError
from edge.outbox import Outbox, Resolution, audit, audit_export, queries
from edge.outbox.dbthread import connect
from edge.outbox.schema import SCHEMA_VERSION
from tests.support import sub


def verify(path: Path, key: bytes | None = None) -> audit.VerifyResult:
    conn = connect(str(path / "outbox.db"), readonly=True)
    try:
        return audit.verify_db(conn, key)
    finally:
        conn.close()


def tamper(path: Path, *sql: str | tuple[str, tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(path / "outbox.db", isolation_level=None)
    for stmt in sql:
        if isinstance(stmt, tuple):
            conn.execute(*stmt)
        else:
            conn.execute(stmt)
    conn.close()


def seqs(path: Path) -> list[int]:
    conn = sqlite3.connect(path / "outbox.db")
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM audit ORDER BY seq")]
    finally:
        conn.close()


async def realistic_run(ob: Outbox) -> None:
    """Stored, duplicates, delivered, retried, dead-lettered, replayed, quarantined,
    component notices."""
    ids = await ob.submit([sub(key=f"lot:{i}", dedupe=f"m{i}") for i in range(6)])
    await ob.submit([sub(key="lot:0", dedupe="m0")])  # a copy of a stored identity key
    await ob.quarantine("line1", "not_json", b"\x00garbage", detail="not JSON")
    await ob.audit("reconnected", source="line1", detail={"after_s": 1.5})
    leased = await ob.lease("erp", 10)
    by_id = {e.id: e for e in leased}
    await ob.complete("erp", [
        Resolution(by_id[ids[0]].seq, ids[0], "delivered", status=200),
        Resolution(by_id[ids[1]].seq, ids[1], "retry", status=503, reason="unavailable",
                   next_at=time.time() + 60),
        Resolution(by_id[ids[2]].seq, ids[2], "dead_letter", status=422, reason="rejected"),
    ])
    ob.release("erp", [e.seq for e in leased])
    await ob.dlq_replay(sink="erp", actor="qa", reason="fixed the mapping")


async def test_a_realistic_run_verifies_and_audits_quarantine_duplicates_notices(
        erp_outbox: Outbox, tmp_path: Path):
    await realistic_run(erp_outbox)
    res = verify(tmp_path)
    assert res.ok, res.message
    conn = sqlite3.connect(tmp_path / "outbox.db")
    states = [r[0] for r in conn.execute("SELECT state FROM audit ORDER BY seq")]
    for state in ("stored", "duplicate_dropped", "quarantined", "reconnected", "delivered",
                  "retry", "dead_lettered", "replayed"):
        assert state in states
    assert res.verified == len(states)
    dup = conn.execute("SELECT event_id, detail FROM audit WHERE state = 'duplicate_dropped'"
                       ).fetchone()
    stored = conn.execute("SELECT event_id FROM audit WHERE state = 'stored' "
                          "AND ordering_key = 'lot:0'").fetchone()[0]
    assert dup[0] == stored and orjson.loads(dup[1])["source"] == "line1"
    q = orjson.loads(conn.execute("SELECT detail FROM audit WHERE state = 'quarantined'"
                                  ).fetchone()[0])
    assert q["source"] == "line1" and q["quarantine_id"] == 1 and q["bytes"] == 8
    conn.close()


@pytest.mark.parametrize(("how", "kind"), [
    ("edit", "edited"), ("delete", "deleted"), ("swap", "reordered"), ("move", "reordered"),
    ("delete_last", "deleted"),
])
async def test_tampering_names_the_first_broken_link(erp_outbox: Outbox, tmp_path: Path,
                                                     how: str, kind: str):
    await realistic_run(erp_outbox)
    all_seqs = seqs(tmp_path)
    mid, later, last = all_seqs[4], all_seqs[8], all_seqs[-1]
    cols = "ts, event_id, sink, state, actor, reason, ordering_key, detail, hash"
    if how == "edit":
        tamper(tmp_path, ("UPDATE audit SET detail = ? WHERE seq = ?", ('{"x":1}', mid)))
    elif how == "delete":
        tamper(tmp_path, ("DELETE FROM audit WHERE seq = ?", (mid,)))
    elif how == "swap":  # two whole rows change places (their seq stays in order)
        tamper(tmp_path, "CREATE TEMP TABLE a AS SELECT * FROM audit",
               (f"UPDATE audit SET ({cols}) = (SELECT {cols} FROM a WHERE a.seq = ?) "
                "WHERE seq = ?", (later, mid)),
               (f"UPDATE audit SET ({cols}) = (SELECT {cols} FROM a WHERE a.seq = ?) "
                "WHERE seq = ?", (mid, later)))
    elif how == "move":  # an entry renumbered to the end
        tamper(tmp_path, ("UPDATE audit SET seq = ? WHERE seq = ?", (last + 1, mid)))
    else:
        tamper(tmp_path, ("DELETE FROM audit WHERE seq = ?", (last,)))
        mid = last
    res = verify(tmp_path)
    assert not res.ok
    assert (res.kind, res.seq) == (kind, mid), res.message
    assert f"seq {mid}" in res.message


async def test_pruning_keeps_the_chain_verifiable_and_deleting_a_checkpoint_is_detected(
        erp_outbox: Outbox, tmp_path: Path):
    ob = erp_outbox
    await realistic_run(ob)
    # disk pressure: rows of events that left the outbox go, rows of queued events stay
    pruned = await ob._write(lambda c: queries.prune_finished_audit(c, 3))
    assert pruned.removed == 3
    # retention: everything older than now
    await ob._write(lambda c: queries.prune(
        c, dedupe_before=0, audit_before="2999", quarantine_max_rows=100, limit=4))
    await ob.audit("reconnected", source="line1")
    res = verify(tmp_path)
    assert res.ok, res.message
    assert res.pruned == 7 and res.checkpoints == 3
    conn = sqlite3.connect(tmp_path / "outbox.db")
    kinds = [r[0] for r in conn.execute("SELECT kind FROM audit_checkpoints ORDER BY id")]
    first, last, count = conn.execute(
        "SELECT first_seq, last_seq, count FROM audit_checkpoints WHERE id = 3").fetchone()
    conn.close()
    assert kinds == ["genesis", "pruned", "pruned"] and count == 4 and first <= last
    tamper(tmp_path, "UPDATE audit_checkpoints SET count = 1 WHERE id = 2")
    res = verify(tmp_path)
    assert (res.ok, res.kind, res.checkpoint) == (False, "checkpoint_edited", 2)
    tamper(tmp_path, "UPDATE audit_checkpoints SET count = 3 WHERE id = 2")
    assert verify(tmp_path).ok
    # a pruned range's checkpoint removed: the entries it covered look deleted
    tamper(tmp_path, "DELETE FROM audit_checkpoints WHERE id = 2")
    res = verify(tmp_path)
    assert (res.ok, res.kind, res.checkpoint) == (False, "checkpoint_deleted", 2)
    tamper(tmp_path, "DELETE FROM audit_checkpoints WHERE id = 3")
    res = verify(tmp_path)
    assert (res.ok, res.kind, res.checkpoint) == (False, "checkpoint_deleted", 2)


async def test_the_newest_checkpoint_deleted_is_detected(erp_outbox: Outbox, tmp_path: Path):
    await realistic_run(erp_outbox)
    await erp_outbox._write(lambda c: queries.prune(
        c, dedupe_before=0, audit_before="2999", quarantine_max_rows=100, limit=3))
    tamper(tmp_path, "DELETE FROM audit_checkpoints WHERE id = 2")
    res = verify(tmp_path)
    assert (res.ok, res.kind, res.checkpoint) == (False, "checkpoint_deleted", 2)


async def test_a_rolled_back_write_leaves_the_chain_intact(erp_outbox: Outbox, tmp_path: Path):
    ob = erp_outbox
    await ob.submit([sub(key="lot:A")])

    def fails_after_auditing(c: sqlite3.Connection) -> None:
        audit.insert_audit(c, [audit.audit_row("reconnected", detail={"n": 1})] * 3)
        raise ValueError("op fails after its audit rows")

    with pytest.raises(ValueError):
        await ob._write(fails_after_auditing)
    await ob.submit([sub(key="lot:B")])
    await ob.audit("reconnected", source="line1")
    # the CLI's transactions (rolled back) on the same file
    conn = connect(str(tmp_path / "outbox.db"))
    with pytest.raises(RuntimeError), queries.transaction(conn):
        audit.insert_audit(conn, [audit.audit_row("replayed", actor="qa")])
        raise RuntimeError
    conn.close()
    await ob.audit("reconnected", source="line1")
    res = verify(tmp_path)
    assert res.ok, res.message
    assert seqs(tmp_path) == [1, 2, 3, 4]


def _old_format(path: Path) -> None:
    """Rewrite a file as a gateway before the chain left it: no hash column, no
    checkpoints, schema version 3, one entry pruned from the middle."""
    tamper(path, "DROP TABLE audit_checkpoints", "ALTER TABLE audit DROP COLUMN hash",
           "DELETE FROM audit WHERE seq = 3", "PRAGMA user_version = 3")


async def test_an_older_file_is_chained_at_the_upgrade_and_then_verifies(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(key=f"lot:{i}") for i in range(5)])
    _old_format(tmp_path)
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(key="lot:new")])
    conn = sqlite3.connect(tmp_path / "outbox.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    reason, detail = conn.execute("SELECT reason, detail FROM audit_checkpoints").fetchone()
    conn.close()
    assert reason == "chained at upgrade"
    assert orjson.loads(detail)["chained_at_upgrade"] == {
        "first_seq": 1, "last_seq": 5, "count": 4, "missing_then": 1}
    res = verify(tmp_path)
    assert res.ok and res.verified == 5, res.message
    assert any("chained when the gateway was upgraded" in n for n in res.notes)
    tamper(tmp_path, "UPDATE audit SET actor = 'someone' WHERE seq = 2")
    assert (verify(tmp_path).kind, verify(tmp_path).seq) == ("edited", 2)


async def test_checkpoints_are_signed_with_the_key(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    cfg = OutboxConfig()
    cfg._audit = AuditConfig(checkpoint_key_file=str(key_file))
    async with Outbox(tmp_path, cfg, router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(key="lot:A")])
        await ob.prune()  # retention 90 days: nothing old, no checkpoint
        await ob._write(lambda c: queries.prune_finished_audit(
            c, 10, checkpoint_key=ob._checkpoint_key))
        await ob.submit([sub(key="lot:B")])
    state = tmp_path
    assert verify(state, b"s3cret-key").signed == 0  # nothing pruned: event still queued
    async with Outbox(tmp_path, cfg, router=lambda ev: ["erp"]) as ob:
        leased = await ob.lease("erp", 10)
        await ob.complete("erp", [Resolution(e.seq, e.id, "delivered", status=200) for e in leased])
        await ob._prune_audit_for_space(1 << 20)
    res = verify(state, b"s3cret-key")
    assert res.ok and res.signed == 1, res.message
    res = verify(state, b"another key")
    assert (res.ok, res.kind, res.checkpoint) == (False, "bad_signature", 2)
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:  # no key configured
        await ob.audit("reconnected", source="line1")
        await ob._prune_audit_for_space(1 << 20)
    res = verify(state, b"s3cret-key")
    assert (res.ok, res.kind, res.checkpoint) == (False, "unsigned", 3)


async def test_export_then_prune_ships_every_entry_and_the_bundle_verifies(tmp_path: Path):
    bundle = tmp_path / "bundle"
    cfg = OutboxConfig()
    cfg._audit = AuditConfig(retention_days=1, export=AuditFileExportConfig(
        path=str(bundle), max_file_rows=4))
    state = tmp_path / "state"
    async with Outbox(state, cfg, router=lambda ev: ["erp"],
                      maintenance_interval_s=3600) as ob:
        await realistic_run(ob)
        assert await ob.export_audit() == len(seqs(state))
        before = len(seqs(state))
        await ob.audit("reconnected", source="line1")  # not exported yet
        # retention as if every entry were old: only exported ones may go
        removed = await ob._write(lambda c: queries.prune(
            c, dedupe_before=0, audit_before="2999", quarantine_max_rows=100,
            audit_export_configured=True))
        assert removed["audit"] == before and seqs(state) == [before + 1]
        await ob.audit("reconnected", source="line1")
        assert await ob.export_audit() == 2
    assert verify(state).ok
    files = sorted(bundle.glob("audit-*.jsonl"))
    assert len(files) >= 3 and not list(bundle.glob("*.tmp"))
    res = audit_export.verify_bundle(str(bundle))
    assert res.ok and res.verified == before + 2, res.message
    # a bundle line edited is detected with its seq
    lines = files[1].read_bytes().splitlines()
    doc = orjson.loads(lines[-1])
    doc["actor"] = "someone else"
    files[1].write_bytes(b"\n".join([*lines[:-1], orjson.dumps(doc)]) + b"\n")
    res = audit_export.verify_bundle(str(bundle))
    assert (res.ok, res.kind, res.seq) == (False, "edited", doc["seq"])


async def test_disk_pressure_prunes_unexported_entries_with_an_alarm_and_a_notice(
        tmp_path: Path):
    cfg = OutboxConfig()
    cfg._audit = AuditConfig(export=AuditFileExportConfig(path=str(tmp_path / "bundle")))
    async with Outbox(tmp_path / "state", cfg, router=lambda ev: ["erp"],
                      maintenance_interval_s=3600) as ob:
        await ob.audit("reconnected", source="line1")
        await ob.export_audit()
        await ob.audit("reconnected", source="line1")
        await ob.audit("reconnected", source="line1")
        assert await ob._prune_audit_for_space(1 << 20) == 2  # the newest entry stays
        assert "audit_pruned_unexported" in {a["code"] for a in ob.alarms}
        notice = await ob.read(lambda c: c.execute(
            "SELECT reason, detail FROM audit WHERE state = 'audit_pruned_unexported'"
        ).fetchone())
        assert notice[0] == "disk budget"
        assert orjson.loads(notice[1]) == {"count": 1, "first_seq": 2, "last_seq": 2}
        await ob.export_audit()
    assert verify(tmp_path / "state").ok
    assert audit_export.verify_bundle(str(tmp_path / "bundle")).ok


def test_the_audit_section_and_the_old_retention_key():
    cfg = load_config_text("site: s\naudit:\n  retention_days: 30\n  export: {path: b}\n",
                           base_dir="/srv/edge")
    assert cfg.outbox.audit.retention_days == 30 and cfg.outbox.audit_retention_days == 30
    assert cfg.outbox.audit.export is not None
    assert cfg.outbox.audit.export.path == "/srv/edge/b"
    old = load_config_text("site: s\noutbox: {audit_retention_days: 12}\n")
    assert old.outbox.audit.retention_days == 12
    from edge.config import deprecations

    assert [i.location for i in deprecations(old)] == ["outbox.audit_retention_days"]
    with pytest.raises(ConfigError, match="same option"):
        load_config_text("site: s\noutbox: {audit_retention_days: 12}\n"
                         "audit: {retention_days: 30}\n")


@pytest.mark.parametrize("url", ["https://archivist:s3cret@archive.example/audit",
                                 "https://archive.example/audit?token=s3cret"])
def test_the_archive_url_carries_no_credential(url: str):
    with pytest.raises(ConfigError, match="inline") as err:
        load_config_text(f"site: s\naudit:\n  export: {{type: http, url: '{url}'}}\n")
    assert "s3cret" not in str(err.value)  # the refusal does not repeat the secret


async def test_a_failing_export_raises_an_alarm_and_retention_keeps_the_entries(
        tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the bundle folder should be")
    cfg = OutboxConfig()
    cfg._audit = AuditConfig(export=AuditFileExportConfig(path=str(blocker / "bundle")))
    async with Outbox(tmp_path / "state", cfg, router=lambda ev: ["erp"],
                      maintenance_interval_s=3600) as ob:
        await ob.audit("reconnected", source="line1")
        assert await ob.export_audit() == 0
        assert "audit_export_failed" in {a["code"] for a in ob.alarms}
        removed = await ob._write(lambda c: queries.prune(
            c, dedupe_before=0, audit_before="2999", quarantine_max_rows=100,
            audit_export_configured=True))
        assert removed["audit"] == 0
        blocker.unlink()
        assert await ob.export_audit() == 1
        assert "audit_export_failed" not in {a["code"] for a in ob.alarms}


async def test_an_auditor_recomputes_an_entry_hash_from_the_documented_recipe(
        erp_outbox: Outbox, tmp_path: Path):
    import hashlib
    import json

    await erp_outbox.submit([sub(key="lot:A")])
    await erp_outbox.audit("reconnected", source="line1")
    conn = sqlite3.connect(tmp_path / "outbox.db")
    rows = conn.execute("SELECT seq, ts, event_id, sink, state, actor, reason, ordering_key, "
                        "detail, hash FROM audit ORDER BY seq").fetchall()
    genesis = conn.execute("SELECT last_hash FROM audit_checkpoints WHERE id = 1").fetchone()
    conn.close()
    prev = genesis[0]
    for row in rows:
        canonical = json.dumps(list(row[:9]), separators=(",", ":"), ensure_ascii=False)
        assert hashlib.sha256((prev + canonical).encode()).hexdigest() == row[9]
        prev = row[9]


async def test_prunes_in_any_order_keep_new_entries_chained(erp_outbox: Outbox,
                                                            tmp_path: Path):
    """Disk pressure prunes the newest entries, retention then older ones: the next entry
    still chains from the newest one (a prune never removes it)."""
    ob = erp_outbox
    await ob.submit([sub(key="lot:A")])
    [second] = await ob.submit([sub(key="lot:B")])
    leased = [e for e in await ob.lease("erp", 10) if e.id == second]
    await ob.complete("erp", [Resolution(leased[0].seq, second, "delivered", status=200)])
    await ob.sweep()  # the delivered event leaves the outbox
    assert (await ob._write(lambda c: queries.prune_finished_audit(c, 100))).removed == 1
    await ob._write(lambda c: queries.prune(
        c, dedupe_before=0, audit_before="2999", quarantine_max_rows=100, limit=1))
    await ob.audit("reconnected", source="line1")
    assert seqs(tmp_path) == [3, 4]
    res = verify(tmp_path)
    assert res.ok and res.pruned == 2, res.message


async def test_http_export_posts_bundle_batches_the_archive_can_verify(tmp_path: Path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    archive = tmp_path / "archive"
    archive.mkdir()
    seen: list[tuple[int, str | None]] = []

    class Archive(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = 503 if not seen else 201
            seen.append((status, self.headers.get("Authorization")))
            if status == 201:
                (archive / self.headers["X-Audit-Bundle"]).write_bytes(body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Archive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    cfg = load_config_text(
        f"site: s\naudit:\n  export: {{type: http, url: 'http://127.0.0.1:"
        f"{server.server_address[1]}/audit', token_file: {token}}}\n").outbox
    try:
        async with Outbox(tmp_path / "state", cfg, router=lambda ev: ["erp"],
                          maintenance_interval_s=3600) as ob:
            await realistic_run(ob)
            assert await ob.export_audit() == 0  # the archive answered 503
            assert "audit_export_failed" in {a["code"] for a in ob.alarms}
            removed = await ob._write(lambda c: queries.prune(
                c, dedupe_before=0, audit_before="2999", quarantine_max_rows=100,
                audit_export_configured=True))
            assert removed["audit"] == 0
            shipped = await ob.export_audit()
            assert shipped == len(seqs(tmp_path / "state"))
            assert "audit_export_failed" not in {a["code"] for a in ob.alarms}
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [(503, "Bearer t0ken"), (201, "Bearer t0ken")]
    res = audit_export.verify_bundle(str(archive))
    assert res.ok and res.verified == shipped, res.message


async def test_checkpoints_are_compacted_and_the_chain_still_verifies(tmp_path: Path):
    """Every prune adds a checkpoint; past a bound they are replaced by one ``rebased``
    checkpoint (exported ones only, with export), and the database and the bundle both
    still verify; tampering stays visible."""
    bundle = tmp_path / "bundle"
    cfg = OutboxConfig()
    cfg._audit = AuditConfig(export=AuditFileExportConfig(path=str(bundle)))
    state = tmp_path / "state"
    async with Outbox(state, cfg, router=lambda ev: ["erp"],
                      maintenance_interval_s=3600) as ob:
        await ob.submit([sub(key="lot:queued")])  # its entry is never pruned: a gap stays
        for _ in range(6):
            for _ in range(3):
                await ob.audit("reconnected", source="line1")
            await ob._write(lambda c: queries.prune_finished_audit(c, 2))
        await ob.export_audit()
        await ob.audit("reconnected", source="line1")
        await ob._write(lambda c: queries.prune_finished_audit(c, 2))  # not exported yet

        def compact(c: sqlite3.Connection) -> int:
            return queries.compact_audit_checkpoints(c, above=3, export_configured=True)

        assert await ob._write(compact) == 0  # the bundle must get every checkpoint first
        await ob.export_audit()
        assert await ob._write(compact) == 8  # genesis and 7 prunes
        kinds = await ob.read(lambda c: [r[0] for r in c.execute(
            "SELECT kind FROM audit_checkpoints ORDER BY id")])
        assert kinds == ["rebased"]
        await ob._write(lambda c: queries.prune_finished_audit(c, 2))
        await ob.audit("reconnected", source="line1")
        await ob.export_audit()
    res = verify(state)
    assert res.ok, res.message
    assert res.start == "checkpoint 9 (rebased) through 1 later checkpoint(s)"
    assert res.pruned == 16
    res = audit_export.verify_bundle(str(bundle))
    assert res.ok and res.start.startswith("genesis"), res.message
    kept = seqs(state)
    tamper(state, ("DELETE FROM audit WHERE seq = ?", (kept[2],)))
    res = verify(state)
    assert (res.ok, res.kind, res.seq) == (False, "deleted", kept[2])


async def test_the_outbox_keeps_its_checkpoints_few(erp_outbox: Outbox, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    from edge.outbox import store

    monkeypatch.setattr(store, "AUDIT_CHECKPOINTS_KEPT", 3)
    for _ in range(10):
        await erp_outbox.audit("reconnected", source="line1")
        await erp_outbox.audit("reconnected", source="line1")
        assert await erp_outbox._prune_audit_for_space(1 << 20) >= 1
        count = await erp_outbox.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0])
        assert count <= 3
    res = verify(tmp_path)
    assert res.ok and res.pruned == 19 and seqs(tmp_path) == [20], res.message


async def test_verify_reads_a_live_file_in_short_snapshots_and_a_prune_meanwhile_is_no_break(
        erp_outbox: Outbox, tmp_path: Path):
    await realistic_run(erp_outbox)
    writer = connect(str(tmp_path / "outbox.db"))
    reader = connect(str(tmp_path / "outbox.db"), readonly=True)

    class PruneAfterTheFirstChunk:
        """The reader's connection; the gateway prunes while the walk is between chunks."""

        def __init__(self) -> None:
            self.chunks = 0

        def execute(self, sql: str, *args: Any) -> Any:
            if "FROM audit WHERE seq > ?" in sql:
                self.chunks += 1
                if self.chunks == 2:
                    with queries.transaction(writer):
                        queries.prune(writer, dedupe_before=0, audit_before="2999",
                                      quarantine_max_rows=100)
            return reader.execute(sql, *args)

    proxy = PruneAfterTheFirstChunk()
    try:
        res = audit.verify_db(proxy, chunk=3)  # type: ignore[arg-type]
    finally:
        writer.close()
        reader.close()
    assert res.ok, res.message
    assert proxy.chunks >= 2 and res.verified >= 3 and res.pruned > 0


async def test_a_change_to_an_older_file_before_its_upgrade_says_what_to_do(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(key="lot:A")])
    _old_format(tmp_path)
    conn = connect(str(tmp_path / "outbox.db"))
    try:
        with pytest.raises(sqlite3.OperationalError, match="start the gateway once"), \
                queries.transaction(conn):
            queries.dlq_replay(conn, ids=None, sink="erp", actor="qa", reason="r")
            audit.insert_audit(conn, [audit.audit_row("replayed", actor="qa")])
    finally:
        conn.close()


async def test_an_upgrade_cut_short_resumes_where_it_stopped(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(key=f"lot:{i}") for i in range(12)])
    _old_format(tmp_path)
    real, calls = audit.chain_hash, []

    def dies_on_the_eighth(prev: str, fields: Any) -> str:
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("power cut")
        return real(prev, fields)

    monkeypatch.setattr(audit, "chain_hash", dies_on_the_eighth)
    monkeypatch.setattr(audit, "UPGRADE_CHUNK", 5)
    conn = connect(str(tmp_path / "outbox.db"))
    with pytest.raises(KeyboardInterrupt):
        queries.ensure_schema(conn)  # a chunk of 5 committed, the second rolled back
    conn.close()
    monkeypatch.setattr(audit, "chain_hash", real)
    hashed = sqlite3.connect(tmp_path / "outbox.db").execute(
        "SELECT COUNT(*) FROM audit WHERE hash IS NOT NULL").fetchone()[0]
    assert hashed == 5
    conn = connect(str(tmp_path / "outbox.db"))
    queries.ensure_schema(conn)
    conn.close()
    res = verify(tmp_path)
    assert res.ok and res.verified == 11, res.message
    assert sqlite3.connect(tmp_path / "outbox.db").execute(
        "SELECT COUNT(*) FROM meta WHERE key = 'audit_chain_upgrade'").fetchone()[0] == 0


async def test_a_batch_exported_twice_after_a_crash_still_verifies(erp_outbox: Outbox,
                                                                   tmp_path: Path):
    """The file was written but the progress not recorded: the next export writes the same
    entries again (and newer ones) into another file."""
    bundle = tmp_path / "bundle"
    await realistic_run(erp_outbox)
    first = await erp_outbox.read(audit_export.read_pending, 1000)
    audit_export.write_bundle_file(str(bundle), first)  # ... and the process died here
    await erp_outbox.audit("reconnected", source="line1")
    again = await erp_outbox.read(audit_export.read_pending, 1000)
    audit_export.write_bundle_file(str(bundle), again)
    assert len(list(bundle.glob("audit-*.jsonl"))) == 2
    res = audit_export.verify_bundle(str(bundle))
    assert res.ok and res.verified == len(again.entries), res.message
