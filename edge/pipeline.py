"""The ingest seam sources talk to: (rules) → outbox, implementing ``components.Ingest``.

``submit`` returns only after the outbox COMMIT, so a source may ack upstream right after
it. Rules (edge quality logic) run here, before storage, so a hold derived from an
inspection result is stored in the same transaction as the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from edge.components import Submission
from edge.outbox import Outbox

__all__ = ["Pipeline"]

Rule = Callable[[Sequence[Submission]], list[Submission]]


class Pipeline:
    def __init__(self, outbox: Outbox, rules: Sequence[Rule] = ()) -> None:
        self.outbox = outbox
        self.rules = list(rules)

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        """Store ``items`` (plus what rules derive); return the ids of ``items`` only."""
        extra: list[Submission] = []
        for rule in self.rules:
            extra.extend(rule(items))
        ids = await self.outbox.submit([*items, *extra], chain=chain)
        return ids[: len(items)]

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
