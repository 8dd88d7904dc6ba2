"""Business monitors against a real gateway and the stand-in ERP: a delivery SLA per event
type breached while the ERP is down (health degraded, the page and `edge status` say which
type and how late) and cleared when it is back; dead-lettered supplier notifications
listed; delayed dispositions counted."""

from __future__ import annotations

from edge.api.page import render
from edge.cli.status import format_report
from tests.quality.support import failing, receipt
from tests.support import eventually, sample, sink_yaml

RULES = "rules:\n  - {type: spec_limits, upper: 10.05}\n"


async def _sla(gw, type_: str) -> dict:
    report = await gw.status_report()
    [entry] = [s for s in report["business"]["sla"] if s["type"] == type_]
    return {"entry": entry, "report": report}


async def test_a_breached_sla_degrades_health_until_delivered(quality_gateways, erp) -> None:
    erp.outage(True)
    gw = await quality_gateways(
        RULES + "quality:\n  sla: [{type: lot.status, within_s: 0.001}, "
        "{type: machine.reading, within_s: 3600}]\n" + sink_yaml(erp.url))
    await gw.pipeline.submit([receipt("L1"), failing("L1")])

    async def breached() -> dict | None:
        got = await _sla(gw, "lot.status")
        return got if got["entry"]["breached"] else None

    got = await eventually(breached, what="the lot.status SLA breached")
    entry, report = got["entry"], got["report"]
    assert entry["waiting"] == 1 and entry["sinks"]["erp"]["late"] is True
    assert entry["late_s"] >= 0 and "lot.status not delivered within" in entry["message"]
    assert report["health"]["state"] != "ok"
    assert any(p["subject"] == "SLA lot.status" for p in report["health"]["problems"])
    reading = [s for s in report["business"]["sla"] if s["type"] == "machine.reading"][0]
    assert reading["breached"] is False and reading["waiting"] == 0
    page = render(report, [])
    assert "Delivery SLAs" in page and "LATE by" in page
    text = "\n".join(format_report(report))
    assert "SLA lot.status within 0 s: LATE by" in text
    await gw.lot_monitor.business(gw.outbox)
    assert sample(gw, "edge_delivery_sla_breached", type="lot.status") == 1

    erp.outage(False)

    async def cleared() -> dict | None:
        got = await _sla(gw, "lot.status")
        return got if not got["entry"]["breached"] else None

    got = await eventually(cleared, what="the lot.status SLA met again")
    assert got["entry"]["waiting"] == 0
    assert not any(p["subject"].startswith("SLA") for p in got["report"]["health"]["problems"])
    await gw.lot_monitor.business(gw.outbox)
    assert sample(gw, "edge_delivery_sla_breached", type="lot.status") == 0


async def test_dead_lettered_supplier_cases_are_listed(quality_gateways, erp) -> None:
    erp.reject(lambda e: e.get("type") == "supplier.case", 422, '{"error": "unknown supplier"}')
    gw = await quality_gateways(RULES + sink_yaml(erp.url, extra="on_dead_letter: continue\n"))
    await gw.pipeline.submit([receipt("L2", supplier="acme"), failing("L2")])

    async def dead() -> dict | None:
        report = await gw.status_report()
        return report if report["business"]["notifications"]["dead_letters"] else None

    report = await eventually(dead, what="the supplier case dead-lettered")
    nt = report["business"]["notifications"]
    [item] = nt["items"]
    assert (item["type"], item["sink"], item["status"], item["ordering_key"]) == (
        "supplier.case", "erp", 422, "lot:L2")
    assert any(p["subject"] == "notifications" and "supplier.case of lot:L2" in p["message"]
               for p in report["health"]["problems"])
    assert "Supplier notifications that failed" in render(report, [])
    assert "supplier notifications: 1 dead-lettered" in "\n".join(format_report(report))
    await gw.lot_monitor.business(gw.outbox)
    assert sample(gw, "edge_notifications_dead_letters") == 1


async def test_lots_on_hold_too_long_are_delayed_dispositions(quality_gateways, erp) -> None:
    from edge.quality.rules import QualityConfig

    gw = await quality_gateways(RULES + sink_yaml(erp.url),
                                quality=QualityConfig(stuck_after_s=0.001))
    await gw.pipeline.submit([receipt("L3"), failing("L3"), receipt("L4")])

    async def delayed() -> dict | None:
        report = await gw.status_report()
        return report if report["lots"]["delayed_dispositions"] == 1 else None

    report = await eventually(delayed, what="L3 a delayed disposition")
    assert report["lots"]["stuck"] == 2  # L4 has no disposition at all
    assert "delayed dispositions 1" in "\n".join(format_report(report))
