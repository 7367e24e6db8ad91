"""The HTTP front: FastAPI routes in OpenAI's Images API shape over the served models' batchers.

``create_app(["export-folder", "name=other-folder"])`` loads every export (their replicas start
here) and returns the app; ``aotdiffusion serve`` runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..pipelines.auto import IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_IMAGE
from . import errors, uploads
from .batcher import CallKey, Item, QueueFull
from .errors import APIError
from .metrics import CONTENT_TYPE, Metrics
from .registry import Registry, ServedExport, ServeOptions
from .schema import (
    MAX_SEED,
    EditForm,
    ErrorResponse,
    GenerationRequest,
    ImageData,
    ImageOptions,
    ImagesResponse,
    ModelCard,
    ModelList,
)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
EVENT_TYPES = ("image_generation.progress", "image_generation.completed", "error")
# An operator's cap on the work one request may ask for (diffusers' own default is 50 steps).
DEFAULT_MAX_STEPS = 150
PAGE = Path(__file__).with_name("page.html")
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)}


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413 before it is read into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = errors.error_response(413, self._message(int(length)), code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # a chunked body without Content-Length
                raise HTTPException(413, self._message(seen))
            return message

        return await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return (
            f"The request body is {size} bytes; this server takes at most {self.max_bytes} (--max-upload-mb). "
            "Send a smaller image."
        )


class ApiKey:
    """Dependency: the ``Authorization: Bearer KEY`` header must carry the server's key, when it has one."""

    def __init__(self, key: str | None):
        self.key = key

    def __call__(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.key.encode()):
            raise APIError(
                401, "Missing or wrong API key: send the header `Authorization: Bearer <key>` with the key the "
                "server was started with (--api-key).", code="invalid_api_key",
            )  # fmt: skip


class CountResponses:
    """ASGI middleware: every response counted by route and status (a plain ASGI one: Starlette's
    BaseHTTPMiddleware wraps ``receive`` and would hide a client's disconnect from the routes)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.responses.labels(endpoint=route, status=str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


def create_app(
    exports: Sequence[str | Path],
    *,
    replicas: int = 1,
    max_wait_ms: float = 50.0,
    max_queue: int = 64,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_steps: int = DEFAULT_MAX_STEPS,
    api_key: str | None = None,
    trust_remote_code: bool = False,
    replica_processes: bool = False,
    batching: bool = True,
    registry: Registry | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The server for ``exports`` (folders, or ``NAME=FOLDER``), with its models loaded.

    ``registry`` (with the ``metrics`` it reports to) replaces loading the exports here: the Ray Serve
    front passes one whose exports run on Ray Serve deployments.
    """
    metrics = metrics or Metrics()
    if registry is None:
        options = ServeOptions(replicas, max_wait_ms, max_queue, trust_remote_code, replica_processes, batching)
        registry = Registry.load(exports, options, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await registry.close()

    for export in registry.exports():
        if export.info.default_steps > max_steps:
            raise ValueError(
                f"--max-steps {max_steps} is below the {export.info.default_steps} steps model {export.model_name!r} "
                "runs when a request names none: every such request would be refused. Raise --max-steps."
            )
    app = FastAPI(
        title="aotdiffusion",
        version="1",
        description="Ahead-of-time compiled Stable Diffusion pipelines behind OpenAI's Images API.",
        lifespan=lifespan,
    )
    app.state.registry, app.state.metrics = registry, metrics
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)

    app.add_middleware(CountResponses, metrics=metrics)

    guarded = [Depends(ApiKey(api_key))]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        exports = registry.exports()
        return {
            "status": "ok",
            "models": list(registry.models),
            "queued_requests": sum(export.queued_requests for export in exports),
            "busy_replicas": sum(export.busy_replicas for export in exports),
        }

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def prometheus() -> Response:
        """Prometheus metrics, in its text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/v1/models", dependencies=guarded, responses=ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[_card(model) for model in registry.models.values()])

    @app.get("/v1/models/{model_id}", dependencies=guarded, responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        return _card(registry.model(model_id))

    # Each event's data: {"type": "image_generation.progress", "step", "total"}, then per image
    # {"type": "image_generation.completed", "index", "b64_json", "seed", ...}, or {"type": "error", "error"}.
    payload = {"type": "object", "required": ["type"], "properties": {"type": {"enum": list(EVENT_TYPES)}}}
    event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"enum": list(EVENT_TYPES)},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
    }}  # fmt: skip
    streamed = {200: {"content": {"text/event-stream": {"schema": event}},
                      "description": "JSON, or server-sent events with stream=true"}}  # fmt: skip

    @app.post("/v1/images/generations", dependencies=guarded, responses={**ERRORS, **streamed})
    async def generations(body: GenerationRequest, request: Request) -> ImagesResponse:
        export, key, items, seeds = _plan(registry, body, TEXT_TO_IMAGE, max_steps)
        if body.stream:
            return _stream(export, key, items, body, seeds)
        return await _generate(request, export, key, items, body, seeds, "generations")

    @app.post("/v1/images/edits", dependencies=guarded, responses=ERRORS)
    async def edits(
        request: Request,
        form: Annotated[EditForm, Form()],
    ) -> ImagesResponse:
        image, mask = form.image, form.mask
        task = INPAINTING if mask is not None else IMAGE_TO_IMAGE
        export, key, items, seeds = _plan(registry, form, task, max_steps)
        size = (export.info.width, export.info.height)
        image_data = await image.read()
        picture = await asyncio.to_thread(uploads.read_image, image_data, size, resize=form.resize)
        mask_image = None
        if mask is not None:
            original = await asyncio.to_thread(_image_size, image_data)
            mask_image = await asyncio.to_thread(
                uploads.read_mask, await mask.read(), original, size, resize=form.resize
            )
        items = [dataclasses.replace(item, image=picture, mask=mask_image) for item in items]
        return await _generate(request, export, key, items, form, seeds, "edits")

    async def _generate(request, export, key, items, body, seeds, endpoint) -> ImagesResponse:
        start = time.monotonic()
        work = asyncio.ensure_future(_submit(export, key, items, body.n))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the client went away: its slots leave the queue
        if not work.done() or work.cancelled():
            return JSONResponse({"error": {"message": "client closed the request"}}, status_code=499)
        images = work.result()
        model = export.model_name
        metrics.request_seconds.labels(model=model, endpoint=endpoint).observe(time.monotonic() - start)
        metrics.images_served.labels(model=model).inc(len(images))
        return _response(images, seeds)

    def _stream(export: ServedExport, key: CallKey, items: list[Item], body, seeds) -> StreamingResponse:
        events: asyncio.Queue = asyncio.Queue()

        async def produce() -> None:
            try:
                images = await _submit(export, key, items, body.n, lambda step: events.put_nowait(("progress", step)))
                events.put_nowait(("done", images))
            except APIError as error:
                events.put_nowait(("error", error))
            except Exception as error:
                events.put_nowait(("error", APIError(500, f"The server failed: {type(error).__name__}: {error}")))

        async def stream() -> AsyncIterator[str]:
            task = asyncio.ensure_future(produce())
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "progress":
                        yield _event("image_generation.progress", {"type": "image_generation.progress", **value})
                    elif kind == "error":
                        error = {"message": value.message, "type": errors.TYPES.get(value.status, "server_error"),
                                 "param": value.param, "code": value.code}  # fmt: skip
                        yield _event("error", {"type": "error", "error": error})
                        return
                    else:
                        for index, (png, seed) in enumerate(zip(value, seeds)):
                            payload = {"type": "image_generation.completed", "index": index,
                                       "b64_json": base64.b64encode(png).decode(), "seed": seed,
                                       "size": export.info.size, "output_format": "png",
                                       "created_at": int(time.time())}  # fmt: skip
                            yield _event("image_generation.completed", payload)
                        return
            finally:
                task.cancel()  # the client went away mid-stream: its queued entries are dropped

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app


async def _submit(export: ServedExport, key: CallKey, items: list[Item], n: int, on_progress=None) -> list[bytes]:
    try:
        return await export.submit(key, items, n, on_progress)
    except QueueFull as full:
        raise APIError(429, str(full), code="queue_full", headers={"Retry-After": str(full.retry_after)}) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _image_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def _card(model) -> ModelCard:
    first = model.first.info
    tasks = list(dict.fromkeys(task for export in model.exports.values() for task in export.info.tasks))
    return ModelCard(
        id=model.name, created=model.created, tasks=tasks, sizes=model.sizes, batch_size=first.batch_size,
        images_per_prompt=first.images_per_prompt, default_steps=first.default_steps,
        default_guidance_scale=first.default_guidance_scale,
    )  # fmt: skip


def _plan(
    registry: Registry, body: ImageOptions, task: str, max_steps: int
) -> tuple[ServedExport, CallKey, list[Item], list[int]]:
    """Checks a request against the model it names; returns the call it needs and its prompt entries."""
    if body.response_format == "url":
        raise APIError(
            400, "response_format 'url' is not served: this server keeps no images to link to. Use 'b64_json' "
            "(the default).", param="response_format",
        )  # fmt: skip
    model = registry.model(body.model)
    export = model.export_for(body.size)
    info = export.info
    if task not in info.tasks:
        param = "mask" if task == INPAINTING else "image"
        raise APIError(
            400, f"Model {model.name!r} ({info.size}) does not do {task}; it serves: {', '.join(info.tasks)}. "
            + ("(Image input needs an export with the VAE encoder.)" if task != TEXT_TO_IMAGE else ""), param=param,
        )  # fmt: skip
    steps = body.num_inference_steps or info.default_steps
    if steps > max_steps:
        raise APIError(
            400, f"num_inference_steps={steps} is more than this server allows ({max_steps}, --max-steps). Ask for "
            f"{max_steps} or fewer.", param="num_inference_steps",
        )  # fmt: skip
    guidance = info.default_guidance_scale if body.guidance_scale is None else body.guidance_scale
    problem = info.guidance_problem(guidance)
    if problem is not None:
        raise APIError(400, f"Model {model.name!r}: {problem}", param="guidance_scale")
    if body.negative_prompt is not None and not (info.guidance_batch and guidance > 1):
        raise APIError(
            400, f"negative_prompt needs classifier-free guidance, which model {model.name!r} does not run. Leave "
            "negative_prompt out.", param="negative_prompt",
        )  # fmt: skip
    strength = None
    if task != TEXT_TO_IMAGE:
        strength = getattr(body, "strength", None)
        strength = info.default_strength.get(task) if strength is None else strength
        if strength is not None and int(steps * strength) < 1:
            raise APIError(
                400, f"strength={strength} with num_inference_steps={steps} leaves no denoising step "
                f"(int(steps x strength) = 0). Raise strength or num_inference_steps to at least {1 / strength:.0f}.",
                param="strength",
            )  # fmt: skip
    first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - 64)
    k = info.images_per_prompt
    entries = -(-body.n // k)
    seeds = [first_seed + i for i in range(entries * k)]
    items = [
        Item(body.prompt, body.negative_prompt, tuple(seeds[j * k : (j + 1) * k]), min(k, body.n - j * k))
        for j in range(entries)
    ]
    return export, CallKey(task, steps, guidance, strength), items, seeds[: body.n]


def _response(images: list[bytes], seeds: list[int]) -> ImagesResponse:
    data = [ImageData(b64_json=base64.b64encode(png).decode(), seed=seed) for png, seed in zip(images, seeds)]
    return ImagesResponse(created=int(time.time()), data=data)
