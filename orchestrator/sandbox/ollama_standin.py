#!/usr/bin/env python3
"""STAND-IN for the Ollama binary (bin/ollama in ollama-linux-<arch>.tar.zst).

The real Ollama cannot be downloaded on the development and CI machines. The sandbox
(`orchestrate up --hosts sandbox`) and the tests pack this program as bin/ollama into
an archive with the release's layout (ollama_standin_release.py) and install it
through the ollama role's real code path (sha256, unpack, symlinks, systemd unit). It
is a stand-in, not an emulator:

- `ollama serve` answers the parts of Ollama's HTTP API that the role and the
  probes use (/api/version, /api/tags, /api/pull, /api/blobs, /api/create,
  /api/show, /api/generate, /api/chat, /v1/models, /v1/chat/completions) on
  OLLAMA_HOST, and stores models under OLLAMA_MODELS in Ollama's layout
  (manifests/<registry>/<namespace>/<model>/<tag>, blobs/sha256-<hex>).
- It runs no model: chats get a canned, deterministic answer, and `pull` makes a
  small placeholder blob instead of downloading (there is no registry to reach).
- Like Ollama it fails to start when it cannot create OLLAMA_MODELS or its key
  under $HOME/.ollama. It is stricter in one way: it also fails at start when
  OLLAMA_MODELS exists but is not writable (Ollama only fails at the first pull),
  so that a wrong owner shows at once.
- `ollama list`, `pull`, `create -f Modelfile` and `--version` talk to the server
  over HTTP, as Ollama's CLI does; `create` uploads a local GGUF as a blob first.

Standard library only: it runs under the test host's /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

# The release this program stands in for; make_release.py rewrites it when it packs
# another version.
VERSION = "0.32.7"
# The Server header of every answer: how a client (orchestrator/verify/httpprobe.py) tells this
# stand-in from the real Ollama, which sends none.
SERVER_NAME = "ollama-standin"
DEFAULT_PORT = 11434
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
GGUF_MAGIC = b"GGUF"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
NAME_RE = re.compile(r"^(?:(?P<host>[A-Za-z0-9.-]+(?::\d+)?)/)??(?:(?P<ns>[A-Za-z0-9._-]+)/)?"
                     r"(?P<model>[A-Za-z0-9][A-Za-z0-9._-]*)(?::(?P<tag>[A-Za-z0-9][A-Za-z0-9._-]*))?$")


class StandinError(Exception):
    """An error reported to the client as Ollama does: {"error": "..."}."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def log(level: str, msg: str, **fields: object) -> None:
    """One line in the key=value style of Ollama's server log."""
    now = dt.datetime.now().astimezone().isoformat(timespec="milliseconds")
    extra = "".join(f" {key}={json.dumps(str(value))}" for key, value in fields.items())
    print(f'time={now} level={level} source=stand-in msg="{msg}"{extra}', file=sys.stderr,
          flush=True)


# --- model names and storage ------------------------------------------------------

def parse_name(name: str) -> tuple[str, str, str, str]:
    """(registry, namespace, model, tag) of a model name such as qwen2.5:7b."""
    match = NAME_RE.match(name)
    if not match:
        raise StandinError(f'invalid model name "{name}"')
    host = match["host"] or DEFAULT_REGISTRY
    if match["host"] and not match["ns"]:
        # "a/b" is namespace/model, not registry/model.
        host, namespace = DEFAULT_REGISTRY, match["host"]
    else:
        namespace = match["ns"] or DEFAULT_NAMESPACE
    return host, namespace, match["model"], match["tag"] or "latest"


def display_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The name as `ollama list` and /api/tags show it (defaults left out)."""
    prefix = "" if host == DEFAULT_REGISTRY else f"{host}/"
    if prefix or namespace != DEFAULT_NAMESPACE:
        prefix += f"{namespace}/"
    return f"{prefix}{model}:{tag}"


class Store:
    """Manifests and blobs under OLLAMA_MODELS, in the directory layout Ollama uses."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"

    def create_directories(self) -> None:
        for directory in (self.blobs, self.manifests):
            directory.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        with tempfile.NamedTemporaryFile(dir=self.blobs, prefix=".write-test-"):
            pass

    def blob_path(self, digest: str) -> Path:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise StandinError(f"invalid digest format: {digest}")
        return self.blobs / digest.replace(":", "-")

    def put_blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            self._write_atomic(path, data)
        return {"digest": digest, "size": len(data)}

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def manifest_path(self, name: str) -> Path:
        host, namespace, model, tag = parse_name(name)
        return self.manifests / host / namespace / model / tag

    def write_manifest(self, name: str, layers: list[dict[str, Any]],
                       details: dict[str, Any]) -> None:
        config = self.put_blob(json.dumps({"model_format": "gguf", **details,
                                           "os": "linux", "stand_in": True}).encode())
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                    "config": {"mediaType": MEDIA_CONFIG, **config}, "layers": layers}
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, json.dumps(manifest).encode())

    def read_manifest(self, name: str) -> dict[str, Any]:
        path = self.manifest_path(name)
        if not path.is_file():
            raise StandinError(f"model '{name}' not found", HTTPStatus.NOT_FOUND)
        manifest: dict[str, Any] = json.loads(path.read_bytes())
        return manifest

    def layer_text(self, manifest: dict[str, Any], media_type: str) -> str:
        for layer in manifest["layers"]:
            if layer["mediaType"] == media_type:
                return self.blob_path(layer["digest"]).read_text()
        return ""

    def details(self, manifest: dict[str, Any]) -> dict[str, Any]:
        config = json.loads(self.blob_path(manifest["config"]["digest"]).read_bytes())
        return {"parent_model": "", "format": "gguf", "family": config.get("model_family", ""),
                "families": [config["model_family"]] if config.get("model_family") else None,
                "parameter_size": "", "quantization_level": ""}

    def models(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(self.manifests).parts
            raw = path.read_bytes()
            manifest = json.loads(raw)
            name = display_name(host, namespace, model, tag)
            modified = dt.datetime.fromtimestamp(path.stat().st_mtime).astimezone()
            found.append({
                "name": name, "model": name, "modified_at": modified.isoformat(),
                "size": sum(layer["size"] for layer in manifest["layers"]),
                "digest": hashlib.sha256(raw).hexdigest(),
                "details": self.details(manifest),
            })
        return found


# --- canned answers -----------------------------------------------------------------

def canned_answer(model: str, prompt_words: int) -> str:
    """Deterministic text: the stand-in runs no model."""
    return (f"Stand-in answer: {model} is not run by the Ollama stand-in "
            f"({prompt_words} prompt words received).")


def words(text: str) -> int:
    return len(text.split())


# --- HTTP server -------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Ollama's HTTP API, the parts the role and the probes use."""

    server_version = f"{SERVER_NAME}/{VERSION}"
    store: Store

    def log_message(self, format: str, *args: Any) -> None:
        log("INFO", "request", client=self.client_address[0], line=format % args)

    # plumbing

    def _send_json(self, body: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, text: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _stream(self, events: list[dict[str, Any]], stream: bool) -> None:
        """NDJSON when streaming (HTTP/1.0: the body ends when the connection closes),
        else the last event alone, as Ollama does."""
        errors = [event for event in events if "error" in event]
        if not stream:
            if errors:
                self._send_json(errors[0], HTTPStatus.INTERNAL_SERVER_ERROR)
            else:
                self._send_json(events[-1])
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for event in events:
            self.wfile.write(json.dumps(event).encode() + b"\n")
            self.wfile.flush()

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self._body() or b"{}")
        except json.JSONDecodeError as err:
            raise StandinError(f"invalid JSON: {err}") from err
        if not isinstance(body, dict):
            raise StandinError("request body must be a JSON object")
        return body

    def _model_of(self, body: dict[str, Any]) -> str:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise StandinError("model is required")
        return name

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        handler = routes.get(path)
        if handler is None and path.startswith("/api/blobs/"):
            handler = routes.get("/api/blobs/")
        try:
            if handler is None:
                raise StandinError("404 page not found", HTTPStatus.NOT_FOUND)
            handler()
        except StandinError as err:
            self._send_json({"error": str(err)}, err.status)

    def do_GET(self) -> None:
        self._dispatch({"/": self._root, "/api/version": self._version, "/api/tags": self._tags,
                        "/api/ps": self._ps, "/v1/models": self._v1_models})

    def do_HEAD(self) -> None:
        self._dispatch({"/": self._root, "/api/blobs/": self._head_blob})

    def do_POST(self) -> None:
        self._dispatch({"/api/pull": self._pull, "/api/blobs/": self._post_blob,
                        "/api/create": self._create, "/api/show": self._show,
                        "/api/generate": self._generate, "/api/chat": self._chat,
                        "/v1/chat/completions": self._v1_chat})

    # read-only endpoints

    def _root(self) -> None:
        self._send_text("Ollama is running")

    def _version(self) -> None:
        self._send_json({"version": VERSION})

    def _tags(self) -> None:
        self._send_json({"models": self.store.models()})

    def _ps(self) -> None:
        self._send_json({"models": []})

    def _v1_models(self) -> None:
        created = int(time.time())
        self._send_json({"object": "list", "data": [
            {"id": model["name"], "object": "model", "created": created, "owned_by": "library"}
            for model in self.store.models()]})

    def _show(self) -> None:
        name = self._model_of(self._json_body())
        manifest = self.store.read_manifest(name)
        params = json.loads(self.store.layer_text(manifest, MEDIA_PARAMS) or "{}")
        lines = [f"{key} {json.dumps(value) if isinstance(value, str) else value}"
                 for key, values in params.items()
                 for value in (values if isinstance(values, list) else [values])]
        self._send_json({
            "template": self.store.layer_text(manifest, MEDIA_TEMPLATE),
            "system": self.store.layer_text(manifest, MEDIA_SYSTEM),
            "parameters": "\n".join(lines),
            "details": self.store.details(manifest),
            "model_info": {},
        })

    # writing endpoints

    def _pull(self) -> None:
        body = self._json_body()
        name = self._model_of(body)
        parse_name(name)
        # No registry to download from: a small placeholder GGUF, the same for the same
        # name, so that a second pull finds every layer present.
        blob = self.store.put_blob(GGUF_MAGIC + f" stand-in weights for {name}\n".encode())
        short = blob["digest"].split(":")[1][:12]
        family = "qwen2" if name.startswith("qwen2") else ""
        self.store.write_manifest(name, [{"mediaType": MEDIA_MODEL, **blob}],
                                  {"model_family": family})
        self._stream([
            {"status": "pulling manifest"},
            {"status": f"pulling {short}", "digest": blob["digest"], "total": blob["size"],
             "completed": blob["size"]},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ], body.get("stream", True))

    def _head_blob(self) -> None:
        path = self.store.blob_path(self.path.rsplit("/", 1)[1])
        self.send_response(HTTPStatus.OK if path.is_file() else HTTPStatus.NOT_FOUND)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _post_blob(self) -> None:
        digest = self.path.rsplit("/", 1)[1]
        self.store.blob_path(digest)
        data = self._body()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise StandinError("digest mismatch")
        self.store.put_blob(data)
        self.send_response(HTTPStatus.CREATED)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _create(self) -> None:
        body = self._json_body()
        name = self._model_of(body)
        parse_name(name)
        files = body.get("files") or {}
        if not isinstance(files, dict) or len(files) != 1:
            raise StandinError("the stand-in creates models from exactly one GGUF file")
        (filename, digest), = files.items()
        path = self.store.blob_path(digest)
        if not path.is_file():
            raise StandinError(f"blob {digest} not found: upload it with POST /api/blobs first")
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise StandinError(f"{filename}: invalid file magic (not a GGUF file)")
        events: list[dict[str, Any]] = [{"status": "parsing GGUF"},
                                        {"status": f"using existing layer {digest}"}]
        layers = [{"mediaType": MEDIA_MODEL, "digest": digest, "size": path.stat().st_size}]
        extra = [(MEDIA_TEMPLATE, body.get("template")), (MEDIA_SYSTEM, body.get("system")),
                 (MEDIA_PARAMS, json.dumps(body["parameters"]) if body.get("parameters")
                  else None)]
        for media_type, text in extra:
            if text:
                layer = self.store.put_blob(str(text).encode())
                layers.append({"mediaType": media_type, **layer})
                events.append({"status": f"creating new layer {layer['digest']}"})
        self.store.write_manifest(name, layers, {"model_family": ""})
        events += [{"status": "writing manifest"}, {"status": "success"}]
        self._stream(events, body.get("stream", True))

    # canned inference

    def _generate(self) -> None:
        body = self._json_body()
        name = self._model_of(body)
        self._require_model(name)
        prompt = str(body.get("prompt", ""))
        answer = canned_answer(name, words(prompt))
        self._send_json({"model": name, "created_at": _now(), "response": answer,
                         "done": True, "done_reason": "stop",
                         "prompt_eval_count": words(prompt), "eval_count": words(answer)})

    def _chat(self) -> None:
        body = self._json_body()
        name = self._model_of(body)
        self._require_model(name)
        prompt_words = sum(words(str(m.get("content", ""))) for m in body.get("messages") or [])
        answer = canned_answer(name, prompt_words)
        self._send_json({"model": name, "created_at": _now(),
                         "message": {"role": "assistant", "content": answer},
                         "done": True, "done_reason": "stop",
                         "prompt_eval_count": prompt_words, "eval_count": words(answer)})

    def _v1_chat(self) -> None:
        body = self._json_body()
        name = self._model_of(body)
        self._require_model(name)
        prompt_words = sum(words(str(m.get("content", ""))) for m in body.get("messages") or [])
        answer = canned_answer(name, prompt_words)
        base = {"id": "chatcmpl-standin", "created": int(time.time()), "model": name,
                "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            self._send_json({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer},
                 "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_words, "completion_tokens": words(answer),
                          "total_tokens": prompt_words + words(answer)}})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunks = [{"role": "assistant", "content": answer}, {"role": "assistant", "content": ""}]
        for index, delta in enumerate(chunks):
            event = {**base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": "stop" if index else None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _require_model(self, name: str) -> None:
        try:
            self.store.read_manifest(name)
        except StandinError as err:
            raise StandinError(f'model "{name}" not found, try pulling it first',
                               HTTPStatus.NOT_FOUND) from err


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def parse_host(value: str | None) -> tuple[str, int]:
    """OLLAMA_HOST as Ollama reads it: [scheme://]host[:port], default 127.0.0.1:11434."""
    value = (value or "").strip()
    value = re.sub(r"^[a-z]+://", "", value).rstrip("/")
    if not value:
        return "127.0.0.1", DEFAULT_PORT
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<host>[^:]*)(?::(?P<port>\d+))?",
                         value)
    if not match:
        raise SystemExit(f"Error: invalid OLLAMA_HOST {value!r}")
    host = match["v6"] or match["host"] or "127.0.0.1"
    port = int(match["p6"] or match["port"] or DEFAULT_PORT)
    return host, port


def fail(message: str) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


def os_error(err: OSError, action: str) -> str:
    """An OSError in the words of Go's os package (what Ollama prints)."""
    return f"{action} {err.filename}: {os.strerror(err.errno or 0).lower()}"


def serve() -> None:
    host, port = parse_host(os.environ.get("OLLAMA_HOST"))
    home = Path(os.environ.get("HOME") or "/nonexistent")
    models = Path(os.environ.get("OLLAMA_MODELS") or home / ".ollama" / "models")
    env_names = ("OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_KEEP_ALIVE", "OLLAMA_NUM_PARALLEL",
                 "OLLAMA_MAX_LOADED_MODELS", "CUDA_VISIBLE_DEVICES")
    log("INFO", "server config (stand-in for Ollama)", version=VERSION,
        env="map[" + " ".join(f"{n}:{os.environ.get(n, '')}" for n in env_names) + "]")
    # Ollama resolves its own symlinks and looks for lib/ollama beside bin/.
    libdir = Path(os.path.realpath(sys.argv[0])).parent.parent / "lib" / "ollama"
    if libdir.is_dir():
        log("INFO", "library path", path=libdir)
    else:
        log("WARN", "no lib/ollama next to the binary: no GPU libraries", expected=libdir)

    key = home / ".ollama" / "id_ed25519"
    if not key.exists():
        log("INFO", f"Couldn't find '{key}'. Generating new private key.")
        try:
            key.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            fail("could not create directory " + os_error(err, "mkdir"))
        try:
            key.write_text("stand-in: no key material\n")
            key.chmod(0o600)
        except OSError as err:
            fail(os_error(err, "open"))
    store = Store(models)
    try:
        store.create_directories()
    except OSError as err:
        fail(os_error(err, "mkdir"))
    try:
        store.check_writable()
    except OSError as err:
        fail(f"open {store.blobs}: {os.strerror(err.errno or 0).lower()}")

    handler = type("BoundHandler", (Handler,), {"store": store})
    server_class = type("Server", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        "daemon_threads": True})
    try:
        server = server_class((host, port), handler)
    except OSError as err:
        fail(f"listen tcp {host}:{port}: {os.strerror(err.errno or 0).lower()}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log("INFO", f"Listening on {host}:{port} (version {VERSION})")
    server.serve_forever()


# --- CLI client -------------------------------------------------------------------

def base_url() -> str:
    host, port = parse_host(os.environ.get("OLLAMA_HOST"))
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def request(method: str, path: str, body: Any = None,
            data: bytes | None = None) -> urllib.request.Request:
    payload = json.dumps(body).encode() if body is not None else data
    return urllib.request.Request(base_url() + path, data=payload, method=method,
                                  headers={"Content-Type": "application/json"})


def call(req: urllib.request.Request) -> Any:
    """Send req; the response's JSON (or None); exit like Ollama's CLI on errors."""
    try:
        with urllib.request.urlopen(req, timeout=600) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as err:
        if req.get_method() == "HEAD":
            return err.code
        try:
            fail(json.loads(err.read())["error"])
        except (ValueError, KeyError):
            fail(f"{err.code} {err.reason}")
    except (urllib.error.URLError, OSError):
        fail("could not connect to ollama server, run 'ollama serve' to start it")
    if req.get_method() == "HEAD":
        return 200
    return raw


def stream(req: urllib.request.Request) -> None:
    """Print the status lines of a streamed NDJSON answer; exit 1 on an error line."""
    raw = call(req)
    for line in raw.splitlines():
        event = json.loads(line)
        if "error" in event:
            fail(event["error"])
        print(event.get("status", ""))


def human_size(size: int) -> str:
    """Decimal units, as `ollama list` shows sizes."""
    value = float(size)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def cmd_list(_: argparse.Namespace) -> None:
    models = json.loads(call(request("GET", "/api/tags")))["models"]
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    rows += [(m["name"], m["digest"][:12], human_size(m["size"]), m["modified_at"][:19])
             for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("    ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                    strict=True)).rstrip())


def cmd_pull(args: argparse.Namespace) -> None:
    stream(request("POST", "/api/pull", {"model": args.model, "stream": True}))


def parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, TEMPLATE, SYSTEM and PARAMETER commands (those the role writes); a value is
    the rest of the line, in double quotes, or in triple quotes over several lines."""
    spec: dict[str, Any] = {"parameters": {}}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        command, _, value = line.partition(" ")
        value = value.strip()
        if value.startswith('"""'):
            value = value[3:]
            while '"""' not in value:
                if index >= len(lines):
                    fail(f'{command}: unterminated """')
                value += "\n" + lines[index]
                index += 1
            value, _, rest = value.partition('"""')
            if rest.strip():
                fail(f'{command}: text after the closing """')
        elif value.startswith('"'):
            value = json.loads(value)
        command = command.upper()
        if command == "PARAMETER":
            key, _, raw = value.partition(" ")
            spec["parameters"].setdefault(key, []).append(_typed(raw.strip()))
        elif command in ("FROM", "TEMPLATE", "SYSTEM"):
            spec[command.lower()] = value
        else:
            fail(f"the Ollama stand-in does not support the Modelfile command {command}")
    if "from" not in spec:
        fail("no FROM line")
    # Ollama keeps every stop sequence and the last value of any other parameter.
    spec["parameters"] = {key: values if key == "stop" else values[-1]
                          for key, values in spec["parameters"].items()}
    return spec


def _typed(raw: str) -> Any:
    if raw.startswith('"'):
        return json.loads(raw)
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def cmd_create(args: argparse.Namespace) -> None:
    modelfile = Path(args.file)
    try:
        spec = parse_modelfile(modelfile.read_text())
    except OSError as err:
        fail(os_error(err, "open"))
    source = Path(os.path.expanduser(spec["from"]))
    if not source.is_absolute():
        source = modelfile.parent / source
    if not source.is_file():
        fail(f"the stand-in imports GGUF files only; {source} is not a file")
    print("gathering model components")
    data = source.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if call(request("HEAD", f"/api/blobs/{digest}")) != 200:
        print(f"copying file {digest} 100%")
        call(request("POST", f"/api/blobs/{digest}", data=data))
    body: dict[str, Any] = {"model": args.model, "files": {source.name: digest}, "stream": True}
    body.update({key: spec[key] for key in ("template", "system") if key in spec})
    if spec["parameters"]:
        body["parameters"] = spec["parameters"]
    stream(request("POST", "/api/create", body))


def print_version() -> None:
    try:
        with urllib.request.urlopen(base_url() + "/api/version", timeout=5) as answer:
            server = json.loads(answer.read())["version"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        print("Warning: could not connect to a running Ollama instance")
        print(f"Warning: client version is {VERSION}")
        return
    print(f"ollama version is {server}")
    if server != VERSION:
        print(f"Warning: client version is {VERSION}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ollama", description="Ollama STAND-IN (tests only)")
    parser.add_argument("-v", "--version", action="store_true", help="show version information")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="start the stand-in server")
    listing = commands.add_parser("list", aliases=["ls"], help="list models")
    listing.set_defaults(run=cmd_list)
    pull = commands.add_parser("pull", help="pull a model (a placeholder, no download)")
    pull.add_argument("model")
    pull.set_defaults(run=cmd_pull)
    create = commands.add_parser("create", help="create a model from a Modelfile")
    create.add_argument("model")
    create.add_argument("-f", "--file", default="Modelfile")
    create.set_defaults(run=cmd_create)
    args = parser.parse_args(argv)
    if args.version:
        print_version()
    elif args.command == "serve":
        serve()
    elif args.command:
        args.run(args)
    else:
        parser.print_help()


if __name__ == "__main__":
    main(sys.argv[1:])
