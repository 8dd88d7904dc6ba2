"""The ingest seam sources talk to: (rules) → outbox, implementing ``components.Ingest``.

``submit`` returns only after the outbox COMMIT, so a source may ack upstream right after
it. Rules (edge quality logic) run here, before storage: each rule sees one submission at
a time and returns what it derives from it; those derived submissions are stored right
after their cause, in the same transaction, marked ``derived`` (DESIGN invariant 4). So in
a batch ``[r1, r2]`` of one lot where ``r1`` fails its spec, the stored order is
``r1, nonconformance, hold, r2``, and a redelivered ``r1`` that the outbox matches to its
first copy takes what it derived along (nothing is stored twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from edge.components import Submission
from edge.outbox import Outbox

__all__ = ["Pipeline"]

# One submission in → the submissions derived from it (stored right after it).
Rule = Callable[[Submission], Sequence[Submission]]


class Pipeline:
    def __init__(self, outbox: Outbox, rules: Sequence[Rule] = ()) -> None:
        self.outbox = outbox
        self.rules = list(rules)

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        """Store ``items``, each followed by what the rules derive from it; return the ids
        of ``items`` only, in order (see ``components.Ingest.submit`` for errors, ``chain``).
        """
        if not self.rules:
            return await self.outbox.submit(items, chain=chain)
        batch: list[Submission] = []
        causes: list[int] = []  # position of each of ``items`` in ``batch``
        for item in items:
            causes.append(len(batch))
            batch.append(item)
            for rule in self.rules:
                batch.extend(d if d.derived else replace(d, derived=True) for d in rule(item))
        ids = await self.outbox.submit(batch, chain=chain)
        return [ids[i] for i in causes]

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
