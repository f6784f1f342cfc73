"""The HTTP app: OpenAI chat completions, models, health, metrics and the web page (docs/serving.md).

    app = create_app(ServeConfig(build=Path("builds/default")))   # uvicorn.run(app, ...)

Routes: POST /v1/chat/completions, GET /v1/models[/{id}], GET /health, GET /metrics, GET / (page).
With an API key, every route but /health and the page (and /metrics with metrics_open) needs
`Authorization: Bearer KEY`; the key is compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from runtime.pipeline import Pipeline
from serving.http.config import ServeConfig
from serving.http.errors import ApiError
from serving.http.metrics import Metrics
from serving.http.prepare import Preparer
from serving.http.protocol import ChatRequest, parse_chat
from serving.http.responses import Completion, chunk, completion_body, model_card
from serving.http.scheduler import Done, Failed, Job, QueueFull, Scheduler, Token, timeout_error

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 0.25  # how often a waiting non-streamed request checks that its client is still there


class ClientGone(Exception):
    """The client closed the connection before its answer was done."""


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _read_json(request: Request, limit: int) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415, f"the body must be JSON (Content-Type: application/json), got {media or 'none'!r}", "invalid_media"
        )
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413, f"the body is over the server's limit of {limit:,} bytes; send a smaller image", "body_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object", "invalid_json") from None


def create_app(config: ServeConfig, pipeline: Pipeline | None = None) -> FastAPI:
    """The app for one build; loads the pipeline unless one is given (tests pass their own)."""
    if pipeline is None:
        pipeline = Pipeline.load(config.build, provider=config.provider, backend=config.backend)
    scheduler = Scheduler(pipeline, config.max_queue)
    metrics = Metrics(lambda: scheduler.waiting, lambda: scheduler.busy)
    preparer = Preparer(pipeline, config)
    model_id = config.model_id
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        log.info("serving %s (%s) from %s", model_id, pipeline.backend.name, config.build)
        yield
        scheduler.stop()
        preparer.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="CoreMatching edge server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.pipeline = scheduler, metrics, pipeline

    def refuse(error: ApiError) -> JSONResponse:
        metrics.requests.labels(str(error.status)).inc()
        metrics.errors.labels(error.code).inc()
        if error.status >= 500:
            log.error("%s: %s", error.code, error.message)
        else:
            log.info("refused (%d %s): %s", error.status, error.code, error.message)
        return _error_response(error)

    expected = None if config.api_key is None else config.api_key.encode()

    async def authorized(request: Request) -> None:
        """Refuses (401, OpenAI's shape) a request without the server's key; nothing to check without one."""
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            message = "no API key: send the header Authorization: Bearer KEY (the server's --api-key)"
        elif hmac.compare_digest(given.strip().encode(), expected):
            return
        else:
            message = "the API key is wrong: send the server's --api-key as Authorization: Bearer KEY"
        raise ApiError(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return refuse(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        status, path = error.status_code, request.url.path
        messages = {
            404: ("not_found", f"no route {path}; the API is POST /v1/chat/completions and GET /v1/models"),
            405: ("method_not_allowed", f"{request.method} is not allowed on {path}"),
        }
        code, message = messages.get(status, ("http_error", str(error.detail)))
        return _error_response(ApiError(status, message, code))

    @app.exception_handler(Exception)
    async def server_error(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return refuse(ApiError(500, f"internal error ({type(error).__name__}); see the server's log", "internal"))

    async def next_event(job: Job, request: Request | None) -> Token | Done | Failed:
        """The job's next event; a deadline passed or (non-streamed) a client gone abandon the job."""
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                scheduler.abandon(job)
                return Failed(timeout_error(job.timeout))
            if request is not None and time.monotonic() - job.checked > POLL_SECONDS:
                job.checked = time.monotonic()
                if await request.is_disconnected():
                    scheduler.abandon(job)
                    raise ClientGone
            try:
                return await asyncio.wait_for(job.events.get(), timeout=min(POLL_SECONDS, remaining))
            except asyncio.TimeoutError:
                pass

    def add_token(job: Job, completion: Completion, token: Token) -> dict[str, Any]:
        if completion.first_token is None:
            metrics.ttft.observe(time.monotonic() - job.arrived)
        return completion.add(token)

    def finished(job: Job, completion: Completion) -> None:
        if completion.first_token is None:  # the answer was only an end-of-sequence token
            metrics.ttft.observe(time.monotonic() - job.arrived)
        metrics.answered(completion.answer, time.monotonic() - job.arrived)
        metrics.requests.labels("200").inc()

    async def stream_events(job: Job, chat: ChatRequest, rid: str) -> AsyncIterator[bytes]:
        completion = Completion(rid, model_id, created, pipeline)
        done = False
        try:
            yield chunk(completion.role_chunk())
            while True:
                event = await next_event(job, None)
                if isinstance(event, Token):
                    yield chunk(add_token(job, completion, event))
                elif isinstance(event, Done):
                    completion.finish(event.answer, job)
                    yield chunk(completion.final_chunk())
                    if chat.include_usage:
                        yield chunk(completion.usage_chunk())
                    yield b"data: [DONE]\n\n"
                    finished(job, completion)
                    done = True
                    return
                else:
                    # Headers are sent: the error goes in the stream, as OpenAI's does.
                    metrics.requests.labels(str(event.error.status)).inc()
                    metrics.errors.labels(event.error.code).inc()
                    yield chunk(event.error.body())
                    done = True
                    return
        finally:
            if not done:  # the client went away mid-stream (the response task was cancelled)
                scheduler.abandon(job)
                metrics.requests.labels("499").inc()
                metrics.errors.labels("client_disconnected").inc()
                log.info("client disconnected mid-stream; generation stopped")

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        chat = parse_chat(await _read_json(request, config.max_body_bytes), model_id, config.allow_local_files)
        encoded, max_tokens = preparer.encode(chat)  # the question's faults are found before the queue is asked
        try:
            scheduler.reserve()
        except QueueFull as e:
            raise ApiError(
                429,
                f"the server is busy ({config.max_queue} requests waiting); retry after {e.retry_after} s",
                "queue_full",
                kind="rate_limit_error",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        loop = asyncio.get_running_loop()
        try:
            # One preparing thread: decoded images (the large allocations) are bounded by the queue.
            prompt = await loop.run_in_executor(preparer.executor, preparer, chat, encoded, max_tokens)
        except BaseException:
            scheduler.unreserve()
            raise
        job = Job(prompt, chat.sampling, loop, config.timeout, arrived=arrived, stop=chat.stop)
        scheduler.submit(job)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if chat.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(stream_events(job, chat, rid), media_type="text/event-stream", headers=headers)
        completion = Completion(rid, model_id, created, pipeline)
        try:
            while True:
                event = await next_event(job, request)
                if isinstance(event, Token):
                    add_token(job, completion, event)
                elif isinstance(event, Done):
                    completion.finish(event.answer, job)
                    finished(job, completion)
                    return JSONResponse(completion_body(completion))
                else:
                    return refuse(event.error)
        except ClientGone:
            metrics.requests.labels("499").inc()
            metrics.errors.labels("client_disconnected").inc()
            log.info("client disconnected while waiting; generation stopped")
            return Response(status_code=499)
        except asyncio.CancelledError:
            scheduler.abandon(job)
            raise

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(model_id, created, pipeline, config)]}

    @app.get("/v1/models/{name:path}", dependencies=protected)
    async def model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise ApiError(
                404, f"the model {name!r} does not exist; this server serves {model_id!r}", "model_not_found"
            )
        return model_card(model_id, created, pipeline, config)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_id,
            "backend": pipeline.backend.name,
            "queue": scheduler.waiting,
            "busy": scheduler.busy,
        }

    @app.get("/metrics", dependencies=[] if config.metrics_open else protected)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
