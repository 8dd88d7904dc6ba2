"""``edge audit verify`` as an auditor runs it: exit 0 with what was verified, 1 naming the
first broken link, 2 for what it cannot read; on a running gateway's outbox, a file moved
aside and an exported bundle."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.config import AuditConfig, AuditFileExportConfig, OutboxConfig
from edge.outbox import Outbox, Resolution, queries
from tests.support import run_edge, sub


def write_config(tmp_path: Path, body: str = "") -> str:
    path = tmp_path / "edge.yaml"
    path.write_text(f"site: test-site\nstate_dir: {tmp_path / 'state'}\n" + body)
    return str(path)


async def fill(ob: Outbox) -> None:
    ids = await ob.submit([sub(key=f"lot:{i}") for i in range(4)])
    leased = await ob.lease("erp", 10)
    await ob.complete("erp", [Resolution(e.seq, e.id, "delivered", status=200)
                              for e in leased if e.id in ids[:2]])
    ob.release("erp", [e.seq for e in leased])
    await ob.sweep()  # the delivered events leave the outbox: their history may be pruned
    key = ob._checkpoint_key
    await ob._write(lambda c: queries.prune_finished_audit(c, 2, checkpoint_key=key))
    await ob.audit("reconnected", source="line1")


async def test_verify_a_running_gateways_outbox_then_a_tampered_copy(tmp_path: Path):
    cfg = write_config(tmp_path)
    state = tmp_path / "state"
    async with Outbox(state, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        await fill(ob)
        rc, out, err = await run_edge("audit", "verify", "-c", cfg, cwd=tmp_path)
        assert rc == 0, err
        assert "entries verified from genesis through 1 later checkpoint" in out
        assert "5 entries verified" in out
        await ob.submit([sub(key="lot:9")])  # the gateway kept writing meanwhile
    moved = tmp_path / "outbox.db.moved"
    (state / "outbox.db").rename(moved)
    rc, out, _ = await run_edge("audit", "verify", "--db", str(moved), cwd=tmp_path)
    assert rc == 0 and "6 entries verified" in out
    conn = sqlite3.connect(moved)
    conn.execute("DELETE FROM audit WHERE seq = 5")
    conn.commit()
    conn.close()
    rc, out, _ = await run_edge("audit", "verify", "--db", str(moved), cwd=tmp_path)
    assert rc == 1
    assert "audit chain broken: entry at seq 5: missing (deleted)" in out
    rc, out, _ = await run_edge("audit", "verify", "--db", str(moved), "--json", cwd=tmp_path)
    assert rc == 1 and '"kind": "deleted"' in out and '"seq": 5' in out


async def test_what_it_cannot_read_is_one_line_and_exit_2(tmp_path: Path):
    rc, _, err = await run_edge("audit", "verify", "--db", str(tmp_path / "none.db"),
                                cwd=tmp_path)
    assert rc == 2 and "no outbox file at" in err
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    rc, _, err = await run_edge("audit", "verify", "--db", str(tmp_path / "junk.db"),
                                cwd=tmp_path)
    assert rc == 2 and "cannot read the outbox" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: s\naudit: {retention_days: -1}\n")
    rc, _, err = await run_edge("audit", "verify", "-c", str(bad), cwd=tmp_path)
    assert rc == 2 and "audit.retention_days" in err
    rc, _, err = await run_edge("audit", "verify", cwd=tmp_path)
    assert rc == 2
    rc, _, err = await run_edge("audit", "verify", "--bundle", str(tmp_path / "nope"),
                                cwd=tmp_path)
    assert rc == 2 and "not a folder" in err
    # a file of a gateway before the chain, not opened by this one yet
    async with Outbox(tmp_path / "old", router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(key="lot:A")])
    conn = sqlite3.connect(tmp_path / "old" / "outbox.db")
    conn.executescript("DROP TABLE audit_checkpoints; ALTER TABLE audit DROP COLUMN hash; "
                       "PRAGMA user_version = 3;")
    conn.close()
    rc, _, err = await run_edge("audit", "verify", "--db", str(tmp_path / "old" / "outbox.db"),
                                cwd=tmp_path)
    assert rc == 2 and "no audit chain yet" in err
    # the same file while the gateway's upgrade chains it (or after a cut-short upgrade)
    conn = sqlite3.connect(tmp_path / "old" / "outbox.db")
    conn.executescript("CREATE TABLE audit_checkpoints(id INTEGER PRIMARY KEY); "
                       "INSERT INTO meta(key, value) VALUES ('audit_chain_upgrade', '{}');")
    conn.close()
    rc, _, err = await run_edge("audit", "verify", "--db", str(tmp_path / "old" / "outbox.db"),
                                cwd=tmp_path)
    assert rc == 2 and "chaining the audit trail of this older file" in err


async def test_an_exported_bundle_verifies_on_its_own_and_signatures_are_checked(
        tmp_path: Path):
    key = tmp_path / "checkpoint.key"
    key.write_text("k-123\n")
    bundle = tmp_path / "bundle"
    cfg = write_config(tmp_path, f"audit:\n  checkpoint_key_file: {key}\n"
                       f"  export: {{path: {bundle}}}\n")
    ocfg = OutboxConfig()
    ocfg._audit = AuditConfig(checkpoint_key_file=str(key),
                              export=AuditFileExportConfig(path=str(bundle)))
    async with Outbox(tmp_path / "state", ocfg, router=lambda ev: ["erp"],
                      maintenance_interval_s=3600) as ob:
        await fill(ob)
        await ob._prune_audit_for_space(1 << 20)
        await ob.export_audit()
    rc, out, err = await run_edge("audit", "verify", "-c", cfg, cwd=tmp_path)
    assert rc == 0 and "2 signatures checked" in out, err
    rc, out, _ = await run_edge("audit", "verify", "--bundle", str(bundle), "--key-file",
                                str(key), cwd=tmp_path)
    assert rc == 0 and "2 signatures checked" in out
    wrong = tmp_path / "wrong.key"
    wrong.write_text("other\n")
    rc, out, _ = await run_edge("audit", "verify", "--bundle", str(bundle), "--key-file",
                                str(wrong), cwd=tmp_path)
    assert rc == 1 and "checkpoint 2: signature does not match" in out
    [file] = bundle.glob("audit-*.jsonl")
    text = file.read_text()
    assert '"state":"audit_pruned_unexported"' in text
    file.write_text(text.replace('"state":"audit_pruned_unexported"', '"state":"x"'))
    rc, out, _ = await run_edge("audit", "verify", "--bundle", str(bundle), cwd=tmp_path)
    assert rc == 1 and "(edited)" in out
