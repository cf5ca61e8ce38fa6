"""`orchestrate mirror`: the weights a plan needs, fetched once onto the control machine and
served from there to every host, so that bytes taken from the origin stay 1x whatever the
number of hosts. The same directory, carried inside an isolated network, is the air-gapped
mode (docs/airgapped.md).

    <dir>/models/<key>/manifest.json   {"origin": {...}, "files": {"<path>": {"size", "sha256"}}}
    <dir>/models/<key>/files/<path>    the model's files
    <dir>/.state/                      the modelscope client's locks and session (never served)

ModelScope models are downloaded with the real `modelscope` client (`modelscope download`,
the command the model_weights role runs on hosts), which resumes interrupted files; a
model_dir of the control machine is copied. Every file is then checked by size and sha256
against the source's list (the hub's file list, or the directory's own manifest.json when
it has one) before manifest.json is written. The manifest is also the completion marker: a
model whose manifest names the same origin is not fetched again, nor hashed again (`up`
stages on every run, and re-reading 140 GB each time is not an option); `verify=True`
(`orchestrate mirror --verify`) re-hashes every staged file and fetches a damaged one again.
Hosts read it through the model_weights role's `mirror` source (the plan sets url and
manifest_url from mirror.url); `orchestrate up` serves it for the run when mirror.listen asks.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import http.server
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import httpx

from orchestrator.config.fleet import MirrorSettings
from orchestrator.errors import ConfigError, MissingExtra, OrchestrateError
from orchestrator.plan.planner import MIRROR_MODELS, WeightsOrigin

MANIFEST = "manifest.json"
FILES = "files"
STATE = ".state"
DEFAULT_PORT = 8090
# Free space to leave on the mirror's file system after a download.
MARGIN_BYTES = 1 << 30
# The hub's repo/files answer stops at this many entries (modelscope-hub 0.5.1); the
# client then walks the tree, but one listing is all this module reads to check files.
LISTING_LIMIT = 3000
_CHUNK = 1 << 20
# The one directory the server lists (orchestrator.mirror.packages.WHEELS, which imports
# this module): pip's find-links.
_LISTED = "wheels"
_REPORTED = 5  # failing files named in one error


class MirrorError(OrchestrateError):
    pass


@dataclass(frozen=True)
class Staged:
    """One model in the mirror, and what this run took from its origin."""

    key: str
    source: str
    origin: str
    deployments: tuple[str, ...]
    path: str
    files: int
    total_bytes: int
    # Bytes taken from the origin by this run: 0 when the mirror already had the model.
    origin_bytes: int
    already_staged: bool
    # Staged files that --verify found damaged (then fetched again from the origin).
    repaired: tuple[str, ...] = ()


def mirror_dir(settings: MirrorSettings | None, default: Path) -> Path:
    return Path(settings.dir) if settings and settings.dir else default


def modelscope_endpoint(settings: MirrorSettings | None) -> str:
    endpoint = (settings.modelscope_endpoint if settings
                else MirrorSettings.model_fields["modelscope_endpoint"].default)
    return str(endpoint).rstrip("/")


def parse_listen(text: str | None, settings: MirrorSettings | None, *,
                 key: str = "--listen") -> tuple[str, int]:
    """`[HOST:]PORT` to serve on; default loopback, on mirror.url's port: serving the
    hosts is the operator's choice of an address they reach (mirror.listen, --listen)."""
    if text is None:
        port = urlsplit(settings.url).port if settings else None
        return "127.0.0.1", port or DEFAULT_PORT
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"'{text}': expected [HOST:]PORT, e.g. 0.0.0.0:{DEFAULT_PORT}",
                          key=key)
    return host, int(port_text)


def stage_weights(origins: list[WeightsOrigin], directory: Path, *, endpoint: str,
                  token: str | None, log: Callable[[str], None],
                  margin_bytes: int = MARGIN_BYTES, retries: int = 2,
                  retry_delay: float = 5.0, verify: bool = False) -> list[Staged]:
    """Put every model of `origins` into the mirror at `directory`, checked, once; with
    `verify`, re-hash the models already staged and fetch their damaged files again."""
    fetch = _Fetch(endpoint=endpoint.rstrip("/"), token=token, log=log,
                   margin_bytes=margin_bytes, retries=retries, retry_delay=retry_delay,
                   state=directory / STATE, verify=verify)
    return [fetch.stage(origin, directory / MIRROR_MODELS / origin.key) for origin in origins]


@dataclass(frozen=True)
class _Fetch:
    endpoint: str
    token: str | None
    log: Callable[[str], None]
    margin_bytes: int
    retries: int
    retry_delay: float
    state: Path
    verify: bool = False

    def stage(self, origin: WeightsOrigin, dest: Path) -> Staged:
        identity = _identity(origin)
        described = (f"{origin.model_id}@{origin.revision} from {self.endpoint}"
                     if origin.source == "modelscope" else str(origin.local_dir))
        manifest_path = dest / MANIFEST
        done = read_json(manifest_path)
        damaged: list[str] = []
        if done is not None and done.get("origin") == identity and self.verify:
            damaged = _damaged(done["files"], dest / FILES)
            for path in damaged:
                self.log(f"{dest / FILES / path}: differs from {manifest_path}; "
                         f"fetching it again from {described}")
                # Gone, so that the client downloads it again rather than trusting its size.
                (dest / FILES / path).unlink(missing_ok=True)
        if done is not None and done.get("origin") == identity and not damaged:
            files = done["files"]
            fetched, already = 0, True
        else:
            # Until its manifest is back, the model is not complete for hosts or reruns.
            manifest_path.unlink(missing_ok=True)
            (dest / FILES).mkdir(parents=True, exist_ok=True)
            if origin.source == "modelscope":
                files, fetched = self._modelscope(origin, dest / FILES)
            else:
                files, fetched = self._local(origin, dest / FILES)
            _write_json(manifest_path, {"origin": identity, "files": files})
            already = False
        return Staged(key=origin.key, source=origin.source, origin=described,
                      deployments=origin.deployments, path=str(dest), files=len(files),
                      total_bytes=sum(int(f["size"]) for f in files.values()),
                      origin_bytes=fetched, already_staged=already, repaired=tuple(damaged))

    def _modelscope(self, origin: WeightsOrigin, files_dir: Path
                    ) -> tuple[dict[str, dict[str, Any]], int]:
        assert origin.revision is not None
        ref = f"{origin.model_id}@{origin.revision}"
        # Before the hub is asked anything: without the client nothing can be downloaded.
        client = _client()
        expected = self._listing(origin.model_id, origin.revision, ref)
        need = _bytes_to_fetch(expected, files_dir)
        _check_space(files_dir, need, self.margin_bytes, ref)
        before = _snapshot(expected, files_dir)
        self.log(f"downloading {ref} from {self.endpoint}: {need} bytes into {files_dir}")
        cmd = [client, "download", "--model", origin.model_id, "--revision", origin.revision,
               "--local_dir", str(files_dir), "--max-workers", "4"]
        env = {**os.environ, "MODELSCOPE_ENDPOINT": self.endpoint,
               "MODELSCOPE_HOME": str(self.state / "modelscope"),
               "MODELSCOPE_CACHE": str(self.state / "modelscope" / "cache")}
        if self.token:
            # The environment, never the command line (which every user can read).
            env["MODELSCOPE_API_TOKEN"] = self.token
        for attempt in range(self.retries + 1):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
            if attempt < self.retries:
                # The client resumes its partial files (<file>.incomplete) on the next run.
                self.log(f"the modelscope client failed for {ref} (exit {proc.returncode}); "
                         f"running it again ({attempt + 1} of {self.retries})")
                time.sleep(self.retry_delay)
        report = proc.stderr.splitlines()
        problems = _check_files(expected, files_dir, report)
        if problems:
            raise MirrorError(f"{ref} from {self.endpoint}: {_summary(problems)}")
        if proc.returncode != 0:
            said = [line.strip() for line in report if line.strip().startswith(("error", "- "))]
            raise MirrorError(f"the modelscope client failed (exit {proc.returncode}) for {ref} "
                              f"from {self.endpoint}: "
                              f"{' '.join((said or report or ['no output'])[-_REPORTED:])}")
        return expected, _fetched_bytes(expected, files_dir, before)

    def _listing(self, model_id: str, revision: str, ref: str) -> dict[str, dict[str, Any]]:
        """The hub's file list (what the client downloads and checks) as a manifest."""
        headers = _hub_headers(self.token)
        try:
            answer = httpx.get(f"{self.endpoint}/api/v1/models/{model_id}/repo/files",
                               params={"Revision": revision, "Recursive": "True"},
                               headers=headers, timeout=60)
        except httpx.HTTPError as exc:
            raise MirrorError(f"cannot reach {self.endpoint} for {ref}: {exc}") from None
        try:
            body = answer.json()
        except ValueError:
            body = None
        if answer.status_code != 200:
            said = body.get("Message") if isinstance(body, dict) else None
            hint = ("a private repository needs MODELSCOPE_API_TOKEN in the environment"
                    if answer.status_code in (401, 403) else
                    "check the deployment's model and revision")
            raise MirrorError(f"{self.endpoint} answered HTTP {answer.status_code} for {ref}"
                              f"{': ' + str(said) if said else ''}; {hint}")
        entries = (body.get("Data") or {}).get("Files") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise MirrorError(f"{self.endpoint} answered without a ModelScope file list for "
                              f"{ref}: is mirror.modelscope_endpoint a ModelScope hub?")
        if len(entries) >= LISTING_LIMIT:
            raise MirrorError(f"{ref}: the hub listed {len(entries)} entries, its limit for one "
                              "listing; a repository this large cannot be checked here")
        files: dict[str, dict[str, Any]] = {}
        for entry in entries:
            path = str(entry.get("Path") or entry.get("Name") or "")
            if not path or (entry.get("Type") or "blob") == "tree":
                continue
            parts = path.split("/")
            if path.startswith("/") or ".." in parts:
                raise MirrorError(f"{ref}: the hub lists a path outside the model: {path}")
            files[path] = {"size": int(entry.get("Size") or 0),
                           "sha256": str(entry.get("Sha256") or "").lower()}
        if not files:
            raise MirrorError(f"{ref}: the hub lists no file")
        return dict(sorted(files.items()))

    def _local(self, origin: WeightsOrigin, files_dir: Path
               ) -> tuple[dict[str, dict[str, Any]], int]:
        assert origin.local_dir is not None
        source = Path(origin.local_dir)
        found = _walk(source, origin)
        _check_space(files_dir, sum(p.stat().st_size for p in found.values()),
                     self.margin_bytes, str(source))
        self.log(f"copying {source} into {files_dir}")
        files: dict[str, dict[str, Any]] = {}
        for rel, path in found.items():
            size, digest = _copy_hashing(path, files_dir / rel)
            files[rel] = {"size": size, "sha256": digest}
        # The directory's own manifest.json (orchestrator/sandbox/modelgen.py writes one), if any,
        # is the source's list: a damaged local copy stops here, not on every host.
        listed = read_json(source / MANIFEST)
        if listed is not None and isinstance(listed.get("files"), dict):
            problems = [f"{source}/{path}: " + (
                "missing" if path not in files else
                f"{files[path]['size']} bytes, sha256 {files[path]['sha256']}; its manifest.json "
                f"lists {entry.get('size')} bytes, sha256 {entry.get('sha256')}")
                for path, entry in sorted(listed["files"].items())
                if path not in files or files[path]["size"] != entry.get("size")
                or files[path]["sha256"] != entry.get("sha256")]
            if problems:
                raise MirrorError(_summary(problems))
        return files, sum(int(f["size"]) for f in files.values())


def _hub_headers(token: str | None) -> dict[str, str]:
    # As the modelscope client sends its token: a bearer header and the session cookie.
    return ({"Authorization": f"Bearer {token}", "Cookie": f"m_session_id={token}"}
            if token else {})


# A revision that names one commit already: git's 40 hex digits (64 in SHA-256 repositories).
COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class HubUnreachable(MirrorError):
    """The hub did not answer at all (as opposed to answering no)."""


def resolve_revision(endpoint: str, model_id: str, revision: str, *, token: str | None,
                     client: httpx.Client | None = None) -> str | None:
    """The commit that a moving revision (a branch) of `model_id` names at the hub now; None
    when `revision` names one commit already (a commit id, or a tag).

    The hub's branches and tags: GET /api/v1/models/{id}/revisions, answering
    {"Data": {"RevisionMap": {"Branches": [{"Revision", "CreatedAt", ...}], "Tags": [...]}}}
    (modelscope-hub 0.5.1, _legacy_api.list_revisions_detail, which HubApi's
    get_model_branches_and_tags_details calls). The commit: the branch entry's "CommitId"
    where the hub gives one, else the commit its file list at the branch was taken at, which
    every entry of GET /api/v1/models/{id}/repo/files?Revision=<branch> carries as "Revision"
    (the listing _listing reads). The client accepts a commit id as --revision."""
    if COMMIT_ID.fullmatch(revision):
        return None
    ref = f"{model_id}@{revision}"
    http = client or httpx.Client(timeout=60)
    try:
        answer = _hub_get(http, f"{endpoint}/api/v1/models/{model_id}/revisions", {},
                          token, ref, endpoint)
        found = ((answer.json().get("Data") or {}).get("RevisionMap")
                 if answer.status_code == 200 and _json_object(answer) else None)
        if isinstance(found, dict):
            branches = {str(b.get("Revision")): b for b in found.get("Branches") or []
                        if isinstance(b, dict)}
            tags = {str(t.get("Revision")) for t in found.get("Tags") or []
                    if isinstance(t, dict)}
            if revision in tags and revision not in branches:
                return None
            if revision not in branches:
                raise MirrorError(
                    f"{endpoint}: {model_id} has no revision '{revision}' (branches: "
                    f"{', '.join(sorted(branches)) or 'none'}; tags: "
                    f"{', '.join(sorted(tags)) or 'none'}); check the deployment's revision")
            commit = str(branches[revision].get("CommitId") or "")
            if commit:
                return commit
        elif answer.status_code in (401, 403):
            raise MirrorError(f"{endpoint} answered HTTP {answer.status_code} for {ref}; a "
                              "private repository needs MODELSCOPE_API_TOKEN in the environment")
        # A hub without the revisions API (or no commit in it): the file list's.
        listing = _hub_get(http, f"{endpoint}/api/v1/models/{model_id}/repo/files",
                           {"Revision": revision, "Recursive": "True"}, token, ref, endpoint)
    finally:
        if client is None:
            http.close()
    body = listing.json() if _json_object(listing) else {}
    entries = (body.get("Data") or {}).get("Files") if listing.status_code == 200 else None
    if not isinstance(entries, list):
        said = body.get("Message")
        raise MirrorError(f"{endpoint} answered HTTP {listing.status_code} for {ref}"
                          f"{': ' + str(said) if said else ''}; check the deployment's model "
                          "and revision")
    commits = {str(e.get("Revision")) for e in entries
               if isinstance(e, dict) and COMMIT_ID.fullmatch(str(e.get("Revision") or ""))}
    if len(commits) != 1:
        raise MirrorError(f"{endpoint} names no single commit for {ref} (its file list "
                          f"gives {len(commits)}); give the deployment a commit id as "
                          "revision")
    return commits.pop()


def _hub_get(http: httpx.Client, url: str, params: dict[str, str], token: str | None,
             ref: str, endpoint: str) -> httpx.Response:
    try:
        return http.get(url, params=params, headers=_hub_headers(token))
    except httpx.HTTPError as exc:
        raise HubUnreachable(f"cannot reach {endpoint} for {ref}: {exc}") from None


def _json_object(answer: httpx.Response) -> bool:
    try:
        return isinstance(answer.json(), dict)
    except ValueError:
        return False


def _identity(origin: WeightsOrigin) -> dict[str, Any]:
    """What a staged model came from; a manifest naming the same is not fetched again."""
    if origin.source == "modelscope":
        return {"source": "modelscope", "model_id": origin.model_id,
                "revision": origin.revision}
    assert origin.local_dir is not None
    found = _walk(Path(origin.local_dir), origin)
    # Names, sizes and times: a changed local model is copied again.
    listing = [[rel, p.stat().st_size, p.stat().st_mtime_ns] for rel, p in found.items()]
    return {"source": "local", "local_dir": origin.local_dir,
            "fingerprint": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def _walk(source: Path, origin: WeightsOrigin) -> dict[str, Path]:
    if not source.is_dir():
        raise MirrorError(f"model_dir {source} of deployment {', '.join(origin.deployments)}: "
                          "not a directory on this machine")
    return {p.relative_to(source).as_posix(): p
            for p in sorted(source.rglob("*")) if p.is_file()}


def _client() -> str:
    """The modelscope command installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "modelscope"
    found = str(beside) if beside.exists() else shutil.which("modelscope")
    if found is None:
        raise MissingExtra("the modelscope client is not installed: pip install "
                          "'qwen-fleet-orchestrator[mirror]' (modelscope==1.40.2)")
    return found


def _bytes_to_fetch(expected: dict[str, dict[str, Any]], files_dir: Path) -> int:
    """As the client goes about it: a file of the listed size is kept when its hash matches,
    a partial <file>.incomplete no longer than the file is resumed, the rest fetched whole."""
    total = 0
    for path, entry in expected.items():
        size, target = int(entry["size"]), files_dir / path
        partial = _size(target.with_name(target.name + ".incomplete"))
        if target.is_file():
            total += 0 if target.stat().st_size == size else size
        else:
            total += size - partial if partial is not None and partial <= size else size
    return total


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def _check_space(directory: Path, need: int, margin: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if need + margin > free:
        raise MirrorError(f"not enough space for {what} in {directory}: {need} bytes "
                          f"({need / 2**30:.1f} GiB) to fetch plus a margin of "
                          f"{margin // 2**20} MiB, but {free} bytes ({free / 2**30:.1f} GiB) "
                          "are free there")


_Stat = tuple[int, int, int]


def _snapshot(expected: dict[str, dict[str, Any]], files_dir: Path
              ) -> dict[str, tuple[_Stat | None, int]]:
    """Each listed file's (size, mtime, inode) and its partial download's size, before."""
    found: dict[str, tuple[_Stat | None, int]] = {}
    for path in expected:
        target = files_dir / path
        st = target.stat() if target.is_file() else None
        found[path] = ((st.st_size, st.st_mtime_ns, st.st_ino) if st else None,
                       _size(target.with_name(target.name + ".incomplete")) or 0)
    return found


def _fetched_bytes(expected: dict[str, dict[str, Any]], files_dir: Path,
                   before: dict[str, tuple[_Stat | None, int]]) -> int:
    """Bytes the client took from the hub, as the files show it: a file it left alone cost
    nothing; one it wrote cost its size, less what a resumed partial file already held."""
    total = 0
    for path in expected:
        st = (files_dir / path).stat()
        kept, partial = before[path]
        if kept != (st.st_size, st.st_mtime_ns, st.st_ino):
            total += st.st_size - partial if partial <= st.st_size else st.st_size
    return total


def _check_files(expected: dict[str, dict[str, Any]], files_dir: Path,
                 report: list[str]) -> list[str]:
    """Every listed file's size and sha256; a failing file named, with the client's own
    line about it (`  - <path>: <error>`) when it printed one."""
    problems = []
    for path, entry in expected.items():
        target = files_dir / path
        if target.is_file():
            size, digest = hash_file(target)
            if size == entry["size"] and (not entry["sha256"] or digest == entry["sha256"]):
                continue
            found = f"{size} bytes, sha256 {digest}"
        else:
            found = "missing"
        said = [line.strip() for line in report if line.strip().startswith(f"- {path}:")]
        problems.append(f"{target}: {found}; the hub lists {entry['size']} bytes, sha256 "
                        f"{entry['sha256'] or '(none)'}"
                        + (f" (the client reported: {said[0]})" if said else ""))
    return problems


def _damaged(files: dict[str, dict[str, Any]], files_dir: Path) -> list[str]:
    """The manifest's files that are missing or differ in size or sha256, by path."""
    def intact(target: Path, entry: dict[str, Any]) -> bool:
        if not target.is_file() or target.stat().st_size != int(entry["size"]):
            return False
        return not entry.get("sha256") or hash_file(target)[1] == entry["sha256"]

    return [path for path, entry in sorted(files.items()) if not intact(files_dir / path, entry)]


def _summary(problems: list[str]) -> str:
    more = len(problems) - _REPORTED
    return "; ".join(problems[:_REPORTED]) + (f"; and {more} more" if more > 0 else "")


def hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _copy_hashing(source: Path, target: Path) -> tuple[int, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as src, partial.open("wb") as out:
        while block := src.read(_CHUNK):
            digest.update(block)
            out.write(block)
            size += len(block)
    partial.replace(target)
    return size, digest.hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)


# --- serving -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request the mirror server answered."""

    client: str
    path: str
    status: int
    bytes: int


@dataclass
class Traffic:
    """What a MirrorServer sent, per URL path: how many requests, how many answered 200,
    and the bytes of those answers. Hosts behind NAT share one client address (the sandbox's
    do), so paths, not addresses, show that each host fetched each file."""

    paths: dict[str, dict[str, int]] = field(default_factory=dict)
    # Where the server listens (the port it bound when asked for port 0).
    address: tuple[str, int] = ("", 0)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, request: Request) -> None:
        path = posixpath.normpath(unquote(urlsplit(request.path).path))
        with self._lock:
            seen = self.paths.setdefault(path, {"requests": 0, "ok": 0, "bytes": 0})
            seen["requests"] += 1
            if request.status == 200:
                seen["ok"] += 1
                seen["bytes"] += request.bytes

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            paths = {p: dict(v) for p, v in sorted(self.paths.items())}
        return {"requests": sum(v["requests"] for v in paths.values()),
                "bytes": sum(v["bytes"] for v in paths.values()), "paths": paths}


@contextmanager
def serving(directory: Path, address: tuple[str, int], log: Callable[[str], None], *,
            token: str | None = None) -> Iterator[Traffic]:
    """Serve the mirror at `address` while the block runs (`up` with mirror.listen)."""
    traffic = Traffic()
    with MirrorServer(directory, *address, on_request=traffic.add, token=token) as server:
        traffic.address = server.address
        log(f"serving the mirror {directory} on {address[0]}:{server.address[1]} for this run")
        yield traffic


class MirrorServer:
    """The mirror directory over HTTP, read-only (GET and HEAD), for the hosts (mirror.url).
    Only wheels/ is listed: pip reads its listing as find-links. With a `token` (mirror.
    token_var), every request without it is answered 401: the hosts' downloads send it as
    `Authorization: Bearer`, pip as the password of the find-links URL (Basic)."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 on_request: Callable[[Request], None] | None = None,
                 token: str | None = None) -> None:
        if not directory.is_dir():
            raise MirrorError(f"{directory}: no mirror there; `orchestrate mirror` makes it")
        handler = functools.partial(_Handler, directory=str(directory))
        try:
            self._server = _Server((host, port), handler, on_request, token)
        except OSError as exc:
            raise MirrorError(f"cannot serve the mirror on {host}:{port}: {exc}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start(self) -> MirrorServer:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="mirror-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Ctrl-C on `mirror --serve` stops at once rather than waiting for every transfer in
    # flight (a host's multi-GB download) to end; that host's models stage fails and
    # fetches the file again on the next run.
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: Callable[..., _Handler],
                 on_request: Callable[[Request], None] | None, token: str | None) -> None:
        super().__init__(address, handler)
        self.on_request = on_request
        self.token = token.encode() if token else None


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server
    _status = 0
    _sent = 0

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are reported through on_request, once each, with the bytes sent."""

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = int(code)
        super().send_response(code, message)

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
        while block := source.read(_CHUNK):
            outputfile.write(block)
            self._sent += len(block)

    def do_GET(self) -> None:
        self._answer(super().do_GET)

    def do_HEAD(self) -> None:
        self._answer(super().do_HEAD)

    def list_directory(self, path: str | os.PathLike[str]) -> io.BytesIO | None:
        # pip reads wheels/ as find-links; no other directory shows what the mirror holds.
        if Path(path).resolve() == (Path(self.directory) / _LISTED).resolve():
            return super().list_directory(path)
        self.send_error(404)
        return None

    def _authorized(self) -> bool:
        """No token, or the token as a bearer or as the password of Basic auth (pip sends a
        find-links URL's credentials so), compared in constant time."""
        token = self.server.token
        if token is None:
            return True
        scheme, _, value = (self.headers.get("Authorization") or "").strip().partition(" ")
        given = value.strip().encode()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given, token)

    def _answer(self, method: Callable[[], None]) -> None:
        self._status, self._sent = 0, 0
        # Judged on the path as decoded, before any normalisation: /models/../.state/x
        # (or %2e%2e, %2f) would otherwise reach the client's state (.state/, 0600).
        # Models may hold dot files of their own (.modelgen.json); only . and .. and the
        # state directory are kept out.
        parts = unquote(urlsplit(self.path).path).replace("\\", "/").split("/")
        if not self._authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="mirror", Basic realm="mirror"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif any(part in (".", "..", STATE) for part in parts):
            self.send_error(404)
        else:
            method()
        if self.server.on_request is not None:
            self.server.on_request(Request(self.client_address[0], self.path, self._status,
                                           self._sent))
