"""The load generator, its statistics and the HTML report.

Servers here are stand-ins on loopback: `StandIn` answers as vLLM's OpenAI server
(server-sent events, shapes taken from the sandbox's real vLLM) and Ollama's
/api/chat (NDJSON, shapes from Ollama's API documentation) do, with failure modes
switched on per test. The real vLLM is benchmarked in the sandbox. The project's
own trivial endpoint (tests/doubles/bench_endpoint.py) is exercised too, for
function only: its timing is measured by scripts/bench-overhead.py, not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import test_sandbox_ollama
from doubles import bench_endpoint
from rich.console import Console

from orchestrator.errors import ConfigError
from orchestrator.plan.planner import HostPlan, Plan, ProbeTarget
from orchestrator.report import console as report_console
from orchestrator.report import htmlreport
from orchestrator.verify import bench
from orchestrator.verify.benchstats import RequestSample, distribution, percentile, summarize
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult, probe_plan

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
REPO = Path(__file__).resolve().parents[2]

# The sandbox's Ollama stand-in (orchestrator/sandbox/ollama_standin.py) served from a
# subprocess with the sandbox's model pulled, as test_sandbox_ollama runs it; its base URL.
standin = test_sandbox_ollama.standin
STANDIN_MODEL = "qwen2.5:0.5b"


# --- statistics ---------------------------------------------------------------------------

def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    hundred = [float(v) for v in range(1, 101)]
    assert percentile(hundred, 95) == pytest.approx(95.05)  # numpy.percentile gives the same
    assert percentile(hundred, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_no_values_and_bad_ranks() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_distribution_in_milliseconds_and_empty() -> None:
    d = distribution([0.010, 0.020, 0.030])
    assert (d.count, d.mean, d.p50) == (3, pytest.approx(20.0), pytest.approx(20.0))
    assert distribution([]).model_dump() == {"count": 0, "mean": None, "p50": None,
                                             "p95": None, "p99": None}


def test_summarize_known_samples() -> None:
    samples = [
        # sent at 10.0; text at 10.1, 10.3, 10.4; server said 3 tokens
        RequestSample(start=10.0, end=10.5, chunk_times=[10.1, 10.3, 10.4], output_tokens=3,
                      prompt_tokens=40),
        # no usage: 2 chunks count as 2 tokens
        RequestSample(start=10.0, end=11.0, chunk_times=[10.2, 10.6]),
        RequestSample(start=10.5, end=12.0, error="HTTP 500: boom"),
        RequestSample(start=10.6, end=10.7, error="HTTP 500: boom"),
        RequestSample(start=10.7, end=10.8, error="timeout"),
    ]
    s = summarize(4, samples, started=10.0)
    assert (s.concurrency, s.requests, s.ok, s.errors) == (4, 5, 2, 3)
    assert s.error_messages == ["HTTP 500: boom", "timeout"]
    assert s.duration_s == pytest.approx(2.0)  # to the end of the last request, failed or not
    assert s.requests_per_s == pytest.approx(1.0)
    assert (s.output_tokens, s.output_tokens_per_s) == (5, pytest.approx(2.5))
    assert s.tokens_from == "mixed"
    assert s.prompt_tokens_mean == 40
    assert s.ttft_ms.count == 2 and s.ttft_ms.p50 == pytest.approx(150.0)
    # ITL pooled over requests: 200, 100 and 400 ms
    assert s.itl_ms.count == 3 and s.itl_ms.p50 == pytest.approx(200.0)
    assert s.itl_ms.mean == pytest.approx(700 / 3)
    assert s.latency_ms.p50 == pytest.approx(750.0)


def test_summarize_without_successes() -> None:
    s = summarize(1, [RequestSample(start=0.0, end=1.0, error="refused")], started=0.0)
    assert (s.ok, s.output_tokens, s.output_tokens_per_s, s.tokens_from) == (0, 0, 0.0, "none")
    assert s.ttft_ms.p50 is None and s.prompt_tokens_mean is None


# --- prompts, requests and stream parsing ----------------------------------------------------

def test_prompts_are_deterministic_distinct_and_sized() -> None:
    assert bench.synthetic_prompt(3, 50) == bench.synthetic_prompt(3, 50)
    assert bench.synthetic_prompt(3, 50) != bench.synthetic_prompt(4, 50)
    assert len(bench.synthetic_prompt(3, 50).split()) == 50


def test_request_bodies_per_protocol() -> None:
    path, body = bench.request_for("openai", "m", "hi", 64)
    assert path == "/v1/chat/completions"
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (64, 64, True)
    path, body = bench.request_for("ollama", "qwen2.5:7b", "hi", 64)
    assert path == "/api/chat"
    assert body["options"] == {"num_predict": 64, "temperature": 0} and body["stream"] is True


def test_sse_parser_counts_text_chunks_and_reads_usage() -> None:
    p = bench.SseParser()
    lines = [b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}', b"",
             b": keep-alive comment",
             b'data: {"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}',
             b'data: {"choices":[{"delta":{"content":" there"},"finish_reason":"length"}]}',
             b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2}}',
             b"data: [DONE]"]
    for t, line in enumerate(lines):
        p.feed(line, float(t))
    assert p.chunk_times == [3.0, 4.0]
    assert (p.output_tokens, p.prompt_tokens, p.done, p.error) == (2, 12, True, None)


def test_sse_parser_reports_an_error_event() -> None:
    p = bench.SseParser()
    p.feed(b'data: {"error": {"message": "model overloaded", "code": 503}}', 0.0)
    assert p.error == "error in stream: model overloaded" and not p.done


def test_ndjson_parser_reads_ollama_counts() -> None:
    p = bench.NdjsonParser()
    p.feed(b'{"message":{"role":"assistant","content":"Hi"},"done":false}', 1.0)
    p.feed(b'{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
           b'"prompt_eval_count":9,"eval_count":4}', 2.0)
    assert (p.chunk_times, p.output_tokens, p.prompt_tokens, p.done) == ([1.0], 4, 9, True)
    q = bench.NdjsonParser()
    q.feed(b'{"error":"model \\"x\\" not found"}', 0.0)
    assert q.error == 'error in stream: model "x" not found'


# --- against stand-in servers on loopback ----------------------------------------------------

class StandIn:
    """A stand-in for vLLM's OpenAI server and Ollama's /api/chat, with switchable faults."""

    def __init__(self, *, usage: bool = True, fail_every: int = 0, no_done: bool = False,
                 error_event: bool = False, first_token_delay: float = 0.0,
                 hold_until: int = 0) -> None:
        self.usage = usage
        self.fail_every = fail_every
        self.no_done = no_done
        self.error_event = error_event
        self.first_token_delay = first_token_delay
        # Hold each streamed request until this many are in flight at once: proves that the
        # load generator keeps `concurrency` requests open (or the test fails on a timeout).
        self.gate = threading.Barrier(hold_until) if hold_until else None
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: set[str | None] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, b"")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"data": [{"id": "m"}]}).encode())
                else:
                    self._send(404, b"")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not body.get("stream"):  # the probes' plain chat completion
                    self._send(200, json.dumps({"choices": [{
                        "message": {"content": "hello"}, "finish_reason": "stop"}]}).encode())
                    return
                with stand_in.lock:
                    stand_in.bodies.append(body)
                    stand_in.authorizations.add(self.headers.get("Authorization"))
                    number = len(stand_in.bodies)
                    stand_in.in_flight += 1
                    stand_in.max_in_flight = max(stand_in.max_in_flight, stand_in.in_flight)
                try:
                    if stand_in.gate:
                        stand_in.gate.wait(timeout=10)
                    if stand_in.fail_every and number % stand_in.fail_every == 0:
                        self._send(500, b'{"error": "injected failure"}')
                    elif self.path == "/api/chat":
                        self._stream(stand_in.ollama(body["options"]["num_predict"]))
                    else:
                        self._stream(stand_in.sse(body))
                finally:
                    with stand_in.lock:
                        stand_in.in_flight -= 1

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, events: list[bytes]) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                time.sleep(stand_in.first_token_delay)
                for event in events:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.write(b"0\r\n\r\n")

        return Handler

    def sse(self, body: dict[str, Any]) -> list[bytes]:
        tokens = body["max_tokens"]
        events = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}]
        events += [{"choices": [{"delta": {"content": f" w{i}"}, "finish_reason": None}]}
                   for i in range(tokens)]
        if self.error_event:
            events.append({"error": {"message": "engine died", "code": 500}})
        if self.usage and body.get("stream_options", {}).get("include_usage"):
            events.append({"choices": [], "usage": {"prompt_tokens": 30,
                                                    "completion_tokens": tokens}})
        out = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
        return out if self.no_done else [*out, b"data: [DONE]\n\n"]

    def ollama(self, tokens: int) -> list[bytes]:
        # Ollama has no ignore-EOS: this one stops after half the tokens, as a model may.
        said = max(1, tokens // 2)
        lines = [{"model": "m", "message": {"role": "assistant", "content": f" w{i}"},
                  "done": False} for i in range(said)]
        lines.append({"model": "m", "message": {"role": "assistant", "content": ""},
                      "done": True, "done_reason": "stop", "prompt_eval_count": 25,
                      "eval_count": said})
        return [json.dumps(line).encode() + b"\n" for line in lines]


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(stand_in: StandIn) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), stand_in.handler())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def workload(concurrency: list[int], requests: int, output_tokens: int = 8) -> bench.Workload:
    return bench.Workload(concurrency=concurrency, requests=requests, warmup=1, input_tokens=20,
                          output_tokens=output_tokens, timeout_s=10)


def target(url: str, engine: str = "vllm") -> ProbeTarget:
    return ProbeTarget(deployment="d", engine=engine, base_url=url, served_model_name="m")


def test_vllm_stand_in_measured_with_usage_and_warmup_excluded(serve) -> None:
    stand_in = StandIn(first_token_delay=0.05)
    result = bench.bench_target("h", target(serve(stand_in)), workload([1, 2], 6))
    assert result.protocol == "openai" and result.skipped is None and result.errors == 0
    one, two = result.levels
    assert (one.concurrency, one.requests, one.ok, two.requests, two.ok) == (1, 6, 6, 6, 6)
    assert len(stand_in.bodies) == 6 + 1 + 6 + 2  # measured plus one warm-up per worker
    assert (one.tokens_from, one.output_tokens, one.prompt_tokens_mean) == ("usage", 48, 30.0)
    # The stand-in waits 50 ms before any token, so no TTFT can be shorter.
    assert one.ttft_ms.p50 is not None and one.ttft_ms.p50 >= 50
    assert one.itl_ms.count == 6 * 7  # 8 tokens, 7 gaps, per request
    assert one.latency_ms.p50 is not None and one.latency_ms.p50 >= one.ttft_ms.p50
    sent = stand_in.bodies[-1]
    assert (sent["ignore_eos"], sent["min_tokens"], sent["max_tokens"]) == (True, 8, 8)
    prompts = [b["messages"][0]["content"] for b in stand_in.bodies]
    assert len(set(prompts)) == len(prompts)  # no prefix-cache hits between requests


def test_workers_keep_concurrency_requests_in_flight(serve) -> None:
    stand_in = StandIn(hold_until=4)
    level = bench.run_level(serve(stand_in), "openai", "m", workload([4], 8), 4)
    assert level.errors == 0 and stand_in.max_in_flight == 4


def test_without_usage_tokens_are_counted_chunks(serve) -> None:
    level = bench.run_level(serve(StandIn(usage=False)), "openai", "m", workload([2], 4), 2)
    assert (level.tokens_from, level.output_tokens, level.prompt_tokens_mean) == (
        "chunks", 32, None)


def test_errors_are_counted_with_their_first_messages(serve) -> None:
    level = bench.run_level(serve(StandIn(fail_every=3)), "openai", "m", workload([1], 9), 1)
    # Of the 10 requests sent (the first a warm-up), numbers 3, 6 and 9 fail.
    assert (level.ok, level.errors) == (6, 3)
    assert level.error_messages == ['HTTP 500: {"error": "injected failure"}']


def test_stream_without_done_or_with_error_event_fails(serve) -> None:
    cut = bench.run_level(serve(StandIn(no_done=True)), "openai", "m", workload([1], 2), 1)
    assert cut.errors == 2
    assert cut.error_messages == ["stream ended without its final `data: [DONE]`"]
    died = bench.run_level(serve(StandIn(error_event=True)), "openai", "m", workload([1], 2), 1)
    assert died.error_messages == ["error in stream: engine died"]


def test_refused_connection_is_an_error_not_a_crash() -> None:
    level = bench.run_level("http://127.0.0.1:9", "openai", "m", workload([2], 2), 2)
    assert level.errors == 2 and "ConnectionRefusedError" in level.error_messages[0]


def test_ollama_stand_in_uses_native_chat_and_eval_count(serve) -> None:
    stand_in = StandIn()
    result = bench.bench_target("h", target(serve(stand_in), "ollama"), workload([1], 3))
    assert result.protocol == "ollama" and result.errors == 0
    [level] = result.levels
    assert (level.tokens_from, level.output_tokens, level.prompt_tokens_mean) == (
        "usage", 12, 25.0)  # stopped at 4 of 8 tokens: throughput counts what came
    assert stand_in.bodies[0]["options"]["num_predict"] == 8


def test_same_prompts_for_every_engine(serve) -> None:
    vllm, ollama = StandIn(), StandIn()
    bench.bench_target("h", target(serve(vllm)), workload([1, 2], 4))
    bench.bench_target("h", target(serve(ollama), "ollama"), workload([1, 2], 4))
    # Workers race, so the order of arrival may differ; the prompts may not.
    assert (sorted(b["messages"][0]["content"] for b in vllm.bodies)
            == sorted(b["messages"][0]["content"] for b in ollama.bodies))


@pytest.fixture
def endpoint() -> Iterator[str]:
    """The project's trivial endpoint (tests/doubles/bench_endpoint.py) on loopback: it
    answers both protocols and sends no Server header, as the real Ollama does not; its
    base URL."""
    ports: list[int] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    def main() -> None:
        task = loop.create_task(bench_endpoint.serve(0, lambda p: (ports.append(p),
                                                                   ready.set())))
        with contextlib.suppress(asyncio.CancelledError):  # how the fixture stops it
            loop.run_until_complete(task)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{ports[0]}"
    finally:
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        thread.join(10)


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
def test_trivial_endpoint_serves_both_protocols(endpoint: str,
                                                protocol: bench.Protocol) -> None:
    level = bench.run_level(endpoint, protocol, "m", workload([4], 20, output_tokens=32), 4)
    assert (level.ok, level.output_tokens, level.tokens_from) == (20, 640, "usage")
    assert level.servers == []


def test_overhead_script_runs_both_protocols() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench-overhead.py"),
                           "--concurrency", "1,2", "--requests", "20", "--output-tokens", "8"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.startswith(("openai ", "ollama "))]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        (p, c, "0") for p in ("openai", "ollama") for c in ("1", "2")]  # no errors
    assert "ceiling (openai):" in proc.stdout and "ceiling (ollama):" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "bench-overhead.py"),
                          "--concurrency", "x"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--concurrency: expected" in bad.stderr


def test_unknown_engine_and_failed_probes_are_skipped(serve) -> None:
    stand_in = StandIn()
    url = serve(stand_in)
    plan = Plan(group="g", stages=["verify"], hosts=[HostPlan(
        name="h", group="g", profile="cpu", connection={}, vars={}, reasons=[],
        probes=[target(url), ProbeTarget(deployment="x", engine="tgi", base_url=url,
                                         served_model_name="m"),
                ProbeTarget(deployment="down", engine="vllm", base_url=url,
                            served_model_name="m")])])
    probes = ProbeReport(group="g", results=[
        ProbeResult(host="h", deployment="down", probe="health", passed=False, evidence="x")])
    report = bench.bench_plan(plan, workload([1], 2), probes)
    d, x, down = report.deployments
    assert stand_in.authorizations == {None}  # no api_key_var, no key
    assert d.skipped is None and len(d.levels) == 1
    assert x.skipped == "no benchmark protocol for engine 'tgi'"
    assert down.skipped == "its probes failed (health)"
    assert not report.passed


def test_api_key_from_the_secrets_goes_in_the_authorization_header(serve) -> None:
    stand_in = StandIn()
    keyed = target(serve(stand_in)).model_copy(update={"api_key_var": "vllm_key_d"})
    plan = Plan(group="g", stages=["verify"], hosts=[HostPlan(
        name="h", group="g", profile="cpu", connection={}, vars={}, reasons=[],
        probes=[keyed])])
    report = bench.bench_plan(plan, workload([1], 2), ProbeReport(group="g", results=[]),
                              secrets={"vllm_key_d": "s3cret"})
    assert report.passed
    assert stand_in.authorizations == {"Bearer s3cret"}
    assert "s3cret" not in report.model_dump_json()


# --- command-line input ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "requests"), [("a,b", 8), ("0", 8), ("", 8), ("1,,4", 8),
                                                ("2000", 4000)])
def test_bad_concurrency_names_the_option(text: str, requests: int) -> None:
    with pytest.raises(ConfigError, match=r"^--concurrency: expected comma-separated"):
        bench.make_workload(text, requests, 16, 16)


def test_workload_checks_requests_and_sizes() -> None:
    assert bench.make_workload("16,1,4,4", 16, 8, 8).concurrency == [1, 4, 16]
    with pytest.raises(ConfigError, match=r"^--requests: 8 is fewer than the highest"):
        bench.make_workload("1,16", 8, 8, 8)
    with pytest.raises(ConfigError, match=r"^--output-tokens: expected a positive"):
        bench.make_workload("1", 8, 8, 0)


def test_only_deployments_filters_and_rejects_unknown_names() -> None:
    plan = Plan(group="g", stages=["verify"], hosts=[
        HostPlan(name=h, group="g", profile="cpu", connection={}, vars={}, reasons=[],
                 probes=[target(f"http://{h}:1").model_copy(update={"deployment": d})
                         for d in deps])
        for h, deps in (("h1", ["a", "b"]), ("h2", ["b"]), ("h3", []))])
    only_a = bench.only_deployments(plan, ["a"])
    assert [(h.name, [t.deployment for t in h.probes]) for h in only_a.hosts] == [
        ("h1", ["a"])]
    assert bench.only_deployments(plan, None) == plan
    with pytest.raises(ConfigError, match=r"no deployment 'c' .* \(deployments: a, b\)"):
        bench.only_deployments(plan, ["c"])


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORCHESTRATE, *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=120)


def fleet(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "fleet.yml"
    path.write_text(f"""\
groups:
  g:
    profile: cpu
    hosts:
      h1: {{address: 127.0.0.1}}
deployments:
  - {{name: tiny, model: Qwen/Qwen2.5-0.5B-Instruct, served_model_name: m, engine: vllm,
     hosts: g, port: {port}, options: {{open: true}}}}
""")
    return path


# The other bad values are covered by make_workload's tests; this is the command's path.
@pytest.mark.parametrize("args", [["--concurrency", "a,b"], ["--deployment", "nosuch"]])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    proc = cli(tmp_path, "bench", "--hosts", "g", "-f", str(fleet(tmp_path, 8000)), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0
    assert args[0] in proc.stderr
    assert not (tmp_path / ".orchestrate").exists()


def test_cli_bench_probes_benchmarks_and_writes_the_run_dir(tmp_path: Path, serve) -> None:
    port = int(serve(StandIn()).rsplit(":", 1)[1])
    proc = cli(tmp_path, "bench", "--hosts", "g", "-f", str(fleet(tmp_path, port)),
               "--concurrency", "1,2", "--requests", "4", "--output-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["passed"] and out["probes"]["passed"] and out["bench"]["passed"]
    [dep] = out["bench"]["deployments"]
    assert [lv["concurrency"] for lv in dep["levels"]] == [1, 2]
    assert dep["levels"][0]["output_tokens"] == 20
    assert dep["standin"] is False  # http.server's own Server header names no stand-in
    assert dep["levels"][0]["servers"][0].startswith("BaseHTTP/")
    run_dir = Path(out["run_dir"])
    assert run_dir.parent == (tmp_path / ".orchestrate" / "runs").resolve()
    assert json.loads((run_dir / "bench.json").read_text()) == {
        k: v for k, v in out["bench"].items() if k != "passed"}
    assert {p.name for p in run_dir.iterdir()} == {"plan.json", "probes.json", "bench.json",
                                                   "report.html", "run.json"}
    recorded = json.loads((run_dir / "run.json").read_text())
    assert (recorded["command"], recorded["outcome"]) == ("bench", "passed")
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") == 3 and "h1" in html


def test_cli_probe_writes_an_html_report(tmp_path: Path, serve) -> None:
    port = int(serve(StandIn()).rsplit(":", 1)[1])
    # No sshd behind the fleet's host here: the HTTP probes alone.
    proc = cli(tmp_path, "probe", "--hosts", "g", "-f", str(fleet(tmp_path, port)), "--no-ssh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [html] = (tmp_path / ".orchestrate" / "runs").glob("*-probe/report.html")
    assert "All probes passed." in html.read_text()
    assert "report: " in proc.stdout


# --- HTML report -----------------------------------------------------------------------------

def test_nice_ceiling() -> None:
    assert [htmlreport.nice_ceiling(v) for v in (0, 0.7, 1, 1.2, 2.2, 3, 7, 10, 4100)] == [
        1, 1, 1, 2, 2.5, 5, 10, 10, 5000]


def test_line_chart_geometry() -> None:
    c = htmlreport.line_chart("t", "ms", [1, 4, 16], [("a", [20.0, None, 100.0])])
    left, top, right, bottom = c.plot
    [series] = c.series
    assert [(x, v) for x, _, v in series.points] == [(left + htmlreport.PAD, 20.0),
                                                     (right - htmlreport.PAD, 100.0)]
    assert series.points[1][1] == top  # 100 is the top of a 0..100 axis
    assert series.points[0][1] == pytest.approx(bottom - (bottom - top) / 5)
    assert [label for _, label in c.y_ticks] == ["0", "25", "50", "75", "100"]
    assert [label for _, label in c.x_ticks] == ["1", "4", "16"]


class _TagChecker(HTMLParser):
    """Every element that must be closed is closed, in order."""

    # HTML's void elements; SVG's empty ones self-close.
    VOID: ClassVar[set[str]] = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack.pop() == tag, f"unexpected </{tag}>"


def sample_report() -> tuple[Plan, ProbeReport, bench.BenchReport]:
    plan = Plan(group="g", stages=["verify"], hosts=[HostPlan(
        name="gpu-01", group="g", profile="gpu",
        connection={"ansible_host": "10.0.0.11", "ansible_port": 22, "ansible_user": "ubuntu"},
        vars={"vllm_deployments": [{"name": "qwen7b", "port": 8000,
                                    "args": ["--model", "/m", "--port", "8000"]}]},
        reasons=["profile gpu: vllm==0.32.0 <with> torch"],
        probes=[target("http://10.0.0.11:8000").model_copy(update={"deployment": "qwen7b"}),
                target("http://10.0.0.11:11434", "ollama").model_copy(
                    update={"deployment": "ollama7b"})])])
    probes = ProbeReport(group="g", results=[
        ProbeResult(host="gpu-01", deployment="qwen7b", probe="health", passed=True,
                    evidence="GET /health -> 200"),
        ProbeResult(host="gpu-01", deployment="ollama7b", probe="health", passed=False,
                    evidence="refused <oops>", next_step="journalctl -u ollama")])

    def samples(scale: float) -> list[RequestSample]:
        return [RequestSample(start=0.0, end=scale, chunk_times=[scale / 4, scale / 2],
                              output_tokens=2)]

    levels = [summarize(c, samples(0.1 * c), 0.0) for c in (1, 4, 16)]
    benched = bench.BenchReport(
        group="g", workload=workload([1, 4, 16], 16),
        deployments=[
            bench.DeploymentBench(host="gpu-01", deployment="qwen7b", engine="vllm",
                                  protocol="openai", base_url="http://10.0.0.11:8000",
                                  model="m", skipped=None, standin=False, levels=levels),
            bench.DeploymentBench(host="gpu-01", deployment="ollama7b", engine="ollama",
                                  protocol="ollama", base_url="http://10.0.0.11:11434",
                                  model="m", skipped="its probes failed (health)",
                                  standin=False, levels=[])])
    return plan, probes, benched


def test_html_report_is_well_formed_and_holds_the_numbers() -> None:
    plan, probes, benched = sample_report()
    html = htmlreport.render_report(command="bench", run_id="r1", plan=plan, probes=probes,
                                    bench=benched, now=dt.datetime(2026, 1, 2, 3, 4, 5))
    checker = _TagChecker()
    checker.feed(html)
    checker.close()
    assert checker.stack == []
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 3  # throughput, TTFT, ITL; no comparison with one benchmarked
    for svg in svgs:
        ET.fromstring(svg.replace('role="img"', 'role="img" xmlns="http://www.w3.org/2000/svg"'))
    # 2 tokens in 0.1 s at concurrency 1: 20.0 tokens/s; TTFT 25.0 ms; the skip reason
    assert ">20.0<" in html and "25.0 / 25.0 / 25.0" in html
    assert "Not benchmarked: its probes failed (health)" in html
    assert "refused &lt;oops&gt;" in html and "<oops>" not in html  # escaped
    assert "<code>vllm --model /m --port 8000</code>" in html
    assert "Probes failed on: gpu-01." in html


def test_html_report_compares_deployments_and_writes_the_file(tmp_path: Path) -> None:
    plan, probes, benched = sample_report()
    second = benched.deployments[0].model_copy(update={"deployment": "other"})
    both = benched.model_copy(update={"deployments": [benched.deployments[0], second]})
    path = htmlreport.write_report(tmp_path, command="bench", plan=plan, probes=probes,
                                   bench=both)
    html = path.read_text()
    assert path == tmp_path / "report.html"
    assert "Output throughput by deployment" in html
    assert "gpu-01/qwen7b (vllm)" in html and "gpu-01/other (vllm)" in html


# --- stand-ins: marked from what they answer, kept out of the comparison -----------------

def host_with(*targets: ProbeTarget) -> Plan:
    return Plan(group="g", stages=["verify"], hosts=[HostPlan(
        name="h", group="g", profile="cpu", connection={}, vars={}, reasons=[],
        probes=list(targets))])


def named(url: str, deployment: str, engine: str, model: str = "m") -> ProbeTarget:
    return ProbeTarget(deployment=deployment, engine=engine, base_url=url,
                       served_model_name=model)


def test_standin_is_marked_in_the_table_the_json_and_the_report(standin: str,
                                                                endpoint: str) -> None:
    real = named(endpoint, "tiny", "vllm")
    # Planned open, as the sandbox plans it: Ollama has no key, and this one answers the
    # control machine (the probes fail an Ollama reachable so unless it is planned open).
    fake = named(standin, "qwen-ollama", "ollama", STANDIN_MODEL).model_copy(
        update={"open": True})
    plan = host_with(real, fake)
    # The probes of the stand-in say what it is; the trivial endpoint has no /health,
    # so the real one is benchmarked without probe results here.
    probes = probe_plan(host_with(fake))
    assert probes.passed and all(r.standin for r in probes.results)
    result = bench.bench_plan(plan, workload([1, 2], 4), probes)
    assert result.passed

    console = Console(record=True, width=250)
    report_console.bench_table(result, console)
    report_console.probe_table(probes, console)
    text = console.export_text()
    rows = [line for line in text.splitlines() if "│ h " in line]
    assert [("STAND-IN" in row, "qwen-ollama" in row) for row in rows] == [
        (False, False), (False, False), (True, True), (True, True),  # bench: 2 levels each
        *[(True, True)] * 4]  # probes: version, tags, generate, chat
    assert "STAND-IN: h/qwen-ollama answered as a stand-in engine" in text

    dumped = json.loads(result.model_dump_json())
    assert [(d["deployment"], d["standin"]) for d in dumped["deployments"]] == [
        ("tiny", False), ("qwen-ollama", True)]
    assert all(lv["servers"] == [] for lv in dumped["deployments"][0]["levels"])
    assert all(lv["servers"][0].startswith("ollama-standin/")
               for lv in dumped["deployments"][1]["levels"])

    html = htmlreport.render_report(command="bench", run_id="r1", plan=plan, probes=probes,
                                    bench=result, now=dt.datetime(2026, 1, 2, 3, 4, 5))
    tiny, ollama = html.split("<h3>Benchmark: ")[1:]
    assert "STAND-IN" not in tiny
    assert ollama.startswith("qwen-ollama (ollama") and "STAND-IN" in ollama
    assert "A stand-in engine answered (Server: <code>ollama-standin/" in ollama
    # One real engine left: no comparison chart, and the page says why.
    assert "Output throughput by deployment" not in html
    assert ("Left out of the comparison: h/qwen-ollama (ollama), answered by a stand-in "
            "engine") in html
    assert "No engine comparison: vllm is the only real engine benchmarked." in html
    assert html.count('<td>qwen-ollama <span class="standin">STAND-IN</span></td>') == 4


def test_standin_known_from_the_benchmarks_answers_alone(standin: str) -> None:
    result = bench.bench_target("h", named(standin, "qwen-ollama", "ollama", STANDIN_MODEL),
                                workload([1], 2))
    assert result.standin and result.errors == 0


def test_standin_whose_probes_fail_is_skipped_and_still_marked(standin: str) -> None:
    plan = host_with(named(standin, "qwen-ollama", "ollama", "absent:1b"))
    probes = probe_plan(plan)
    assert [(r.probe, r.status, r.standin) for r in probes.results] == [
        ("version", "pass", True), ("tags", "fail", True)]
    [skipped] = bench.bench_plan(plan, workload([1], 2), probes).deployments
    assert skipped.skipped == "its probes failed (tags)" and skipped.standin


def test_comparison_plots_real_engines_only(standin: str, endpoint: str) -> None:
    plan = host_with(named(endpoint, "tiny", "vllm"), named(endpoint, "ollama-real", "ollama"),
                     named(standin, "qwen-ollama", "ollama", STANDIN_MODEL))
    result = bench.bench_plan(plan, workload([1, 2], 4), ProbeReport(group="g", results=[]))
    assert [d.standin for d in result.deployments] == [False, False, True]
    compared = htmlreport.comparison(result)
    assert compared.chart is not None
    assert compared.chart.title == "Output throughput by deployment"
    assert [s.name for s in compared.chart.series] == ["h/tiny (vllm)",
                                                       "h/ollama-real (ollama)"]
    assert compared.engines == ["ollama", "vllm"]
    assert compared.standins == ["h/qwen-ollama (ollama)"]
    assert compared.note is not None and "No engine comparison" not in compared.note

    html = htmlreport.render_report(command="bench", run_id="r1", plan=plan, probes=None,
                                    bench=result, now=dt.datetime(2026, 1, 2, 3, 4, 5))
    chart = re.findall(r"<svg.*?</svg>", html, flags=re.S)[0]
    assert "Output throughput by deployment" in chart
    assert "h/tiny (vllm)" in chart and "h/ollama-real (ollama)" in chart
    assert "qwen-ollama" not in chart


def test_two_real_deployments_of_one_engine_are_compared_as_such() -> None:
    _, _, benched = sample_report()
    first = benched.deployments[0]
    other = first.model_copy(update={"deployment": "other"})
    fake = first.model_copy(update={"deployment": "fake", "engine": "ollama", "standin": True})
    compared = htmlreport.comparison(benched.model_copy(update={
        "deployments": [first, other, fake]}))
    assert compared.chart is not None
    assert compared.chart.title == "Output throughput by deployment, vllm only"
    assert [s.name for s in compared.chart.series] == ["gpu-01/qwen7b (vllm)",
                                                       "gpu-01/other (vllm)"]
    assert compared.note is not None and compared.note.endswith(
        "No engine comparison: vllm is the only real engine benchmarked; the chart compares "
        "its deployments.")


def test_json_schema_document_names_every_field() -> None:
    doc = (REPO / "docs" / "bench.md").read_text()
    schema = bench.BenchReport.model_json_schema()
    fields = {name for model in [schema, *schema["$defs"].values()]
              for name in model.get("properties", {})}
    missing = sorted(f for f in fields if f"`{f}`" not in doc and f'"{f}"' not in doc)
    assert not missing, f"docs/bench.md does not describe: {missing}"
