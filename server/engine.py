"""The seam between HTTP and the model: the app submits work, the engine decides how it runs.

``SerialEngine`` runs one request at a time on a single worker thread, so the event loop stays
free to accept HELM's 30 concurrent connections while the GPU works. A batching engine (many
requests per forward pass) replaces it behind the same ``process`` coroutine.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from server.generate import Generator
from server.schemas import Completion, ProcessRequest


class Engine(Protocol):
    async def process(self, request: ProcessRequest) -> tuple[list[Completion], int]:
        """Completions for ``request`` and the number of prompt tokens dropped to fit the context."""
        ...

    def close(self) -> None: ...


class SerialEngine:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def process(self, request: ProcessRequest) -> tuple[list[Completion], int]:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.generator.run, request)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
