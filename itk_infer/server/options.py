"""The server's own settings: where it listens, who may call it, and the caps on what a
caller can make it hold.

They live here until they move into the one schema (:class:`itk_infer.config.Settings`); the
model settings already come from there. Each field's flag and variable are the ones it will
keep in the schema.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from itk_infer.errors import UsageError

TOKEN_ENV = "ITK_INFER_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16  # a shorter secret could be guessed over the network
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServerOptions:
    """How ``itk_infer serve`` listens and what it accepts. Checked when built."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str = field(default="", repr=False)  # empty: no authentication (loopback only)
    allowed_hosts: tuple[str, ...] = ()  # Host header values besides the defaults; "*": any
    model_name: str = ""  # empty: the model file's name without extension
    max_upload_mb: float = 2048.0
    max_megavoxels: float = 1024.0
    upload_ttl: float = 3600.0  # seconds an unused upload is kept
    max_uploads: int = 16
    queue_length: int = 4  # requests waiting behind the running one
    scratch_dir: Path | None = None  # parent of the private scratch folder (default: tmp)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0..65535, got {self.port}")
        if self.max_upload_mb <= 0 or self.max_megavoxels <= 0 or self.upload_ttl <= 0:
            raise UsageError("--max-upload-mb, --max-megavoxels and --upload-ttl must be > 0")
        if self.max_uploads < 1 or self.queue_length < 0:
            raise UsageError("--max-uploads must be >= 1 and --queue-length >= 0")
        if self.token and len(self.token) < MIN_TOKEN_CHARS:
            raise UsageError(f"the server token must have at least {MIN_TOKEN_CHARS} "
                             "characters (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))')")
        if not self.token and not is_loopback(self.host):
            raise UsageError(f"--host {self.host} is reachable from other machines: set a "
                             f"token ({TOKEN_ENV} or --token-file) or bind 127.0.0.1 and use "
                             "an SSH tunnel")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def host_allowlist(self) -> frozenset[str] | None:
        """Host header names accepted (lower case, no port); ``None``: any. The defaults are
        the loopback names and the bound address; a wildcard bind adds this machine's names."""
        if "*" in self.allowed_hosts:
            return None
        names = {*LOOPBACK_NAMES, *(h.lower() for h in self.allowed_hosts)}
        if self.host in WILDCARD_HOSTS:
            names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
        else:
            names.add(self.host.lower())
        return frozenset(names)


def is_loopback(host: str) -> bool:
    """``host`` is reachable only from this machine (a loopback address or ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options, in their own group of ``itk_infer serve --help``."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; any other address "
                       "needs a token)")
    group.add_argument("--port", type=int, default=8000,
                       help="port (default 8000; 0: any free port, printed at start-up)")
    group.add_argument("--token-file", type=Path, metavar="PATH",
                       help=f"file holding the server token (or set {TOKEN_ENV}); with a token "
                       "every request needs it: the password in Slicer's login dialog")
    group.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="also accept requests whose Host header names NAME (repeatable; "
                       "'*': any; default: loopback names and the bound address)")
    group.add_argument("--model-name", default="", metavar="NAME",
                       help="model name shown to clients (default: the model file's name)")
    group.add_argument("--max-upload-mb", type=float, default=2048.0, metavar="MB",
                       help="largest upload accepted (default 2048; larger: 413)")
    group.add_argument("--max-megavoxels", type=float, default=1024.0, metavar="MV",
                       help="largest image accepted, in millions of voxels (default 1024)")
    group.add_argument("--upload-ttl", type=float, default=3600.0, metavar="SECONDS",
                       help="an upload unused this long is deleted (default 3600)")
    group.add_argument("--max-uploads", type=int, default=16, metavar="N",
                       help="uploads kept at once; the least recently used goes first "
                       "(default 16)")
    group.add_argument("--queue-length", type=int, default=4, metavar="N",
                       help="inference requests that may wait behind the running one; more: "
                       "503 with Retry-After (default 4)")
    group.add_argument("--scratch-dir", type=Path, metavar="DIR",
                       help="where the private scratch folder is made (default: the system's "
                       "temporary folder); it is removed on shutdown")


def read_token(token_file: Path | None, environ: Mapping[str, str]) -> str:
    """The token from ``--token-file`` (first line) or the environment; ``""`` if neither.
    Never from a command-line value: other local users can read process arguments."""
    if token_file is not None:
        try:
            lines = token_file.read_text().splitlines()
        except OSError as error:
            raise UsageError(f"--token-file: cannot read: {error.strerror or error}") from None
        return lines[0].strip() if lines else ""
    return environ.get(TOKEN_ENV, "").strip()


def server_options_from_args(args: argparse.Namespace,
                             environ: Mapping[str, str]) -> ServerOptions:
    """The :class:`ServerOptions` of parsed arguments (and the token's variable)."""
    return ServerOptions(
        host=args.host,
        port=args.port,
        token=read_token(args.token_file, environ),
        allowed_hosts=tuple(args.allowed_host),
        model_name=args.model_name,
        max_upload_mb=args.max_upload_mb,
        max_megavoxels=args.max_megavoxels,
        upload_ttl=args.upload_ttl,
        max_uploads=args.max_uploads,
        queue_length=args.queue_length,
        scratch_dir=args.scratch_dir,
    )
