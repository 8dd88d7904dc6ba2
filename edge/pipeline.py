"""The ingest seam sources talk to: (rules) → outbox, implementing ``components.Ingest``.

``submit`` returns only after the outbox COMMIT, so a source may ack upstream right after
it. The quality rules (``edge.quality.engine``) run here, before storage: each item gets
its lot-state change attached and is followed by what it derives (nonconformance, hold
episode, CAPA request), stored in the same transaction, marked ``derived`` (DESIGN
invariant 4). So in a batch ``[r1, r2]`` of one lot where ``r1`` fails its spec, the
stored order is ``r1, nonconformance, hold, lot.status, …, r2``, and a redelivered ``r1``
that the outbox matches to its first copy takes what it derived along (nothing is stored
twice, no lot state changes twice).

The rules read the lot states the outbox committed (``Outbox.quality``), which change only
after a COMMIT. After each submit the pipeline pays what a race left owed (``catch_up``:
an episode for a failure stored right after a release, a CAPA request whose threshold two
calls reached together); a failure there is logged and retried by the next submit or the
gateway's periodic call, never reported to the source whose events are committed.

``release`` is an operator's release of a lot (``edge lot release``, ``POST
/lots/{lot}/release``): a ``lot.status`` (released) and a ``quality.release``, stored with
the lot's change and audited with who decided.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge.components import Submission
from edge.errors import OutboxError
from edge.outbox import Outbox
from edge.quality.engine import QualityRules
from edge.telemetry import log_event

__all__ = ["AlreadyReleased", "Pipeline", "Release", "UnknownLot"]

log = logging.getLogger(__name__)


class UnknownLot(KeyError):
    """No lot of that id in the lots table."""


class AlreadyReleased(Exception):
    """The lot is released already (its last episode ended with a release)."""

    def __init__(self, lot: dict[str, Any]) -> None:
        super().__init__(f"lot {lot['lot_id']} is already released")
        self.lot = lot


@dataclass(frozen=True)
class Release:
    lot_id: str
    episode: int
    previous_state: str
    event_ids: list[str]


class Pipeline:
    def __init__(self, outbox: Outbox, rules: QualityRules | None = None) -> None:
        self.outbox = outbox
        self.rules = rules
        self._catching_up = asyncio.Lock()

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        """Store ``items``, each followed by what the rules derive from it; return the ids
        of ``items`` only, in order (see ``components.Ingest.submit`` for errors, ``chain``).
        """
        if self.rules is None:
            return await self.outbox.submit(items, chain=chain)
        batch, causes = self.rules.derive(items, self.outbox.quality)
        ids = await self.outbox.submit(batch, chain=chain)
        if self.rules.owes(self.outbox.quality):
            try:
                await self.catch_up()
            except OutboxError as err:  # the caller's events are committed: retried later
                log_event(log, logging.WARNING, "quality catch-up failed; retried later",
                          error=str(err))
        return [ids[i] for i in causes]

    async def catch_up(self) -> int:
        """Store what the rules still owe (see the module docstring); the number of events
        stored. Raises what ``Outbox.submit`` raises."""
        if self.rules is None:
            return 0
        async with self._catching_up:
            subs, changes = self.rules.catch_up(self.outbox.quality)
            if not changes:
                return 0
            ids = await self.outbox.submit(subs)
            await self.outbox.write_quality(changes)
        stored = sum(1 for s, i in zip(subs, ids, strict=True) if i == s.event.id)
        log_event(log, logging.WARNING, "quality catch-up: stored what a concurrent commit "
                  "left owed", events=stored, changes=len(changes),
                  types=sorted({s.event.type for s in subs}))
        return stored

    async def release(self, lot_id: str, *, by: str, reason: str, actor: str) -> Release:
        """Release ``lot_id`` (decided by ``by``; ``actor`` is who asked, for the audit).

        Raises ``UnknownLot``, ``AlreadyReleased`` (also when a concurrent release of the
        same episode won) and what ``Outbox.submit`` raises (nothing was stored then).
        """
        if self.rules is None:
            raise UnknownLot(lot_id)
        row = self.outbox.quality.lots.get(lot_id)
        if row is None:
            raise UnknownLot(lot_id)
        if row.state == "released":
            raise AlreadyReleased(_brief(row))
        subs = self.rules.release(row, by=by, reason=reason, actor=actor)
        ids = await self.outbox.submit(subs)
        if ids[0] != subs[0].event.id:
            now = self.outbox.quality.lots.get(lot_id, row)
            raise AlreadyReleased(_brief(now))
        log_event(log, logging.INFO, "lot released", lot_id=lot_id, episode=row.episode,
                  was=row.state, by=by, actor=actor, reason=reason[:200])
        return Release(lot_id, row.episode, row.state, [i for i in ids if i])

    async def quarantine(
        self, source: str, reason: str, raw: bytes, meta: dict[str, Any] | None = None,
        detail: str = "",
    ) -> None:
        await self.outbox.quarantine(source, reason, raw, meta, detail)

    async def wait_accepting(self) -> None:
        await self.outbox.wait_accepting()

    async def audit(
        self, state: str, *, source: str, reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        await self.outbox.audit(state, source=source, reason=reason, detail=detail)


def _brief(row: Any) -> dict[str, Any]:
    from edge.timefmt import utc_iso

    return {"lot_id": row.lot_id, "state": row.state, "episode": row.episode,
            "decided_by": row.decided_by,
            "decided_at": utc_iso(row.decided_at) if row.decided_at else None}
