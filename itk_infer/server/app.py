"""The HTTP routes: the part of the MONAI Label REST API that 3D Slicer's MONAILabel module
and the ``monailabel`` client (0.8.5) call.

| route | answer |
|---|---|
| ``GET /auth/`` | ``{"enabled": bool}`` (open) |
| ``POST /auth/token`` | form ``username``, ``password``: the token when the password is it (open) |
| ``GET /auth/token/valid`` | 200 with a valid token |
| ``GET /info/`` | name, version, labels, the model, empty trainers/strategies/scoring |
| ``PUT /datastore/?image=ID`` | multipart ``file`` (+ ``params``): keeps the image as ``ID`` |
| ``POST /infer/{model}?image=ID`` | multipart ``params`` (+ ``file``): ``params`` + the label map |
| ``PUT /session/``, ``GET``/``DELETE /session/{id}`` | an image kept under a server-made id |

Nothing here loads a model or reads a path a client names: the model is fixed at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from itk_infer import __version__
from itk_infer.errors import CaseError, DiskFullError
from itk_infer.server.imagecheck import BadUpload, check_upload
from itk_infer.server.inference import Busy, InferenceService, InferResult, ResultOptions
from itk_infer.server.options import ServerOptions
from itk_infer.server.security import GuardMiddleware, token_matches
from itk_infer.server.store import IMAGE, SESSION, Entry, StoreFull, UploadStore
from itk_infer.server.uploads import Form, ReceivedFile, receive_form

log = logging.getLogger(__name__)

REQUEST = "request"  # store kind of a file sent with one inference request
MAX_ID_CHARS = 256
MAX_LOGIN_BYTES = 16 << 10
CHUNK = 1 << 20


class Server:
    """What the routes share: the options, the store of uploads and the model service."""

    def __init__(self, options: ServerOptions, store: UploadStore,
                 service: InferenceService) -> None:
        self.options, self.store, self.service = options, store, service

    async def receive_image(self, request: Request, field: str) -> tuple[Form, ReceivedFile]:
        """The request's form with its one image file under ``field``, checked (400 if
        there is none)."""
        form, received = await self.receive_optional_image(request, field)
        if received is None:
            raise BadUpload(400, f"no file part {field!r} in the form")
        return form, received

    async def receive_optional_image(self, request: Request, field: str
                                     ) -> tuple[Form, ReceivedFile | None]:
        """The request's form and its image file under ``field`` if it has one, checked."""
        form = await receive_form(request, self.store, frozenset({field}),
                                  self.options.max_upload_bytes)
        received = form.file(field)
        if received is None:
            return form, None
        try:
            await run_in_threadpool(check_upload, received.path, received.suffix,
                                    int(self.options.max_megavoxels * 1e6))
        except BaseException:
            form.discard()
            raise
        return form, received

    def keep(self, kind: str, ident: str, received: ReceivedFile, *, pinned: bool = False
             ) -> Entry:
        return self.store.add(kind, ident, received.path, received.size, pinned=pinned)


def valid_id(value: str | None, what: str) -> str:
    """A client's id, only ever a dictionary key: 1..256 printable characters."""
    if value is None or not 1 <= len(value) <= MAX_ID_CHARS or any(
            ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadUpload(400, f"{what} must be 1..{MAX_ID_CHARS} printable characters")
    return value


def parse_params(text: str | None) -> dict[str, Any]:
    try:
        params = json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise BadUpload(400, "params is not valid JSON") from None
    if not isinstance(params, dict):
        raise BadUpload(400, "params must be a JSON object")
    return params


def multipart_response(result: InferResult) -> StreamingResponse:
    """``params`` as JSON and the label map as one file part, streamed from disk; the
    result's folder is removed once sent."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(result.params)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{result.path.name}\"\r\nContent-Type: application/octet-stream"
            "\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        try:
            yield head
            with open(result.path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
            yield tail
        finally:  # also when the client goes away mid-answer
            shutil.rmtree(result.folder, ignore_errors=True)

    length = len(head) + result.path.stat().st_size + len(tail)
    return StreamingResponse(
        body(), media_type=f"multipart/form-data; boundary={boundary}",
        headers={"Content-Length": str(length)},
        background=BackgroundTask(shutil.rmtree, result.folder, ignore_errors=True))


async def read_small_body(request: Request, limit: int) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadUpload(413, "request body too large")
    return body


# --------------------------------------------------------------------------- routes


def add_auth_routes(app: FastAPI, server: Server) -> None:
    options = server.options

    @app.get("/auth/")
    async def auth_probe() -> dict[str, Any]:
        return {"enabled": options.auth_enabled}

    @app.post("/auth/token")
    async def login(request: Request) -> JSONResponse:
        # Slicer's login dialog: any user name; the password is the server token.
        if "application/x-www-form-urlencoded" not in request.headers.get("content-type", ""):
            raise BadUpload(415, "expected an application/x-www-form-urlencoded form")
        form = parse_qs((await read_small_body(request, MAX_LOGIN_BYTES)).decode("utf-8",
                                                                                  "replace"))
        password = form.get("password", [""])[0]
        if not options.auth_enabled:
            return JSONResponse({"access_token": "", "token_type": "bearer"})
        if not token_matches(password, options.token):
            return JSONResponse({"detail": "wrong password"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse({"access_token": options.token, "token_type": "bearer"})

    @app.get("/auth/token/valid")
    async def token_valid() -> dict[str, Any]:
        return {"valid": True}  # the middleware refused an invalid one already


def add_info_route(app: FastAPI, server: Server) -> None:
    service, store = server.service, server.store
    settings = service.model.inference.settings

    @app.get("/info/")
    async def info() -> dict[str, Any]:
        model = {
            "type": "segmentation",
            "labels": service.labels,
            "dimension": 3,
            "description": (f"itk_infer {settings.backend} model: sliding window "
                            f"{list(settings.patch_size or [])}, window "
                            f"{settings.window_level:g}/{settings.window_width:g}"),
            "config": {},
        }
        return {
            "name": "itk_infer",
            "description": "itk_infer inference server (MONAI Label API subset)",
            "version": __version__,
            "labels": list(service.labels),
            "models": {service.name: model},
            "trainers": {}, "strategies": {}, "scoring": {}, "train_stats": {},
            "datastore": {"total": store.count(IMAGE), "completed": 0, "label_tags": {},
                          "train": 0},
        }


def add_datastore_routes(app: FastAPI, server: Server) -> None:
    @app.put("/datastore/")
    async def upload_image(request: Request, image: str | None = None) -> dict[str, Any]:
        ident = valid_id(image, "image") if image else uuid.uuid4().hex
        form, received = await server.receive_image(request, "file")
        try:
            parse_params(form.fields.get("params"))
            server.keep(IMAGE, ident, received)
        except BaseException:
            form.discard()
            raise
        log.info("image %r received (%.1f MB)", ident, received.size / 2**20)
        return {"image": ident}


def add_session_routes(app: FastAPI, server: Server) -> None:
    store, ttl = server.store, server.options.upload_ttl

    @app.put("/session/")
    async def create_session(request: Request) -> dict[str, Any]:
        form, received = await server.receive_image(request, "files")
        ident = uuid.uuid4().hex
        try:
            server.keep(SESSION, ident, received)
        except BaseException:
            form.discard()
            raise
        return {"session_id": ident, "session_info": {"expiry": ttl}}

    @app.get("/session/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        if store.get(SESSION, session_id) is None:
            raise HTTPException(404, "session not found (expired or removed)")
        return {"session_id": session_id, "session_info": {"expiry": ttl}}

    @app.delete("/session/{session_id}")
    async def remove_session(session_id: str) -> dict[str, Any]:
        if not store.remove(SESSION, session_id):
            raise HTTPException(404, "session not found (expired or removed)")
        return {"session_id": session_id}


def request_entry(server: Server, received: ReceivedFile | None, image: str | None,
                  session_id: str | None) -> tuple[Entry, bool]:
    """The pinned image an inference request names: the file it sent (a temporary entry),
    else its session's, else the uploaded image ``image``. Second: whether temporary."""
    store = server.store
    if received is not None:
        return server.keep(REQUEST, uuid.uuid4().hex, received, pinned=True), True
    if session_id:
        entry = store.pin(SESSION, session_id)
        if entry is None:
            raise HTTPException(404, "session not found (expired or removed)")
        return entry, False
    entry = store.pin(IMAGE, valid_id(image, "image"))
    if entry is None:
        raise HTTPException(404, "image not found (expired, evicted or never uploaded): "
                                 "upload it with PUT /datastore/?image=ID")
    return entry, False


def add_infer_route(app: FastAPI, server: Server) -> None:
    service, store = server.service, server.store

    @app.post("/infer/{model}")
    async def infer(request: Request, model: str, image: str | None = None,
                    session_id: str | None = None) -> StreamingResponse:
        if model != service.name:
            raise HTTPException(404, f"no model {model!r}; this server has {service.name!r}")
        form, received = await server.receive_optional_image(request, "file")
        try:
            options = ResultOptions.from_params(parse_params(form.fields.get("params")))
            entry, temporary = request_entry(server, received, image, session_id)
        except BaseException:
            form.discard()
            raise
        try:
            result = await service.infer(entry, options)
        finally:
            store.release(entry)
            if temporary:
                store.remove(REQUEST, entry.ident)
        return multipart_response(result)


def add_error_handlers(app: FastAPI, server: Server) -> None:
    """Every error is JSON ``{"detail": ...}``; none names a server path."""

    @app.exception_handler(BadUpload)
    async def bad_upload(_request: Request, error: BadUpload) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(Busy)
    async def busy(_request: Request, error: Busy) -> JSONResponse:
        return JSONResponse({"detail": "busy: the inference queue is full"}, status_code=503,
                            headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(StoreFull)
    async def store_full(_request: Request, _error: StoreFull) -> JSONResponse:
        return JSONResponse({"detail": "busy: every kept upload is in use"}, status_code=503,
                            headers={"Retry-After": "10"})

    @app.exception_handler(DiskFullError)
    async def disk_full(_request: Request, _error: DiskFullError) -> JSONResponse:
        return JSONResponse({"detail": "the server's disk is full"}, status_code=507)

    @app.exception_handler(CaseError)
    async def case_error(_request: Request, error: CaseError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(_request: Request, error: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(error).__name__, error)
        return JSONResponse({"detail": "internal error (see the server's log)"},
                            status_code=500)


async def sweep_forever(store: UploadStore) -> None:
    """Expire unused uploads even when no request comes."""
    interval = min(max(store.ttl / 4, 0.25), 30.0)
    while True:
        await asyncio.sleep(interval)
        store.sweep()


def create_app(options: ServerOptions, store: UploadStore, service: InferenceService,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The application; ``on_ready`` runs when it starts serving. Shutting it down stops
    the model thread and removes the scratch folder."""
    server = Server(options, store, service)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(sweep_forever(store))
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(service.close)
            store.close()

    # No docs or schema routes: nothing is served that the clients do not use.
    app = FastAPI(title="itk_infer", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.add_middleware(GuardMiddleware, token=options.token,
                       allowed_hosts=options.host_allowlist())
    for add in (add_error_handlers, add_auth_routes, add_info_route, add_datastore_routes,
                add_session_routes, add_infer_route):
        add(app, server)
    return app
