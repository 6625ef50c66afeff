"""The FastAPI app: routes, status codes, auth and error rendering; nothing else.

Everything a route does beyond HTTP lives in `serving.CompletionService` and
`tokenization.TokenizerService`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from fireside.api.auth import BearerAuth
from fireside.api.chat import ChatService, chat_templates
from fireside.api.chat_protocol import parse_chat_request
from fireside.api.errors import APIError, from_validation_errors
from fireside.api.metrics import make_registry
from fireside.api.openapi import openapi_document
from fireside.api.openapi_paths import API_PREFIXES, TOKENIZER_PREFIXES
from fireside.api.plan import Caller
from fireside.api.protocol import parse_completion_request
from fireside.api.responses import Health, ModelInfo, model_list, perf_metrics_headers
from fireside.api.serving import ClientDisconnected, CompletionService
from fireside.api.tokenization import TokenizerService
from fireside.engine.client import EngineClient

logger = logging.getLogger(__name__)

# Room for a few base64 images; a text prompt is never near this.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# nginx's code for "client closed the request"; nobody reads it, but logs do.
_CLIENT_CLOSED = 499
# The hosted API's header for `prompt_cache_isolation_key` (the body field wins).
ISOLATION_HEADER = "x-prompt-cache-isolation-key"


def create_app(
    service: CompletionService,
    models: Sequence[ModelInfo] | None = None,
    api_keys: Sequence[str] = (),
    engines: Mapping[str, EngineClient] | None = None,
    *,
    chat_template: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    test_hooks: bool = False,
) -> FastAPI:
    """Build the app. `engines` defaults to the service's and `models` to one entry per
    engine; pass them to list something else (a display name, a creation time).
    `chat_template` (Jinja source) replaces every model file's own chat template."""
    engines = dict(service.engines if engines is None else engines)
    if models is None:
        created = int(time.time())
        models = [ModelInfo(name, e.context_length, created) for name, e in engines.items()]
    models_by_id = {model.id: model for model in models}
    auth = BearerAuth(api_keys)
    if auth.is_open:
        logger.warning(
            "auth off: no API key configured (--api-key or FIRESIDE_API_KEYS): "
            "anyone who can reach the server can use it"
        )
    else:
        logger.info("auth on: %d API key%s", auth.num_keys, "" if auth.num_keys == 1 else "s")
    registry = make_registry(engines, service.counters)

    app = FastAPI(title="Fireside", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    api = APIRouter(dependencies=[Depends(auth)], route_class=_GuardedRoute)

    chat = ChatService(service, chat_templates(service.engines, chat_template))

    async def read_request(request: Request) -> tuple[bytes, Caller]:
        if app.state.draining:
            raise APIError.unavailable("The server is shutting down; retry on another instance.")
        body = await _read_body(request, max_body_bytes)
        caller = Caller(auth.tenant_of(request), request.headers.get(ISOLATION_HEADER) or None)
        return body, caller

    async def create_completion(request: Request) -> Response:
        body, caller = await read_request(request)
        plan = await service.prepare(parse_completion_request(body), caller)
        request.state.completion_id = plan.cmpl_id  # its `done` line is the service's
        if plan.stream:
            return _event_stream(service.stream(plan))
        try:
            result = await service.complete(plan, request.is_disconnected)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        return JSONResponse(result.body, headers=perf_metrics_headers(result.perf_metrics))

    async def create_chat_completion(request: Request) -> Response:
        body, caller = await read_request(request)
        chat_plan = await chat.prepare(parse_chat_request(body), caller)
        request.state.completion_id = chat_plan.plan.cmpl_id
        if chat_plan.stream:
            return _event_stream(chat.stream(chat_plan))
        try:
            answer, result = await chat.complete(chat_plan, request.is_disconnected)
        except ClientDisconnected:
            return Response(status_code=_CLIENT_CLOSED)
        return JSONResponse(answer, headers=perf_metrics_headers(result.perf_metrics))

    async def list_models() -> JSONResponse:
        return JSONResponse(model_list(list(models_by_id.values())))

    async def get_model(model_id: str) -> JSONResponse:
        model = models_by_id.get(model_id)
        if model is None:
            raise APIError.model_not_found(model_id)
        return JSONResponse(model.to_dict())

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    tokenizer = TokenizerService(service.engines)

    async def tokenizer_info(model: str | None = None) -> JSONResponse:
        return JSONResponse(tokenizer.info(model))

    async def tokenize(request: Request) -> JSONResponse:
        return JSONResponse(await tokenizer.tokenize(await _read_body(request, max_body_bytes)))

    async def detokenize(request: Request) -> JSONResponse:
        return JSONResponse(tokenizer.detokenize(await _read_body(request, max_body_bytes)))

    for prefix in API_PREFIXES:
        api.add_api_route(f"{prefix}/completions", create_completion, methods=["POST"])
        api.add_api_route(f"{prefix}/chat/completions", create_chat_completion, methods=["POST"])
        api.add_api_route(f"{prefix}/models", list_models, methods=["GET"])
        # :path because model ids may contain "/" (they arrive percent-decoded).
        api.add_api_route(f"{prefix}/models/{{model_id:path}}", get_model, methods=["GET"])
    api.add_api_route("/metrics", metrics, methods=["GET"])
    # vLLM serves these at the root, where lm-evaluation-harness looks for them.
    for prefix in TOKENIZER_PREFIXES:
        api.add_api_route(f"{prefix}/tokenizer_info", tokenizer_info, methods=["GET"])
        api.add_api_route(f"{prefix}/tokenize", tokenize, methods=["POST"])
        api.add_api_route(f"{prefix}/detokenize", detokenize, methods=["POST"])
    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        # Open on purpose: load balancers and orchestrators probe it without a key.
        if app.state.draining:
            return JSONResponse(Health(status="draining"), status_code=503)
        if all(engine.is_healthy for engine in engines.values()):
            return JSONResponse(Health(status="ok"))
        return JSONResponse(Health(status="unavailable"), status_code=503)

    document = openapi_document()

    @app.get("/openapi.json")
    async def openapi() -> JSONResponse:
        # Open like /health: the document names no model and no key.
        return JSONResponse(document)

    if test_hooks:  # only when FIRESIDE_TEST_HOOKS=1: fault injection for tests

        async def crash_engine() -> JSONResponse:
            for engine in engines.values():
                engine.crash_for_test()  # type: ignore[attr-defined]
            return JSONResponse({"status": "crashing"})

        api_hooks = APIRouter(dependencies=[Depends(auth)])
        api_hooks.add_api_route("/_test/crash-engine", crash_engine, methods=["POST"])
        app.include_router(api_hooks)

    app.state.draining = False  # set on SIGTERM/SIGINT: new requests get 503
    return app


def _event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        # no-transform and X-Accel-Buffering stop proxies from holding events back.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)


def _refuse(request: Request, error: APIError) -> JSONResponse:
    """The error answer, and its `refused` log line (status and code: never the body
    or a key), unless the request had started: its `done` line tells how it ended."""
    if getattr(request.state, "completion_id", None) is None:
        logger.log(
            logging.WARNING if error.status >= 500 else logging.INFO,
            "refused %s %s status=%d code=%s",
            request.method,
            _path(request),
            error.status,
            error.code or "-",
        )
    return error_response(error)


def _path(request: Request) -> str:
    """The path for a log line: percent-encoded (no line breaks), at most 200 characters."""
    return quote(request.url.path[:200], safe="/:@!$&'()*+,;=-._~")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing early (413) once it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError.too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _GuardedRoute(APIRoute):
    """Turns an unexpected exception in a route into a 500 envelope.

    An app-level handler for `Exception` would also answer, but Starlette then
    re-raises the exception into the server; here the bug is logged once and the
    client gets a message that leaks nothing.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, HTTPException, RequestValidationError):
                raise  # rendered by the app's handlers
            except Exception:
                logger.exception("unhandled error in %s %s", request.method, _path(request))
                return _refuse(request, APIError.internal())

        return guarded


def _add_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        return _refuse(request, exc if isinstance(exc, APIError) else APIError.internal())

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        # FastAPI's default would be 422; the API promises 400.
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return _refuse(request, from_validation_errors(errors))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        if status == 404:
            return _refuse(request, APIError.not_found(f"Unknown path: {request.url.path[:200]}"))
        if status == 405:
            error = APIError.method_not_allowed()
            error.headers.update(getattr(exc, "headers", None) or {})
            return _refuse(request, error)
        detail = str(getattr(exc, "detail", "")) or "Request failed."
        return _refuse(request, APIError(status, detail, "invalid_request_error"))

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        # Reached only from outside the routes (a middleware); Starlette logs the traceback.
        return _refuse(request, APIError.internal())

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
