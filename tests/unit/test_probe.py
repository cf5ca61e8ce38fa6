"""Probe logic against a stand-in for vLLM's OpenAI server (httpx.MockTransport).

The stand-in answers as vLLM does (shapes taken from the sandbox's real vLLM); the
real server is probed in the sandbox end-to-end test.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from orchestrator.plan import HostPlan, Plan, ProbeTarget
from orchestrator.probe import probe_plan

Handler = Callable[[httpx.Request], httpx.Response]


def plan_with(*hosts: str) -> Plan:
    return Plan(group="g", stages=["verify"], hosts=[
        HostPlan(name=h, group="g", profile="cpu", connection={}, vars={}, reasons=[],
                 probes=[ProbeTarget(deployment="d", engine="vllm", served_model_name="m",
                                     base_url=f"http://{h}:8000")]) for h in hosts])


def stand_in_vllm(*, healthy: bool = True, served: str = "m", content: str = "hello there",
                  stream_done: bool = True) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200 if healthy else 503)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": served}]})
        body = json.loads(request.content)
        if body.get("stream"):
            chunks = [{"choices": [{"delta": {"content": word}, "finish_reason": None}]}
                      for word in content.split(" ")]
            chunks[-1]["choices"][0]["finish_reason"] = "length"
            text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
            return httpx.Response(200, text=text + ("data: [DONE]\n\n" if stream_done else ""))
        return httpx.Response(200, json={"choices": [{"message": {"content": content},
                                                      "finish_reason": "length"}]})
    return handle


def run(handler: Handler, *hosts: str):
    return probe_plan(plan_with(*hosts), client_factory=lambda: httpx.Client(
        transport=httpx.MockTransport(handler)))


def test_healthy_server_passes_every_probe() -> None:
    report = run(stand_in_vllm(), "h1", "h2")
    assert report.passed
    assert [(r.host, r.probe) for r in report.results] == [
        (h, p) for h in ("h1", "h2") for p in ("health", "models", "chat", "chat_stream")]
    stream = report.results[3]
    assert "[DONE] seen" in stream.evidence and "answer='hellothere'" in stream.evidence


def test_unreachable_service_fails_with_a_next_step() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)
    report = run(refuse, "h1")
    [only] = report.results
    assert (only.probe, only.passed) == ("health", False)
    assert "ConnectError" in only.evidence
    assert "journalctl -u vllm@d" in (only.next_step or "")
    assert report.failed_hosts() == ["h1"]


def test_unhealthy_server_stops_after_health() -> None:
    [only] = run(stand_in_vllm(healthy=False), "h1").results
    assert not only.passed and "-> 503" in only.evidence


def test_wrong_served_model_name_fails_models() -> None:
    models = run(stand_in_vllm(served="other"), "h1").results[1]
    assert not models.passed and "--served-model-name" in (models.next_step or "")


def test_empty_answer_fails_chat() -> None:
    results = run(stand_in_vllm(content=" "), "h1").results
    assert [r.passed for r in results] == [True, True, False, False]


def test_stream_without_done_fails() -> None:
    stream = run(stand_in_vllm(stream_done=False), "h1").results[3]
    assert not stream.passed and "[DONE] missing" in stream.evidence
