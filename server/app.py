"""FastAPI app: ``/process``, ``/tokenize``, ``/decode`` exactly as HELM calls them, plus ``/health``.

The app never touches the model: generation goes through an ``Engine``; tokenization through the
model's ``Codec`` (cheap, so it runs on the event loop).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.engine import Busy, ClientGone, Engine, FieldError, RequestFailed, Unavailable
from server.generate import RequestTooLong
from server.schemas import (
    DecodeRequest,
    DecodeResponse,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.text import Codec


def _field_error(field: str | list, message: str) -> RequestValidationError:
    loc = ["body", *field] if isinstance(field, list) else ["body", field]
    return RequestValidationError([{"loc": tuple(loc), "msg": message, "type": "value_error"}])


async def _disconnect(request: Request) -> None:
    """Completes when the client goes away (the body has been read, so only http.disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, codec: Codec, model_name: str = "model", drain_s: float = 30.0) -> FastAPI:
    """``drain_s``: at shutdown, how long the engine may take to finish before it is abandoned."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close(timeout=drain_s)

    app = FastAPI(
        title="onegpu server",
        description="HELM `neurips/local` endpoints for a litgpt checkpoint (NeurIPS 2023 LLM efficiency challenge).",
        lifespan=lifespan,
    )

    @app.post("/process", response_model=ProcessResponse)
    async def process(req: ProcessRequest, request: Request):
        start = time.perf_counter()
        try:
            completions, dropped = await engine.process(req, lambda: _disconnect(request))
        except RequestTooLong as e:
            raise _field_error("max_new_tokens", str(e)) from None
        except FieldError as e:
            raise _field_error(e.field, str(e)) from None
        except Busy as e:
            return JSONResponse(status_code=503, content={"detail": str(e)}, headers={"Retry-After": str(e.retry_after)})
        except Unavailable as e:
            return JSONResponse(status_code=503, content={"detail": str(e)}, headers={"Retry-After": "5"})
        except RequestFailed as e:
            return JSONResponse(status_code=500, content={"detail": str(e)})
        except ClientGone:
            return JSONResponse(status_code=499, content={"detail": "the client disconnected"})  # nobody reads it
        first = completions[0]
        return ProcessResponse(
            text=first.text,
            tokens=first.tokens,
            logprob=first.logprob,
            request_time=time.perf_counter() - start,
            completions=completions,
            truncated_prompt_tokens=dropped,
        )

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        start = time.perf_counter()
        ids = codec.encode(req.text)
        if req.truncation:
            ids = ids[: req.max_length]
        return TokenizeResponse(tokens=ids, request_time=time.perf_counter() - start)

    @app.post("/decode", response_model=DecodeResponse)
    async def decode(req: DecodeRequest) -> DecodeResponse:
        start = time.perf_counter()
        for i, t in enumerate(req.tokens):
            if not 0 <= t < codec.vocab_size:
                raise _field_error(["tokens", i], f"token id {t} is outside the vocabulary [0, {codec.vocab_size})")
        return DecodeResponse(text=codec.decode(req.tokens), request_time=time.perf_counter() - start)

    @app.get("/health")
    async def health():
        stats = getattr(engine, "stats", None)  # the batched engine's counters (prefix reuse, steps)
        extra = {"engine": dict(stats)} if stats else {}
        if (reason := engine.health()) is not None:
            return JSONResponse(status_code=503, content={"status": "unavailable", "reason": reason, "model": model_name, **extra})
        return {"status": "ready", "model": model_name, **extra}

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default 422 body, minus the echoed input (prompts can be long).
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    return app
