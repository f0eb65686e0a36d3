"""A small client for ``itk_infer serve`` (the MONAI Label routes Slicer uses), standard
library only: Slicer's Python has no guaranteed third-party HTTP package, and this part
runs off Slicer's main thread, so it touches neither Qt nor MRML.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any


class ServerError(Exception):
    """The server answered with an error; ``status`` is the HTTP status, ``detail`` its
    message."""

    def __init__(self, status: int, detail: str, url: str) -> None:
        super().__init__(f"server error {status} at {url}: {detail}")
        self.status, self.detail, self.url = status, detail, url


class Unreachable(Exception):
    """No answer: wrong URL, server not running, tunnel down, or a timeout."""


@dataclass
class InferAnswer:
    """What ``POST /infer`` sent back: its ``params`` and the label map file's bytes."""

    params: dict[str, Any]
    filename: str
    data: bytes = field(repr=False)

    @property
    def label_names(self) -> dict[str, int]:
        """``{name: value}``, background excluded."""
        return {str(k): int(v) for k, v in (self.params.get("label_names") or {}).items()}


def encode_multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                     f"{value}\r\n".encode())
    for name, path in files.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                     f"filename=\"{path.name}\"\r\nContent-Type: application/octet-stream"
                     "\r\n\r\n".encode())
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def decode_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``{part name: (file name or None, bytes)}`` of a ``multipart/form-data`` answer."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise ValueError("the answer is not multipart")
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts


class InferClient:
    """One server. Every method may run on any thread; each call opens its own connection."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.strip().rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self._access: str | None = None

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, route: str, body: bytes | None = None,
                 content_type: str | None = None, auth: bool = True
                 ) -> tuple[bytes, str]:
        url = self.url + route
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if auth and self._access:
            request.add_header("Authorization", f"Bearer {self._access}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return answer.read(), answer.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            raise ServerError(error.code, _detail(error), url) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise Unreachable(f"cannot reach {self.url}: {reason}") from None

    def _json(self, method: str, route: str, **kwargs: Any) -> Any:
        body, _ = self._request(method, route, **kwargs)
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise ServerError(200, "the answer is not JSON (is this an itk_infer server?)",
                              self.url + route) from None

    # ------------------------------------------------------------------ routes

    def auth_enabled(self) -> bool:
        return bool(self._json("GET", "/auth/", auth=False).get("enabled"))

    def connect(self) -> None:
        """Slicer's sequence: probe ``/auth/``; if it is on, log in with the token as the
        password (``ServerError`` 401 on a wrong one, ``ValueError`` without one)."""
        if not self.auth_enabled():
            self._access = None
            return
        if not self.token:
            raise ValueError("the server requires a token; enter it in the Token field")
        form = urllib.parse.urlencode({"username": "slicer", "password": self.token})
        answer = self._json("POST", "/auth/token", body=form.encode(), auth=False,
                            content_type="application/x-www-form-urlencoded")
        self._access = answer.get("access_token") or None

    def info(self) -> dict[str, Any]:
        return self._json("GET", "/info/")

    def models(self) -> dict[str, dict[str, Any]]:
        """``{model name: its /info/ entry}``."""
        return dict(self.info().get("models") or {})

    def upload(self, path: Path, image_id: str) -> str:
        body, kind = encode_multipart({"params": "{}"}, {"file": path})
        route = "/datastore/?" + urllib.parse.urlencode({"image": image_id})
        return str(self._json("PUT", route, body=body, content_type=kind)["image"])

    def infer(self, model: str, image_id: str, result_extension: str = ".nrrd"
              ) -> InferAnswer:
        params = json.dumps({"result_extension": result_extension})
        body, kind = encode_multipart({"params": params}, {})
        route = (f"/infer/{urllib.parse.quote(model, safe='')}?"
                 + urllib.parse.urlencode({"image": image_id}))
        data, content_type = self._request("POST", route, body=body, content_type=kind)
        try:
            parts = decode_multipart(data, content_type)
            answer_params = json.loads(parts["params"][1])
            filename, image = parts["image"]
        except (ValueError, KeyError) as error:
            raise ServerError(200, f"unreadable inference answer ({error})",
                              self.url + route) from None
        return InferAnswer(answer_params, filename or "result" + result_extension, image)


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's ``{"detail": ...}`` message, else the reason phrase."""
    try:
        detail = json.loads(error.read()).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return str(detail) if detail else str(error.reason)
