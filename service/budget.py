"""The process's memory budget for images: a request reserves its images' working memory before
decoding them and keeps it until it has answered, so concurrent requests together stay within
ACE_MEMORY_BUDGET_MB however large their uploads are.

One request needing more than the whole budget is refused at once (413); otherwise it waits up
to ACE_MEMORY_WAIT_S for its share (then 429). Not a queue: a smaller request that fits may go
ahead of a larger one waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from service.errors import ApiError

MB = 1024 * 1024


class MemoryBudget:
    def __init__(self, capacity_bytes: int, wait_s: float) -> None:
        self.capacity = capacity_bytes
        self.wait_s = wait_s
        self.reserved = 0  # bytes held by requests being decoded or answered
        self._released: asyncio.Event | None = None  # set (and replaced) whenever bytes come back

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int, what: str) -> AsyncIterator[None]:
        """Hold `nbytes` of the budget for the body of the `async with`."""
        if nbytes > self.capacity:
            raise ApiError(413, f"{what} need about {nbytes // MB} MB to decode and match, more than this "
                                f"service's image memory budget of {self.capacity // MB} MB "
                                "(ACE_MEMORY_BUDGET_MB); send smaller or fewer images")
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)  # no await: a cancelled request cannot skip it

    async def _acquire(self, nbytes: int) -> None:
        # one event loop thread: the check and the increment below run with no await between them
        try:
            async with asyncio.timeout(self.wait_s):
                while self.reserved + nbytes > self.capacity:
                    await self._release_event().wait()
        except TimeoutError as err:
            raise ApiError(429, f"the image memory budget is in use ({self.reserved // MB} of "
                                f"{self.capacity // MB} MB); retry later",
                           headers={"Retry-After": "2"}) from err
        self.reserved += nbytes

    def _release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        released, self._released = self._released, None
        if released is not None:
            released.set()  # every waiter checks again whether it fits now

    def _release_event(self) -> asyncio.Event:
        if self._released is None:
            self._released = asyncio.Event()
        return self._released
