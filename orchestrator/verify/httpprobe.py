"""Verification probes run from the control machine, in parallel, each bounded by a timeout.

Each probe answers one question with pass or fail (skip where it does not apply), the
evidence (what was asked, what came back) and, on failure, what the operator should do
next.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.plan.planner import Plan, ProbeTarget

CHAT_PROMPT = "Say hello in one short sentence."


class ProbeResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    deployment: str
    probe: str
    # False only for a failed probe: a skipped one does not fail its host.
    passed: bool
    evidence: str
    next_step: str | None = None
    # "skip": the probe does not apply here (GPU probes on a CPU host), the evidence says
    # why. Follows `passed` when not given.
    status: Literal["pass", "fail", "skip"] = "pass"
    standin: bool = Field(default=False, description=(
        "the deployment answered with a stand-in engine's Server header: what passed is the "
        "stand-in, not the real engine"))

    @model_validator(mode="before")
    @classmethod
    def _status_from_passed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "status" not in data and "passed" in data:
            return {**data, "status": "pass" if data["passed"] else "fail"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProbeResult:
        if (self.status == "fail") == self.passed:
            raise ValueError(f"status {self.status!r} with passed={self.passed}")
        return self


class ProbeReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    results: list[ProbeResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failed_hosts(self) -> list[str]:
        return sorted({r.host for r in self.results if not r.passed})


# The real Ollama sends no Server header; a stand-in (the sandbox's) names itself in it, so
# that what a stand-in answered is never mistaken for the real engine's result.
STANDIN_SERVER_MARK = "standin"


def is_standin(server_header: str) -> bool:
    """Whether an HTTP Server header names a stand-in engine."""
    return STANDIN_SERVER_MARK in server_header.lower()


class _Results:
    """One target's results; each carries whether the target has shown itself a stand-in."""

    def __init__(self, host: str, deployment: str) -> None:
        self.host, self.deployment = host, deployment
        self.standin = False

    def saw(self, response: httpx.Response) -> None:
        """Take note of what the server calls itself."""
        self.standin = self.standin or is_standin(response.headers.get("server", ""))

    def __call__(self, probe: str, passed: bool, evidence: str,
                 next_step: str | None = None) -> ProbeResult:
        return ProbeResult(host=self.host, deployment=self.deployment, probe=probe,
                           passed=passed, evidence=evidence,
                           next_step=None if passed else next_step, standin=self.standin)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _vllm_probes(host: str, target: ProbeTarget, client: httpx.Client,
                 api_key: str | None = None, quick: bool = False) -> list[ProbeResult]:
    result = _Results(host, target.deployment)
    unit = f"vllm@{target.deployment}"
    logs = f"on {host}: systemctl status {unit}; journalctl -u {unit} -n 100"
    url = target.base_url
    out: list[ProbeResult] = []
    if target.api_key_var:
        if api_key is None:
            out.append(result("api_key", False,
                              f"no secret '{target.api_key_var}' in the fleet's secrets file"
                              + _keyless(client, f"{url}/v1/models"),
                              f"add {target.api_key_var} to the secrets file (ansible-vault "
                              "edit FILE) and give --vault-password-file"))
            return out
        client.headers["Authorization"] = f"Bearer {api_key}"
    try:
        health = client.get(f"{url}/health")
    except httpx.HTTPError as exc:
        out.append(result("health", False, f"GET {url}/health: {type(exc).__name__}: {exc}",
                          f"the service does not answer; {logs}"))
        return out
    result.saw(health)
    out.append(result("health", health.status_code == 200,
                      f"GET {url}/health -> {health.status_code}",
                      f"vLLM is up but unhealthy; {logs}"))
    if health.status_code != 200:
        return out

    try:
        models = client.get(f"{url}/v1/models")
        if models.status_code == 401:
            out.append(result("models", False, f"GET {url}/v1/models -> 401",
                              "the API refused the key: "
                              + (f"the secret '{target.api_key_var}' differs from the key "
                                 f"in /etc/vllm/{target.deployment}.env on {host}; rerun the "
                                 "services stage" if target.api_key_var else
                                 "the service wants an API key the fleet does not give "
                                 "(set api_key_var on the deployment)")))
            return out
        ids = [m.get("id") for m in models.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        out.append(result("models", False, f"GET {url}/v1/models: {exc}",
                          f"the API did not return a model list; {logs}"))
        return out
    served = target.served_model_name in ids
    # Probed, so reachable beyond the host's loopback: without a key, open to anyone.
    keyless = not target.api_key_var and models.status_code == 200
    out.append(result("models", served and (target.open or not keyless),
                      f"GET {url}/v1/models -> {models.status_code} {ids}"
                      + (_OPEN_EVIDENCE.format(url=url, why=_why(target)) if keyless else ""),
                      f"expected '{target.served_model_name}' to be served; check "
                      f"--served-model-name in `systemctl cat {unit}` on {host}" if not served
                      else _OPEN_FIX))
    if target.api_key_var:
        out.append(_api_key_probe(url, client, result, unit, host))
    if quick:
        return out

    body = {"model": target.served_model_name, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": CHAT_PROMPT}]}
    request = f"POST {url}/v1/chat/completions {json.dumps(body)}"
    try:
        chat = client.post(f"{url}/v1/chat/completions", json=body)
        choice = chat.json()["choices"][0]
        content = choice["message"]["content"] or ""
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        out.append(result("chat", False, f"{request}: {type(exc).__name__}: {exc}",
                          f"a chat completion failed; {logs}"))
        return out
    out.append(result(
        "chat", chat.status_code == 200 and bool(content.strip()),
        f"{request} -> {chat.status_code}, finish_reason={choice.get('finish_reason')}, "
        f"answer={_short(content)!r}",
        f"the model answered nothing; {logs}"))
    out.append(_stream_probe(url, body, client, result, logs))
    if target.tool_calling:
        out.append(_tool_probe(url, target, client, result, logs))
    return out


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}}}}}


def _tool_probe(url: str, target: ProbeTarget, client: httpx.Client,
                result: _Results, logs: str) -> ProbeResult:
    """Tool calling as the deployment enables it: `tool_choice: auto` is accepted (vLLM
    answers 400 without --enable-auto-tool-choice), and `required` returns a well-formed
    call of the offered function. The call is the model's work (vLLM 0.32's CPU build was
    seen not to constrain its arguments): it is judged for catalog models only."""
    body = {"model": target.served_model_name, "temperature": 0, "max_tokens": 64,
            "tools": [TOOL],
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    request = f"POST {url}/v1/chat/completions with tools"
    try:
        auto = client.post(f"{url}/v1/chat/completions", json={**body, "tool_choice": "auto"})
        required = client.post(f"{url}/v1/chat/completions",
                               json={**body, "tool_choice": "required"})
        message = required.json()["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        arguments = json.loads(calls[0]["function"]["arguments"]) if calls else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        return result("tool_call", False, f"{request}: {type(exc).__name__}: {exc}",
                      f"the tool-calling request failed; {logs}")
    name = calls[0]["function"]["name"] if calls else None
    accepted = auto.status_code == 200 and required.status_code == 200
    called = (name == "get_weather" and isinstance(arguments, dict)
              and arguments.get("city") in ("Paris", "Tokyo"))
    evidence = (f"{request}: tool_choice=auto -> {auto.status_code}"
                + (f" {_short(auto.text)}" if auto.status_code != 200 else "")
                + f"; tool_choice=required -> {required.status_code}, "
                + (f"call {name}({json.dumps(arguments)})" if calls
                   else f"no call parsed from {_short(message.get('content') or '')!r}"))
    if not target.tool_call_judged:
        evidence += (f"; the call is not judged: {target.served_model_name} is not a catalog "
                     "model")
    return result("tool_call", accepted and (called or not target.tool_call_judged),
                  evidence,
                  "tool calling is not served as planned: check --enable-auto-tool-choice "
                  f"and --tool-call-parser in the unit's command line; {logs}")


_OPEN_EVIDENCE = "; answered with no API key: OPEN to anyone who reaches {url} ({why})"
_OPEN_FIX = ("give the deployment an api_key_var or bind it to loopback, or set options.open: "
             "true if it is meant to be open")


def _why(target: ProbeTarget) -> str:
    return "options.open" if target.open else "not planned open"


def _keyless(client: httpx.Client, url: str) -> str:
    """What `url` answers without a key: evidence when the key could not be sent."""
    request = client.build_request("GET", url)
    request.headers.pop("Authorization", None)
    try:
        status = client.send(request).status_code
    except httpx.HTTPError as exc:
        return f"; GET {url} without a key: {type(exc).__name__}"
    return f"; GET {url} without a key -> {status}" + (": the API is OPEN" if status == 200
                                                       else "")


def _api_key_probe(url: str, client: httpx.Client, result: _Results,
                   unit: str, host: str) -> ProbeResult:
    """The API refuses a request without the key and one with a wrong key."""
    statuses: dict[str, int | str] = {}
    for label, wrong in (("no key", None), ("wrong key", "Bearer wrong")):
        request = client.build_request("GET", f"{url}/v1/models")
        del request.headers["Authorization"]
        if wrong:
            request.headers["Authorization"] = wrong
        try:
            statuses[label] = client.send(request).status_code
        except httpx.HTTPError as exc:
            statuses[label] = type(exc).__name__
    enforced = all(code == 401 for code in statuses.values())
    return result("api_key", enforced,
                  "GET /v1/models " + ", ".join(f"{k} -> {v}" for k, v in statuses.items())
                  + ", with the key -> 200",
                  f"the API answers without the right key: check VLLM_API_KEY in "
                  f"/etc/vllm/{unit.split('@', 1)[1]}.env on {host} and `systemctl restart {unit}`")


def _stream_probe(url: str, body: dict[str, object], client: httpx.Client,
                  result: _Results, logs: str) -> ProbeResult:
    """A streamed chat completion, its server-sent events read to the final [DONE]."""
    request = f"POST {url}/v1/chat/completions (stream)"
    pieces: list[str] = []
    finish = None
    done = False
    try:
        with client.stream("POST", f"{url}/v1/chat/completions",
                           json={**body, "stream": True}) as response:
            status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                for choice in json.loads(data).get("choices", []):
                    pieces.append((choice.get("delta") or {}).get("content") or "")
                    finish = choice.get("finish_reason") or finish
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return result("chat_stream", False, f"{request}: {type(exc).__name__}: {exc}",
                      f"streaming broke off; {logs}")
    answer = "".join(pieces)
    return result("chat_stream", status == 200 and done and bool(answer.strip()),
                  f"{request} -> {status}, {len(pieces)} chunks, finish_reason={finish}, "
                  f"[DONE] {'seen' if done else 'missing'}, answer={_short(answer)!r}",
                  f"the stream did not end properly; {logs}")


def _ollama_probes(host: str, target: ProbeTarget, client: httpx.Client,
                   quick: bool = False) -> list[ProbeResult]:
    result = _Results(host, target.deployment)
    logs = f"on {host}: systemctl status ollama; journalctl -u ollama -n 100"
    url, model = target.base_url, target.served_model_name
    out: list[ProbeResult] = []
    try:
        version = client.get(f"{url}/api/version")
        result.saw(version)
        note = (f" (Server: {version.headers.get('server')}: the Ollama STAND-IN, not the "
                "real Ollama; it runs no model)" if result.standin else "")
        out.append(result("version", version.status_code == 200,
                          f"GET {url}/api/version -> {version.status_code} "
                          f"{_short(version.text)}{note}",
                          f"Ollama is up but unhealthy; {logs}"))
        tags = client.get(f"{url}/api/tags")
        names = [m.get("name") for m in tags.json().get("models", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        out.append(result("version" if not out else "tags", False,
                          f"GET {url}/api/...: {type(exc).__name__}: {exc}",
                          f"Ollama does not answer; {logs}"))
        return out
    listed = model in names or f"{model}:latest" in names
    # Ollama has no authentication: answering here, off loopback, it is open to anyone.
    keyless = tags.status_code == 200
    out.append(result("tags", listed and (target.open or not keyless),
                      f"GET {url}/api/tags -> {tags.status_code} {names}"
                      + (_OPEN_EVIDENCE.format(url=url, why=_why(target)) if keyless else ""),
                      f"'{model}' is not in Ollama's models: rerun the services stage, or "
                      f"`ollama pull {model}` on {host}" if not listed
                      else "bind Ollama to loopback (its default), or set options.open: true "
                           "if it is meant to be open"))
    if quick or not listed:
        return out
    options = {"temperature": 0, "num_predict": 16}
    for probe, path, body in (
            ("generate", "/api/generate", {"prompt": CHAT_PROMPT}),
            ("chat", "/api/chat", {"messages": [{"role": "user", "content": CHAT_PROMPT}]})):
        request = f"POST {url}{path} {json.dumps({'model': model, **body})}"
        try:
            answer = client.post(f"{url}{path}", json={"model": model, "stream": False,
                                                       "options": options, **body})
            data = answer.json()
            raw = ((data.get("message") or {}).get("content") if probe == "chat"
                   else data.get("response"))
            text = raw if isinstance(raw, str) else ""
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            out.append(result(f"ollama_{probe}", False, f"{request}: {type(exc).__name__}: "
                              f"{exc}", f"Ollama failed to answer; {logs}"))
            continue
        out.append(result(
            f"ollama_{probe}", answer.status_code == 200 and bool(text.strip())
            and data.get("done") is True,
            f"{request} -> {answer.status_code}, done={data.get('done')}, "
            f"done_reason={data.get('done_reason')}, answer={_short(text)!r}",
            f"the model answered nothing; {logs}"))
    return out


def probe_plan(plan: Plan, *, timeout: float = 60.0, workers: int = 16,
               client_factory: Callable[[], httpx.Client] | None = None,
               secrets: Mapping[str, str] | None = None, quick: bool = False) -> ProbeReport:
    """Probe every deployment of every host of `plan` in parallel; `secrets` holds the API
    keys by their api_key_var names. `quick`: only whether each one answers and serves its
    model (vLLM /health and /v1/models, Ollama /api/version and /api/tags), no completion."""
    def make_client() -> httpx.Client:
        return client_factory() if client_factory else httpx.Client(timeout=timeout)

    # A loopback-bound service is checked on its host by the services stage, not from here.
    jobs = [(h.name, t) for h in plan.hosts for t in h.probes if not t.loopback_only]

    def run(job: tuple[str, ProbeTarget]) -> list[ProbeResult]:
        host, target = job
        with make_client() as client:
            if target.engine == "ollama":
                return _ollama_probes(host, target, client, quick)
            key = (secrets or {}).get(target.api_key_var) if target.api_key_var else None
            return _vllm_probes(host, target, client, key, quick)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        results = [r for rs in pool.map(run, jobs) for r in rs]
    return ProbeReport(group=plan.group, results=results)
