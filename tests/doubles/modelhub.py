"""A local stand-in for the ModelScope hub (modelscope.cn) that the real client downloads from.

modelscope.cn cannot be reached from the development and CI machines, and a test must
not depend on it anyway. This server speaks the part of the hub's HTTP API that the real
``modelscope`` client (modelscope 1.40.2, whose downloads run in modelscope-hub 0.5.1)
uses for ``snapshot_download`` and ``modelscope download``, and serves local directories
as model repositories. It is a stand-in: nothing here is modelscope.cn, and a test that
uses it says so.

What the client calls, read from modelscope_hub 0.5.1 (``_legacy_api.py``, ``_download.py``)::

    GET  /api/v1/models/{owner}/{name}/repo/files?Revision=R&Recursive=True[&Root=DIR]
         the file list: {"Code": 200, "Data": {"Files": [{"Path", "Name", "Type": "blob"|"tree",
         "Size", "Sha256", "Revision", ...}]}}; the client checks every downloaded file's size
         and sha256 against it and skips "tree" entries
    GET  /api/v1/models/{owner}/{name}/repo?Revision=R&FilePath=P
         the file's bytes; an interrupted file is resumed from ``<dest>/<path>.incomplete``
         with ``Range: bytes=N-`` (206 with Content-Range expected)
    HEAD the same URL: only when MODELSCOPE_DOWNLOAD_INTER_CLOUD_REGIONS is set
    GET  /api/v1/models/{owner}/{name}
         repository info, after a listing under a ``Root`` answered 404
    GET  /api/v1/repos/internalAccelerationInfo
         Alibaba Cloud region probe (0.2 s budget) unless MODELSCOPE_DOWNLOAD_INTRA_CLOUD=false;
         answered here with no region, as off Alibaba Cloud

The client is pointed at a hub with ``MODELSCOPE_ENDPOINT=http://HOST:PORT`` (the older
``MODELSCOPE_DOMAIN`` still works but warns), or ``endpoint=`` / ``--endpoint``; a token
comes from ``MODELSCOPE_API_TOKEN`` and is sent as ``Authorization: Bearer`` and as the
``m_session_id`` cookie.

For tests the stand-in can cut a transfer after some bytes, serve a file's bytes
corrupted (first byte flipped) or empty (the "sha256 of an empty file" failure that
ModelScope users report), and it counts the file bytes it serves, so a test can show
how much a resumed download or a mirror fetched from the origin.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

API = "/api/v1"
DEFAULT_REVISION = "master"
_CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")
_REPO_RE = re.compile(r"/api/v1/models/([^/]+/[^/]+?)(/repo/files|/repo)?/?")

Corruption = Literal["flip", "empty"]


@dataclass(frozen=True)
class RepoFile:
    """One file of a served repository, as the hub lists it."""

    path: str
    size: int
    sha256: str
    source: Path


@dataclass
class Repo:
    model_id: str
    files: dict[str, RepoFile]
    commit: str
    revisions: frozenset[str]


@dataclass
class _Fault:
    cut_after: int | None = None
    corruption: Corruption | None = None
    # How many more requests of the file get the fault; None: all of them.
    remaining: int | None = 1


@dataclass(frozen=True)
class Served:
    """One file request as the stand-in answered it."""

    model_id: str
    path: str
    range: str | None
    status: int
    bytes: int


@dataclass
class _State:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: dict[tuple[str, str], _Fault] = field(default_factory=dict)
    served: list[Served] = field(default_factory=list)
    api_calls: list[str] = field(default_factory=list)
    token: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class StandInHub:
    """A stand-in for modelscope.cn on a loopback port, serving directories as model repos.

    Use as a context manager; ``endpoint`` is what MODELSCOPE_ENDPOINT should be set to.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None):
        self._state = _State(token=token)
        self._server = _Server((host, port), _Handler, self._state)
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_repo(self, model_id: str, directory: Path, *, revisions: tuple[str, ...] = ()) -> str:
        """Serve every regular file under ``directory`` as repository ``model_id``.

        The files are hashed now; they must not change while served. Revisions answered:
        ``master``, the returned commit id and ``revisions``. Returns the commit id.
        """
        if model_id.count("/") != 1 or not all(model_id.split("/")):
            raise ValueError(f"model id {model_id!r}: expected 'owner/name'")
        directory = Path(directory)
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory}: not a directory")
        files: dict[str, RepoFile] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
            name = path.relative_to(directory).as_posix()
            size, digest = _size_and_sha256(path)
            files[name] = RepoFile(path=name, size=size, sha256=digest, source=path)
        # Deterministic, 40 hex digits like a git commit: same files, same id.
        listing = json.dumps([[f.path, f.size, f.sha256] for f in files.values()])
        commit = hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
        repo = Repo(model_id=model_id, files=files, commit=commit,
                    revisions=frozenset({DEFAULT_REVISION, commit, *revisions}))
        with self._state.lock:
            self._state.repos[model_id] = repo
        return commit

    def commit(self, model_id: str) -> str:
        """The commit id ``model_id`` is served at (a revision the client may pin)."""
        return self._state.repos[model_id].commit

    def files(self, model_id: str) -> dict[str, RepoFile]:
        """The file list served for ``model_id``."""
        return dict(self._state.repos[model_id].files)

    def cut_transfer(self, model_id: str, path: str, after_bytes: int, *, times: int = 1) -> None:
        """The next ``times`` requests of the file close the connection after ``after_bytes``
        body bytes (the full length was announced), as a dropped connection does."""
        self._set_fault(model_id, path, _Fault(cut_after=after_bytes, remaining=times))

    def corrupt(self, model_id: str, path: str, how: Corruption, *,
                times: int | None = None) -> None:
        """Serve the file wrong while listing it right: ``flip`` its first byte, or send it
        ``empty``. ``times``: for that many requests; None: until ``clear_faults``."""
        if how not in ("flip", "empty"):
            raise ValueError(f"corruption {how!r}: expected 'flip' or 'empty'")
        self._set_fault(model_id, path, _Fault(corruption=how, remaining=times))

    def clear_faults(self) -> None:
        with self._state.lock:
            self._state.faults.clear()

    @property
    def served(self) -> list[Served]:
        """Every file request so far, in order."""
        with self._state.lock:
            return list(self._state.served)

    @property
    def api_calls(self) -> list[str]:
        """Request lines (method and path with query) of every request so far."""
        with self._state.lock:
            return list(self._state.api_calls)

    def bytes_served(self, model_id: str | None = None, path: str | None = None) -> int:
        """File body bytes sent so far, for a repo and/or file or in total."""
        return sum(s.bytes for s in self.served
                   if (model_id is None or s.model_id == model_id)
                   and (path is None or s.path == path))

    def reset_counters(self) -> None:
        with self._state.lock:
            self._state.served.clear()
            self._state.api_calls.clear()

    def start(self) -> StandInHub:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="modelscope-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            # shutdown() waits for serve_forever, so only a started server gets it.
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _set_fault(self, model_id: str, path: str, fault: _Fault) -> None:
        if path not in self._state.repos[model_id].files:
            raise KeyError(f"{model_id} has no file {path!r}")
        with self._state.lock:
            self._state.faults[(model_id, path)] = fault


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], state: _State):
        super().__init__(address, handler)
        self.state = state


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``api_calls`` and ``served`` instead."""

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, *, head: bool) -> None:
        state = self.server.state
        with state.lock:
            state.api_calls.append(f"{self.command} {self.path}")
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = unquote(url.path)
        if path == f"{API}/repos/internalAccelerationInfo":
            self._json(200, {"Code": 200, "Data": {"InternalRegionQueryAddress": ""},
                             "Success": True}, head)
            return
        match = _REPO_RE.fullmatch(path)
        if match is None:
            self._error(404, f"no such API: {path}", head)
            return
        if state.token and not self._authorized(state.token):
            self._error(401, "login required: this stand-in hub was started with a token", head)
            return
        repo = state.repos.get(match.group(1))
        if repo is None:
            self._error(404, f"model {match.group(1)} not found", head)
            return
        kind = match.group(2)
        if kind is None:
            self._json(200, {"Code": 200, "Success": True,
                             "Data": {"Path": repo.model_id.split("/")[0],
                                      "Name": repo.model_id.split("/")[1],
                                      "Revision": repo.commit}}, head)
            return
        revision = query.get("Revision", DEFAULT_REVISION)
        if revision not in repo.revisions:
            self._error(404, f"revision {revision} of {repo.model_id} not found", head)
            return
        if kind == "/repo/files":
            self._list(repo, query.get("Root", "").strip("/"), head)
        else:
            self._file(repo, query.get("FilePath", ""), head)

    def _authorized(self, token: str) -> bool:
        cookies = self.headers.get("Cookie", "")
        return (self.headers.get("Authorization") == f"Bearer {token}"
                or f"m_session_id={token}" in [c.strip() for c in cookies.split(";")])

    def _list(self, repo: Repo, root: str, head: bool) -> None:
        prefix = f"{root}/" if root else ""
        chosen = [f for f in repo.files.values() if f.path.startswith(prefix)]
        if root and not chosen:
            self._error(404, f"path {root} not found in {repo.model_id}", head)
            return
        dirs = sorted({str(Path(f.path).parent) for f in chosen} - {"."} - {root})
        entries: list[dict[str, Any]] = [
            {"Name": Path(d).name, "Path": d, "Type": "tree", "Size": 0, "Sha256": "",
             "IsLFS": False, "Revision": repo.commit} for d in dirs]
        entries += [
            {"Name": Path(f.path).name, "Path": f.path, "Type": "blob", "Size": f.size,
             "Sha256": f.sha256, "IsLFS": f.size > 1024 * 1024, "Revision": repo.commit}
            for f in chosen]
        self._json(200, {"Code": 200, "Data": {"Files": entries}, "Success": True}, head)

    def _file(self, repo: Repo, file_path: str, head: bool) -> None:
        entry = repo.files.get(file_path.lstrip("/"))
        if entry is None:
            self._error(404, f"file {file_path} not found in {repo.model_id}", head)
            return
        fault = self._take_fault(repo.model_id, entry.path)
        corruption = fault.corruption if fault else None
        size = 0 if corruption == "empty" else entry.size
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header and corruption != "empty":
            parsed = _RANGE_RE.fullmatch(range_header.strip())
            if parsed is None or int(parsed.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(repo, entry, range_header, 416, 0)
                return
            start = int(parsed.group(1))
            if parsed.group(2):
                end = min(int(parsed.group(2)), size - 1)
            status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Request-ID", uuid.uuid4().hex)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            self._record(repo, entry, range_header, status, 0)
            return
        limit = fault.cut_after if fault and fault.cut_after is not None else None
        sent = 0
        try:
            for chunk in _read(entry.source, start, length, flip_first=corruption == "flip"):
                if limit is not None and sent + len(chunk) >= limit:
                    chunk = chunk[: max(0, limit - sent)]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    self.wfile.flush()
                    # The announced length was not sent: drop the connection.
                    self.close_connection = True
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        self._record(repo, entry, range_header, status, sent)

    def _take_fault(self, model_id: str, path: str) -> _Fault | None:
        state = self.server.state
        with state.lock:
            fault = state.faults.get((model_id, path))
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del state.faults[(model_id, path)]
            return fault

    def _record(self, repo: Repo, entry: RepoFile, range_header: str | None, status: int,
                sent: int) -> None:
        state = self.server.state
        with state.lock:
            state.served.append(Served(repo.model_id, entry.path, range_header, status, sent))

    def _json(self, status: int, body: dict[str, Any], head: bool) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, message: str, head: bool) -> None:
        self._json(status, {"Code": status, "Message": message, "Success": False,
                            "RequestId": uuid.uuid4().hex}, head)


def _read(source: Path, start: int, length: int, *, flip_first: bool) -> Iterator[bytes]:
    with source.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            if flip_first and start == 0 and left == length:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            left -= len(chunk)
            yield chunk
