"""``itk_infer serve``: arguments → settings and server options → model → uvicorn.

The model options are the batch command's (the schema's ``add_arguments``); the options
that only make sense for a folder run are hidden and refused. The port is bound before the
model loads, so a taken port fails at once; the model is loaded once, before serving.

Exit codes: 0 stopped (SIGINT/SIGTERM), 2 usage error (bad options, no token for a
non-loopback host, port taken, model unusable, server extra not installed).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from itk_infer import __version__
from itk_infer.config import Settings, add_arguments, settings_from_args, spec_of
from itk_infer.errors import UsageError
from itk_infer.server.options import ServerOptions, add_server_arguments, server_options_from_args

log = logging.getLogger("itk_infer.server")

# Settings of a folder run that mean nothing to the server: hidden from its --help, refused.
BATCH_ONLY = ("input_folder", "output_folder", "save_logits", "save_conf", "overwrite",
              "report_path", "progress", "num_proc", "case_timeout", "gpus")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Stopped(Exception):
    """SIGINT or SIGTERM: the server was asked to stop."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itk_infer serve",
        description="Serve one segmentation model over HTTP with the MONAI Label API subset "
        "that 3D Slicer's MONAILabel module and the monailabel client use. Listens on "
        "127.0.0.1 by default; see the README's '3D Slicer' section.",
        epilog="Exit codes: 0 stopped, 2 usage error.",
    )
    add_arguments(parser)  # the model and inference options of the schema
    for action in parser._actions:  # argparse has no public way to hide an option
        if action.dest in BATCH_ONLY:
            action.required = False
            action.help = argparse.SUPPRESS
    add_server_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"itk_infer {__version__}")
    return parser


def serve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """The model settings of ``args``; batch-only options given on the command line are
    refused rather than silently ignored."""
    for name in BATCH_ONLY:
        if getattr(args, name) != parser.get_default(name):
            raise UsageError(f"{spec_of(name).label} is an option of the batch command, "
                             "not of serve")
    return settings_from_args(args)


def model_name(options: ServerOptions, settings: Settings) -> str:
    """The name clients call the model by: ``--model-name``, else the model file's stem."""
    model_file = settings.onnx_path if settings.backend == "onnx" else settings.cfg_path
    name = options.model_name or (model_file.stem if model_file else "model")
    if not MODEL_NAME.fullmatch(name):
        if options.model_name:
            raise UsageError("--model-name: 1..64 letters, digits, '_', '.', '-'")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-")[:64] or "model"
    return name


def bind(options: ServerOptions) -> socket.socket:
    """A listening socket on ``--host``/``--port`` (port 0: any free one)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            options.host, options.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise UsageError(f"cannot listen on {options.host}:{options.port}: "
                         f"{error.strerror or error}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _configure_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("itk_infer", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
        logger.propagate = False
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``itk_infer serve``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        settings = serve_settings(args, parser)
        options = server_options_from_args(args, os.environ)
        sock = bind(options)
    except UsageError as error:
        print(f"itk_infer serve: error: {error}", file=sys.stderr)
        return error.exit_code
    try:
        return _load_and_serve(settings, options, sock)
    finally:
        sock.close()


def _load_and_serve(settings: Settings, options: ServerOptions, sock: socket.socket) -> int:
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = _build_server(settings, options, sock)
        server.run(sockets=[sock])  # uvicorn re-raises a captured signal when it returns
    except UsageError as error:
        print(f"itk_infer serve: error: {error}", file=sys.stderr)
        return error.exit_code
    except Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("itk_infer serve: stopped", file=sys.stderr)
    return 0


def _build_server(settings: Settings, options: ServerOptions, sock: socket.socket) -> Any:
    """Load the model and build the uvicorn server (heavy imports happen here)."""
    try:
        import uvicorn

        from itk_infer.server.app import create_app
    except ImportError as error:
        raise UsageError(f"itk_infer serve needs the server extra ({error.name} is missing): "
                         "pip install 'itk_infer[server]'") from None
    from itk_infer.backends import resolve_device
    from itk_infer.pipeline import load_model
    from itk_infer.server.inference import InferenceService
    from itk_infer.server.store import UploadStore

    name = model_name(options, settings)
    model = load_model(settings, resolve_device(settings.device))
    store = UploadStore(options.scratch_dir, options.upload_ttl, options.max_uploads)
    atexit.register(store.close)  # if the server never gets to its own shutdown
    service = InferenceService(model, name, store, options.queue_length)
    url = url_of(sock)

    def ready() -> None:
        auth = "on" if options.auth_enabled else "off"
        print(f"itk_infer serve: model {name!r} ({len(service.labels)} labels) at {url} "
              f"(auth {auth})", flush=True)

    app = create_app(options, store, service, on_ready=ready)
    config = uvicorn.Config(app, log_config=None, proxy_headers=False, server_header=False,
                            limit_concurrency=64 + options.queue_length,
                            timeout_graceful_shutdown=30, lifespan="on")
    return uvicorn.Server(config)
