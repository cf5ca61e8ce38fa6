"""Probe logic against a stand-in for vLLM's OpenAI server (httpx.MockTransport).

The stand-in answers as vLLM does (shapes taken from the sandbox's real vLLM); the
real server is probed in the sandbox end-to-end test.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import httpx
from rich.console import Console

from orchestrator.plan.planner import HostPlan, Plan, ProbeTarget
from orchestrator.report.console import probe_table
from orchestrator.verify.httpprobe import probe_plan

Handler = Callable[[httpx.Request], httpx.Response]


def plan_with(*hosts: str, open: bool = True) -> Plan:
    """vLLM `d` on each host, without an API key: open on purpose unless `open` is False."""
    return Plan(group="g", stages=["verify"], hosts=[
        HostPlan(name=h, group="g", profile="cpu", connection={}, vars={}, reasons=[],
                 probes=[ProbeTarget(deployment="d", engine="vllm", served_model_name="m",
                                     base_url=f"http://{h}:8000", open=open)])
        for h in hosts])


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


def run(handler: Handler, *hosts: str, open: bool = True, quick: bool = False):
    return probe_plan(plan_with(*hosts, open=open), quick=quick,
                      client_factory=lambda: httpx.Client(transport=httpx.MockTransport(handler)))


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


def keyed_plan() -> Plan:
    return Plan(group="g", stages=["verify"], hosts=[
        HostPlan(name="h", group="g", profile="cpu", connection={}, vars={}, reasons=[],
                 probes=[ProbeTarget(deployment="d", engine="vllm", served_model_name="m",
                                     base_url="http://h:8000", api_key_var="vault_key")])])


def keyed(handler: Handler, key: str, *, enforce: bool = True) -> Handler:
    """The stand-in behind vLLM's --api-key check: 401 on /v1/* without the right key."""
    def handle(request: httpx.Request) -> httpx.Response:
        wrong = request.headers.get("Authorization") != f"Bearer {key}"
        if enforce and wrong and request.url.path.startswith("/v1/"):
            return httpx.Response(401, json={"error": "Unauthorized"})
        return handler(request)
    return handle


def run_keyed(handler: Handler, secrets: dict[str, str]):
    return probe_plan(keyed_plan(), secrets=secrets, client_factory=lambda: httpx.Client(
        transport=httpx.MockTransport(handler)))


def test_api_key_sent_and_enforced() -> None:
    report = run_keyed(keyed(stand_in_vllm(), "s3cret"), {"vault_key": "s3cret"})
    assert report.passed, report.results
    key = next(r for r in report.results if r.probe == "api_key")
    assert key.evidence == ("GET /v1/models no key -> 401, wrong key -> 401, "
                            "with the key -> 200")
    assert all("s3cret" not in r.evidence for r in report.results)


def test_an_api_that_ignores_the_key_fails_the_api_key_probe() -> None:
    report = run_keyed(keyed(stand_in_vllm(), "s3cret", enforce=False), {"vault_key": "s3cret"})
    key = next(r for r in report.results if r.probe == "api_key")
    assert not key.passed and "no key -> 200" in key.evidence
    assert key.next_step and "/etc/vllm/d.env" in key.next_step


def test_a_missing_secret_is_reported_not_sent() -> None:
    report = run_keyed(keyed(stand_in_vllm(), "s3cret"), {})
    assert [(r.probe, r.passed) for r in report.results] == [("api_key", False)]
    assert "vault_key" in report.results[0].evidence


def test_a_wrong_key_in_the_secrets_fails_the_models_probe() -> None:
    report = run_keyed(keyed(stand_in_vllm(), "s3cret"), {"vault_key": "other"})
    models = next(r for r in report.results if r.probe == "models")
    assert not models.passed
    assert models.evidence.endswith("-> 401")
    assert models.next_step and "differs from the key" in models.next_step


def tools_plan(judged: bool = True) -> Plan:
    return Plan(group="g", stages=["verify"], hosts=[
        HostPlan(name="h", group="g", profile="cpu", connection={}, vars={}, reasons=[],
                 probes=[ProbeTarget(deployment="d", engine="vllm", served_model_name="m",
                                     base_url="http://h:8000", tool_calling=True,
                                     tool_call_judged=judged)])])


def with_tools(handler: Handler, *, auto_enabled: bool = True, garbled: bool = False
               ) -> Handler:
    """The stand-in's tool calling, shaped as vLLM answers (400 for auto without the flag)."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if "tools" not in body:
            return handler(request)
        if body["tool_choice"] == "auto" and not auto_enabled:
            return httpx.Response(400, json={"error": {"message": '"auto" tool choice requires '
                                                      '--enable-auto-tool-choice'}})
        if garbled:  # what vLLM 0.32 answered for the sandbox's random-weight model
            return httpx.Response(200, json={"choices": [{"message": {
                "content": '<tool_call>\n{"name": "get_weather", "arguments": {" said said',
                "tool_calls": []}, "finish_reason": "length"}]})
        call = {"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        return httpx.Response(200, json={"choices": [{"message": {
            "content": None, "tool_calls": [call] if body["tool_choice"] == "required" else []},
            "finish_reason": "tool_calls"}]})
    return handle


def run_tools(handler: Handler, judged: bool = True):
    return probe_plan(tools_plan(judged), client_factory=lambda: httpx.Client(
        transport=httpx.MockTransport(handler)))


def test_a_catalog_model_that_makes_no_call_fails() -> None:
    report = run_tools(with_tools(stand_in_vllm(), garbled=True))
    tool = next(r for r in report.results if r.probe == "tool_call")
    assert not tool.passed
    assert "no call parsed from '<tool_call>" in tool.evidence


def test_a_model_outside_the_catalog_is_held_to_the_server_taking_tools() -> None:
    taken = run_tools(with_tools(stand_in_vllm(), garbled=True), judged=False)
    tool = next(r for r in taken.results if r.probe == "tool_call")
    assert tool.passed and "the call is not judged: m is not a catalog model" in tool.evidence
    refused = run_tools(with_tools(stand_in_vllm(), auto_enabled=False, garbled=True),
                        judged=False)
    assert not next(r for r in refused.results if r.probe == "tool_call").passed


def test_tool_calling_probe() -> None:
    report = run_tools(with_tools(stand_in_vllm()))
    tool = next(r for r in report.results if r.probe == "tool_call")
    assert tool.passed, tool.evidence
    assert 'call get_weather({"city": "Paris"})' in tool.evidence


def test_tool_calling_without_the_flag_fails_with_the_servers_words() -> None:
    report = run_tools(with_tools(stand_in_vllm(), auto_enabled=False))
    tool = next(r for r in report.results if r.probe == "tool_call")
    assert not tool.passed
    assert "tool_choice=auto -> 400" in tool.evidence and "--enable-auto-tool-choice" in \
        tool.evidence


def ollama_plan(loopback: bool = False, open: bool = True) -> Plan:
    return Plan(group="g", stages=["verify"], hosts=[
        HostPlan(name="h", group="g", profile="cpu", connection={}, vars={}, reasons=[],
                 probes=[ProbeTarget(deployment="o", engine="ollama",
                                     served_model_name="qwen2.5:7b", base_url="http://h:11434",
                                     loopback_only=loopback, open=open)])])


def stand_in_ollama(*, models: tuple[str, ...] = ("qwen2.5:7b",)) -> Handler:
    """Ollama's API as its docs show it (docs/api.md): version, tags, generate, chat."""
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/version":
            return httpx.Response(200, json={"version": "0.32.7"})
        if request.url.path == "/api/tags":
            return httpx.Response(200, json={"models": [{"name": m} for m in models]})
        body = json.loads(request.content)
        assert body["stream"] is False and body["options"]["temperature"] == 0
        if request.url.path == "/api/generate":
            return httpx.Response(200, json={"response": "Hello!", "done": True,
                                             "done_reason": "stop"})
        return httpx.Response(200, json={"message": {"role": "assistant", "content": "Hi."},
                                         "done": True, "done_reason": "stop"})
    return handle


def test_ollama_probes() -> None:
    report = probe_plan(ollama_plan(), client_factory=lambda: httpx.Client(
        transport=httpx.MockTransport(stand_in_ollama())))
    assert [(r.probe, r.passed) for r in report.results] == [
        ("version", True), ("tags", True), ("ollama_generate", True), ("ollama_chat", True)]
    assert "answer='Hi.'" in report.results[3].evidence
    # Ollama sends no Server header: only the stand-in is called one.
    assert "STAND-IN" not in report.results[0].evidence


def test_ollama_without_the_model_says_how_to_get_it() -> None:
    report = probe_plan(ollama_plan(), client_factory=lambda: httpx.Client(
        transport=httpx.MockTransport(stand_in_ollama(models=()))))
    tags = report.results[-1]
    assert (tags.probe, tags.passed) == ("tags", False)
    assert tags.next_step and "ollama pull qwen2.5:7b" in tags.next_step


def test_a_loopback_only_ollama_is_not_probed_over_the_network() -> None:
    report = probe_plan(ollama_plan(loopback=True), client_factory=lambda: httpx.Client(
        transport=httpx.MockTransport(stand_in_ollama())))
    assert report.results == []


# --- exposure: an endpoint that answers without a key is flagged ------------------------


def test_an_open_endpoint_answering_without_a_key_is_flagged_in_its_evidence() -> None:
    models = run(stand_in_vllm(), "h1").results[1]
    assert models.passed and "OPEN to anyone who reaches http://h1:8000 (options.open)" in \
        models.evidence


def test_an_endpoint_beyond_loopback_answering_without_a_key_not_planned_open_fails() -> None:
    for quick in (False, True):
        models = run(stand_in_vllm(), "h1", open=False, quick=quick).results[1]
        assert (models.probe, models.passed) == ("models", False)
        assert "answered with no API key: OPEN" in models.evidence
        assert models.next_step and "api_key_var" in models.next_step


def test_a_planned_key_not_enforced_fails_quick_probes_too() -> None:
    report = probe_plan(keyed_plan(), secrets={"vault_key": "s3cret"}, quick=True,
                        client_factory=lambda: httpx.Client(transport=httpx.MockTransport(
                            keyed(stand_in_vllm(), "s3cret", enforce=False))))
    key = next(r for r in report.results if r.probe == "api_key")
    assert not key.passed and "no key -> 200" in key.evidence


def test_a_missing_secret_still_shows_whether_the_api_answers_without_a_key() -> None:
    for enforce, said in ((False, "without a key -> 200: the API is OPEN"),
                          (True, "without a key -> 401")):
        [result] = run_keyed(keyed(stand_in_vllm(), "s3cret", enforce=enforce), {}).results
        assert result.probe == "api_key" and not result.passed
        assert result.evidence.endswith(said)


def test_an_ollama_answering_beyond_loopback_is_flagged_and_fails_unless_open() -> None:
    def tags(open: bool):
        report = probe_plan(ollama_plan(open=open), client_factory=lambda: httpx.Client(
            transport=httpx.MockTransport(stand_in_ollama())))
        return next(r for r in report.results if r.probe == "tags")
    assert tags(True).passed and "OPEN to anyone" in tags(True).evidence
    assert not tags(False).passed and "not planned open" in tags(False).evidence


def test_probe_evidence_with_markup_is_printed_as_text() -> None:
    """A chat template's `[/INST]` in an answer made rich raise MarkupError."""
    report = run(stand_in_vllm(content="[/INST] [bold]hi"), "h1")
    assert any("[/INST]" in r.evidence for r in report.results)
    out = io.StringIO()
    probe_table(report, Console(file=out, width=300))
    assert "[/INST]" in out.getvalue()
