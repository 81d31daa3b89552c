"""The FastAPI gateway: images in, top-k classes out, with Triton doing the inference.

`create_app()` wires settings, the Triton replica pool, the preprocessing threads, the shared-memory
region for input tensors, the routes (`server.routes`), one middleware for request ids, metrics and
logs, and the error handlers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import tracing
from .deps import InferenceSlots
from .drain import Drain, drain_on_sigterm
from .errors import GatewayError
from .inputs import BufferedBodies
from .metrics import GatewayMetrics
from .preprocess import DecodeBudget, release_memory
from .replicas import ReplicaPool
from .routes import health, kserve, models
from .security import require_key_for_docs
from .settings import NoApiKeys, Settings, SettingsError, get_settings
from .shadow import CanaryWatch
from .shared_memory import input_region
from .triton import REPOSITORY_KEY_HEADER

log = logging.getLogger("server")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TRITON_ERROR_CODES = {"triton_unavailable", "triton_timeout", "triton_error"}
KSERVE_PREFIX = "/v2/"
# Swagger UI's and ReDoc's files, as the fastapi-offline package ships them.
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_ASSETS_PATH = "/docs/assets"


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    if not settings.log_json or any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # The OpenTelemetry SDK logs its export failures itself: in the same JSON lines, not plain text between them.
    otel = logging.getLogger("opentelemetry")
    otel.addHandler(handler)
    otel.propagate = False


class RequestContextMiddleware:
    """Request id (accepted or made, always echoed), per-request metrics, and one JSON log line."""

    def __init__(self, app, metrics: GatewayMetrics, bodies: BufferedBodies, drain: Drain) -> None:
        self.app, self.metrics, self.bodies, self.drain = app, metrics, bodies, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        context: dict[str, Any] = {"request_id": request_id, "model": None, "stages": {}, "inference": False}
        scope.setdefault("state", {})["context"] = context
        started = time.perf_counter()
        sizes = {"request": 0, "response": 0}
        status = 500

        async def counting_receive():
            message = await receive()
            sizes["request"] += len(message.get("body", b""))
            return message

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                answer_headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if self.drain.active:
                    # The connection ends with this answer: the client's next request opens a new one,
                    # which the stopping gateway refuses cleanly instead of cutting it off (server/drain.py).
                    answer_headers.append((b"connection", b"close"))
                message["headers"] = answer_headers
            elif message["type"] == "http.response.body":
                sizes["response"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        except Exception:
            # Answered (500) by the catch-all handler, which Starlette runs outside this middleware: the
            # code is set here so that the error is counted and logged like every other.
            context["error_code"] = "internal_error"
            raise
        finally:
            # The request's body is gone with it: its reservation too, on every path.
            self.bodies.release(context.pop("buffered_bytes", 0))
            total = time.perf_counter() - started
            self._record(scope, context, status, total, sizes)

    def _record(self, scope, context: dict, status: int, total: float, sizes: dict) -> None:
        metrics, model = self.metrics, context["model"] or "unknown"
        if context["inference"]:
            metrics.requests.labels(model, str(status)).inc()
            if scope["path"].endswith("/classify"):
                version = context.get("version") or "none"
                metrics.version_requests.labels(model, version, str(status)).inc()
                metrics.version_seconds.labels(model, version).observe(total)
            metrics.observe_stage("total", total)
            for stage, seconds in context["stages"].items():
                metrics.observe_stage(stage, seconds)
            metrics.request_bytes.observe(sizes["request"])
            metrics.response_bytes.observe(sizes["response"])
        code = context.get("error_code")
        if code:
            metrics.rejections.labels(code).inc()
            if code in TRITON_ERROR_CODES:
                metrics.triton_errors.labels(code).inc()
        if scope["path"] in ("/healthz", "/readyz", "/metrics") and status < 400:
            return  # probes and scrapes would drown the log
        log.info(
            "request",
            extra={
                "fields": {
                    "request_id": context["request_id"],
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "model": context["model"],
                    **({"version": context["version"]} if context.get("version") else {}),
                    **({"degraded_to": context["degraded_to"]} if context.get("degraded_to") else {}),
                    "duration_ms": round(total * 1000, 3),
                    "stages_ms": {k: round(v * 1000, 3) for k, v in context["stages"].items()},
                    **({"error": code} if code else {}),
                }
            },
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    if settings is None:
        try:
            settings = get_settings()
        except SettingsError as e:
            # One line and exit status 2 before anything listens, as for a bad command-line flag.
            print(f"gateway: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    configure_logging(settings)
    # Pillow's own decompression-bomb guard, set explicitly; the gateway also checks before decoding and
    # answers 413 itself, so Pillow's warning for images past the limit would only be a stray log line.
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        key = settings.triton_repository_key.get_secret_value() if settings.triton_repository_key else ""
        # Whatever was made is undone, last first, even when a later step fails.
        async with AsyncExitStack() as made:
            if tracer_provider is not None:
                made.callback(tracing.shut_down, tracer_provider)  # undone last: the last spans go out, within 2 s
            app.state.input_region = region = input_region(
                settings.shared_memory_slots, settings.shared_memory_slot_bytes
            )
            if region:
                made.callback(region.close)
            if region:
                region.on_change = metrics.shared_memory_free_slots.set
                metrics.shared_memory_free_slots.set(region.free_slots)
            app.state.replicas = replicas = ReplicaPool(
                settings.triton_url,
                protocol=settings.triton_protocol,
                timeout_s=settings.triton_timeout_s,
                info_ttl_s=settings.model_info_ttl_s,
                repository_key=key or None,
                region=region,
                tracer=app.state.tracer,
            )
            made.push_async_callback(replicas.close)
            made.push_async_callback(app.state.canary_watch.close)  # shadow calls end before the replicas
            await replicas.start()
            # The KServe v2 pass-through carries Triton's key on every call, as the replicas' clients do.
            app.state.triton_proxy = proxy = httpx.AsyncClient(
                base_url=f"http://{settings.triton_http_url}",
                timeout=settings.triton_timeout_s,
                headers={REPOSITORY_KEY_HEADER: key} if key else None,
            )
            made.push_async_callback(proxy.aclose)
            app.state.preprocess_executor = executor = ThreadPoolExecutor(
                settings.preprocess_threads, thread_name_prefix="preprocess"
            )
            made.callback(executor.shutdown, wait=False, cancel_futures=True)
            # Last, once the gateway can serve: a SIGTERM before this stops uvicorn at once.
            hand_back = drain_on_sigterm(app.state.drain, settings)
            if hand_back:
                made.callback(hand_back)
            yield

    tracer_provider = tracing.tracer_provider(settings)
    app = FastAPI(
        title="Image classification gateway",
        description="Classifies images with models served by Triton Inference Server.",
        version="0.1.0",
        lifespan=lifespan,
        # Served by _install_docs instead: from the gateway's own files, behind the key if so set.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry=tracing.fastapi_telemetry(tracer_provider),
    )
    app.state.tracer_provider, app.state.tracer = tracer_provider, tracing.tracer_of(tracer_provider)
    metrics = GatewayMetrics()
    app.state.settings, app.state.metrics = settings, metrics
    app.state.drain = drain = Drain()
    app.state.canary_watch = CanaryWatch(metrics, settings.shadow_concurrency)
    app.state.inference_slots = InferenceSlots(settings.max_in_flight, metrics, drain)
    app.state.decode_budget = DecodeBudget(
        settings.decode_pixel_budget, settings.large_image_pixels, settings.max_large_decodes
    )
    try:
        app.state.api_keys = tuple(k.encode() for k in settings.load_api_keys())
    except NoApiKeys as e:
        # One line and a non-zero exit, before anything listens: never a gateway silently open to all.
        raise SystemExit(f"gateway: error: {e}") from None
    app.state.bodies = bodies = BufferedBodies(settings.buffered_body_limit(), on_large_release=release_memory)
    app.include_router(health)
    app.include_router(models)
    app.include_router(kserve)
    _install_docs(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, bodies=bodies, drain=drain)
    _install_error_handlers(app)
    return app


def _install_docs(app: FastAPI) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc, their scripts and styles served by the gateway itself
    (from the fastapi-offline package's copies), so the docs render without reaching the internet."""
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    docs = APIRouter(include_in_schema=False, dependencies=[Depends(require_key_for_docs)])

    @docs.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @docs.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would ask a public validator
        )

    @docs.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )

    app.include_router(docs)


def _json_error(request: Request, status: int, code: str, message: str, headers=None) -> JSONResponse:
    context = getattr(request.state, "context", None)
    if context is not None:
        context["error_code"] = code
    # KServe v2 clients (tritonclient among them) read an error as {"error": "<message>"}.
    body = {"error": message} if request.url.path.startswith(KSERVE_PREFIX) else error_body(code, message)
    return JSONResponse(body, status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return _json_error(request, error.status, error.code, error.message, error.headers())

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in error.errors()
        )
        return _json_error(request, 422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _json_error(request, error.status_code, code, str(error.detail), error.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, error: ClientDisconnect) -> JSONResponse:
        # No one is left to read it; 499 (as nginx logs a client that closed its request) keeps a client's
        # hang-up out of the gateway's own 5xx errors.
        return _json_error(request, 499, "client_disconnected", "the client closed the connection mid-request")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _json_error(request, 500, "internal_error", "internal error; see the gateway log")
