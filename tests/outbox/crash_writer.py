"""Child process for the kill -9 test: submit forever, print each id once committed."""

from __future__ import annotations

import asyncio
import sys

from edge.outbox import Outbox
from tests.support import sub


async def main(state_dir: str) -> None:
    ob = Outbox(state_dir, router=lambda ev: ["erp"])
    await ob.open()
    n = 0

    async def producer(p: int) -> None:
        nonlocal n
        while True:
            batch = [sub(key=f"lot:{p}", seq=n + i, pad="y" * 200) for i in range(7)]
            ids = await ob.submit(batch)  # returns only after COMMIT
            sys.stdout.write("".join(f"{i}\n" for i in ids))
            sys.stdout.flush()
            n += len(ids)

    await asyncio.gather(*(producer(p) for p in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
