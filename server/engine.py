"""The seam between HTTP and the model: the app submits work, the engine decides how it runs.

- ``BatchEngine`` (server/batch_engine.py): continuous batching; the default.
- ``SerialEngine``: one request at a time on litgpt's own forward, on a single worker thread (so
  the event loop stays free to accept HELM's 30 concurrent connections). It is the reference the
  batched engine is tested against, and the fallback for models the batched forward doesn't cover.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from server.batched_model import unsupported_reason
from server.generate import Generator
from server.schemas import Completion, ProcessRequest

ENGINES = ("auto", "batched", "serial")


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


def make_engine(generator: Generator, kind: str = "auto", **batch_options) -> Engine:
    """``kind``: "batched", "serial", or "auto" (batched unless the model needs the serial path).

    ``batch_options`` go to ``BatchEngine`` (decode_rows, prompt_rows, prefill_tokens, cuda_graphs).
    """
    if kind not in ENGINES:
        raise ValueError(f"engine: choose one of {list(ENGINES)}, got {kind!r}")
    reason = unsupported_reason(generator.model)
    if kind == "batched" and reason is not None:
        raise ValueError(f"engine: the batched engine does not support {reason}; use --engine serial")
    if kind == "serial" or reason is not None:
        if reason is not None:
            print(f"engine: serving one request at a time: the batched engine does not support {reason}", file=sys.stderr)
        return SerialEngine(generator)
    from server.batch_engine import BatchEngine

    return BatchEngine(generator, **batch_options)
