"""The seam between HTTP and the model: the app submits work, the engine decides how it runs.

- ``BatchEngine`` (server/batch_engine.py): continuous batching over the paged KV cache; the default.
- ``SerialEngine``: one request at a time on litgpt's own forward, on a single worker thread (so
  the event loop stays free to accept HELM's 30 concurrent connections). It is the reference the
  batched engine is tested against, and the fallback for models the batched forward doesn't cover.

Both answer what the app needs to tell the truth: ``health()`` (None when ready, else the reason),
and errors the app maps to HTTP statuses (``Busy`` 503 with Retry-After, ``Unavailable`` 503,
``RequestFailed`` 500).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol

from server.generate import Generator
from server.paged_model import unsupported_reason
from server.schemas import Completion, ProcessRequest

EngineKind = Literal["auto", "batched", "serial"]


class FieldError(ValueError):
    """A request this server can never answer as asked, because of ``field`` (HTTP 422 naming it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Busy(RuntimeError):
    """The queue is full: come back in ``retry_after`` seconds (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(RuntimeError):
    """The engine is draining, stopped or dead (HTTP 503)."""


class RequestFailed(RuntimeError):
    """This request failed inside the engine; others go on (HTTP 500 with the reason)."""


class ClientGone(RuntimeError):
    """The client disconnected before its answer; nobody reads the response."""


class Engine(Protocol):
    async def process(self, request: ProcessRequest, disconnected: Callable[[], Awaitable] | None = None) -> tuple[list[Completion], int]:
        """Completions for ``request`` and the number of prompt tokens dropped to fit the window.

        ``disconnected()`` completes when the client goes away; the request is then cancelled."""
        ...

    def health(self) -> str | None:
        """None while the engine serves; otherwise why not."""
        ...

    def drain(self) -> None:
        """Refuse new requests (503); the ones in flight go on."""
        ...

    def close(self, timeout: float = 30.0) -> None: ...


async def until_done_or_gone(future: asyncio.Future, disconnected: Callable[[], Awaitable] | None):
    """The future's result, or ``ClientGone`` (the future cancelled) if ``disconnected()`` completes first."""
    if disconnected is None:
        return await future
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not future.done():
            future.cancel()
    if future.cancelled():
        raise ClientGone("the client disconnected")
    return future.result()


class SerialEngine:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._draining = False

    async def process(self, request: ProcessRequest, disconnected: Callable[[], Awaitable] | None = None) -> tuple[list[Completion], int]:
        if self._draining:
            raise Unavailable("the server is shutting down")
        future = asyncio.wrap_future(self._worker.submit(self.generator.run, request))
        return await until_done_or_gone(future, disconnected)

    def health(self) -> str | None:
        return "the server is shutting down" if self._draining else None

    def drain(self) -> None:
        self._draining = True

    def close(self, timeout: float = 30.0) -> None:
        self._draining = True
        self._worker.shutdown(wait=False, cancel_futures=True)


BATCH_ONLY = ("max_batch", "prefill_tokens", "kv_block_size", "kv_tokens", "max_queue", "kv_reservation", "attention_tokens")
# the batched engine's scheduling and KV options: the serial engine has no pool, batch or queue, so a value given
# for it would change nothing (--gpu_memory_gib caps the process for both; --cuda_graphs off is what serial does)


def batch_default(name: str):
    """``BatchEngine``'s default for one of its options (read from its signature, not restated)."""
    from server.batch_engine import BatchEngine

    return inspect.signature(BatchEngine.__init__).parameters[name].default


def make_engine(generator: Generator, kind: EngineKind = "auto", **batch_options) -> Engine:
    """``kind``: "batched", "serial", or "auto" (batched unless the model needs the serial path).

    ``batch_options`` go to ``BatchEngine`` (see its arguments)."""
    if kind not in ("auto", "batched", "serial"):
        raise ValueError(f"engine: choose one of auto, batched, serial, got {kind!r}")
    reason = unsupported_reason(generator.model)
    if kind == "batched" and reason is not None:
        raise ValueError(f"engine: the batched engine does not support {reason}; use --engine serial")
    if kind == "serial" or reason is not None:
        why = f"the batched engine does not support {reason}" if reason else "--engine serial"
        if batch_options.get("compile_decode"):  # compiles the batched engine's decode: not silently dropped
            raise ValueError(f"compile_decode: only the batched engine compiles its decode ({why}); leave it off")
        if batch_options.get("overlap_decode"):
            raise ValueError(f"overlap_decode: only the batched engine overlaps its decode steps ({why}); leave it off")
        for name, value in batch_options.items():
            if name in BATCH_ONLY and value != (default := batch_default(name)):
                raise ValueError(f"{name}: only the batched engine uses it ({why}); leave it at its default ({default!r})")
        if reason is not None:
            print(f"engine: serving one request at a time: the batched engine does not support {reason}", file=sys.stderr)
        return SerialEngine(generator)
    from server.batch_engine import BatchEngine

    return BatchEngine(generator, **batch_options)
