"""Receive a ``multipart/form-data`` request body as it streams in.

File parts go straight to a new uuid-named file in the store's private folder, never to
memory or to a name the client chose; the client's file name only selects one of the
allowlisted extensions. The body is capped while it is read (413), and after an error the
rest is read and dropped up to a limit, so that clients that send the whole body before
reading the answer still get it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from itk_infer.server.imagecheck import SUFFIXES, BadUpload, suffix_of
from itk_infer.server.store import UploadStore

FORM_SLACK = 1 << 20  # room for the text fields and part headers beyond the file cap
DRAIN_LIMIT = 64 << 20  # after an error, bytes read and dropped before giving up
MAX_FIELD_BYTES = 64 << 10
MAX_FIELDS = 32


@dataclass
class ReceivedFile:
    """A file part written to the store's folder (not yet an entry of the store)."""

    name: str  # the form field's name
    suffix: str
    path: Path
    size: int = 0


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[ReceivedFile] = field(default_factory=list)

    def discard(self) -> None:
        for received in self.files:
            received.path.unlink(missing_ok=True)
        self.files.clear()

    def file(self, *names: str) -> ReceivedFile | None:
        """The first file part sent under one of ``names``."""
        return next((f for f in self.files if f.name in names), None)


class _FormSink:
    """python-multipart callbacks that build a :class:`Form`; the first error is kept and
    everything after it ignored."""

    def __init__(self, store: UploadStore, file_fields: frozenset[str], max_bytes: int) -> None:
        self.form = Form()
        self.error: BadUpload | None = None
        self.done = False
        self._store, self._file_fields, self._max_bytes = store, file_fields, max_bytes
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name = ""
        self._target: IO[bytes] | None = None
        self._received: ReceivedFile | None = None
        self._buffer = bytearray()
        self._file_bytes = 0

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._part_end, "on_end": self._end}

    def fail(self, status: int, message: str) -> None:
        if self.error is None:
            self.error = BadUpload(status, message)
        self._close_target()

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""
        self._target, self._received, self._buffer = None, None, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        if self.error is not None:
            return
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            if len(self.form.fields) >= MAX_FIELDS:
                self.fail(400, f"more than {MAX_FIELDS} form fields")
            return
        if self._name not in self._file_fields:
            self.fail(400, f"unexpected file field {self._name!r}")
            return
        if self.form.files:
            self.fail(400, "one file per request")
            return
        suffix = suffix_of(filename.decode("utf-8", "replace"))
        if suffix is None:
            self.fail(415, "file type not accepted: send one of " + ", ".join(SUFFIXES))
            return
        path = self._store.new_path(suffix)
        # O_EXCL: a fresh file of ours, never one that is already there; 0600: ours only.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._target = os.fdopen(descriptor, "wb")
        self._received = ReceivedFile(self._name, suffix, path)
        self.form.files.append(self._received)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        size = end - start
        if self._received is not None and self._target is not None:
            self._file_bytes += size
            if self._file_bytes > self._max_bytes:
                self.fail(413, f"upload larger than {self._max_bytes / 2**20:g} MB")
                return
            self._target.write(data[start:end])
            self._received.size += size
        elif self._received is None:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FIELD_BYTES:
                self.fail(413, f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} "
                               "bytes")

    def _part_end(self) -> None:
        if self.error is not None:
            return
        if self._received is not None:
            self._close_target()
            return
        try:
            self.form.fields[self._name] = self._buffer.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(400, f"form field {self._name!r} is not UTF-8 text")

    def _end(self) -> None:
        self.done = True

    def _close_target(self) -> None:
        if self._target is not None:
            self._target.close()
            self._target = None


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BadUpload(415, "expected a multipart/form-data body")
    return boundary


def _declared_length(request: Request) -> int | None:
    text = request.headers.get("content-length")
    try:
        return int(text) if text is not None else None
    except ValueError:
        raise BadUpload(400, "bad Content-Length") from None


async def receive_form(request: Request, store: UploadStore, file_fields: frozenset[str],
                       max_bytes: int) -> Form:
    """Parse the request's multipart body; file parts named in ``file_fields`` go to disk.

    Raises:
        BadUpload: not multipart (415), a file type not allowlisted (415), over the cap
            (413), malformed (400). No file is left behind then.
    """
    boundary = _boundary(request)
    declared = _declared_length(request)
    if declared is not None and declared > max_bytes + FORM_SLACK + DRAIN_LIMIT:
        raise BadUpload(413, f"upload larger than {max_bytes / 2**20:g} MB")
    sink = _FormSink(store, file_fields, max_bytes)
    parser = MultipartParser(boundary, sink.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if sink.error is None:
                if total > max_bytes + FORM_SLACK:
                    sink.fail(413, f"upload larger than {max_bytes / 2**20:g} MB")
                    continue
                try:
                    parser.write(chunk)
                except Exception:  # python-multipart's parse errors have several types
                    sink.fail(400, "malformed multipart body")
            elif total > max_bytes + FORM_SLACK + DRAIN_LIMIT:
                break  # stop reading: the connection is closed after the answer
        if sink.error is None and not sink.done:
            sink.fail(400, "incomplete multipart body")
    except BaseException:
        sink.fail(400, "upload interrupted")
        sink.form.discard()
        raise
    if sink.error is not None:
        sink.form.discard()
        raise sink.error
    return sink.form
