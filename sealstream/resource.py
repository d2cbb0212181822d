"""The base of long-lived objects (trio's ``AsyncResource``): ``async with`` runs ``_start``;
whatever ``_start`` pushes on ``self._stack`` is undone by ``aclose``, which is idempotent and
also runs when ``_start`` fails half-way."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Self

__all__ = ["AsyncResource"]


class AsyncResource:
    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()

    async def _start(self) -> None:
        """Acquire; push every release on ``self._stack``."""

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release everything, in reverse order; idempotent."""
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await stack.aclose()
