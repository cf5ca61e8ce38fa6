"""Verification probes run from the control machine, in parallel, each bounded by a timeout.

Each probe answers one question with pass or fail, the evidence (what was asked,
what came back) and, on failure, what the operator should do next.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from pydantic import BaseModel, ConfigDict

from orchestrator.plan import Plan, ProbeTarget

CHAT_PROMPT = "Say hello in one short sentence."


class ProbeResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    deployment: str
    probe: str
    passed: bool
    evidence: str
    next_step: str | None = None


class ProbeReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    results: list[ProbeResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failed_hosts(self) -> list[str]:
        return sorted({r.host for r in self.results if not r.passed})


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _vllm_probes(host: str, target: ProbeTarget, client: httpx.Client) -> list[ProbeResult]:
    def result(probe: str, passed: bool, evidence: str,
               next_step: str | None = None) -> ProbeResult:
        return ProbeResult(host=host, deployment=target.deployment, probe=probe, passed=passed,
                           evidence=evidence, next_step=None if passed else next_step)

    unit = f"vllm@{target.deployment}"
    logs = f"on {host}: systemctl status {unit}; journalctl -u {unit} -n 100"
    url = target.base_url
    out: list[ProbeResult] = []
    try:
        health = client.get(f"{url}/health")
    except httpx.HTTPError as exc:
        out.append(result("health", False, f"GET {url}/health: {type(exc).__name__}: {exc}",
                          f"the service does not answer; {logs}"))
        return out
    out.append(result("health", health.status_code == 200,
                      f"GET {url}/health -> {health.status_code}",
                      f"vLLM is up but unhealthy; {logs}"))
    if health.status_code != 200:
        return out

    try:
        models = client.get(f"{url}/v1/models")
        ids = [m.get("id") for m in models.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        out.append(result("models", False, f"GET {url}/v1/models: {exc}",
                          f"the API did not return a model list; {logs}"))
        return out
    out.append(result("models", target.served_model_name in ids,
                      f"GET {url}/v1/models -> {models.status_code} {ids}",
                      f"expected '{target.served_model_name}' to be served; check "
                      f"--served-model-name in `systemctl cat {unit}` on {host}"))

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
    return out


def _stream_probe(url: str, body: dict[str, object], client: httpx.Client,
                  result: Callable[..., ProbeResult], logs: str) -> ProbeResult:
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


def probe_plan(plan: Plan, *, timeout: float = 60.0, workers: int = 16,
               client_factory: Callable[[], httpx.Client] | None = None) -> ProbeReport:
    """Probe every deployment of every host of `plan` in parallel."""
    def make_client() -> httpx.Client:
        return client_factory() if client_factory else httpx.Client(timeout=timeout)

    jobs = [(h.name, t) for h in plan.hosts for t in h.probes]

    def run(job: tuple[str, ProbeTarget]) -> list[ProbeResult]:
        host, target = job
        with make_client() as client:
            return _vllm_probes(host, target, client)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        results = [r for rs in pool.map(run, jobs) for r in rs]
    return ProbeReport(group=plan.group, results=results)
