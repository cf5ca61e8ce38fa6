"""Load generator: streamed chat completions at fixed concurrency against each deployment.

Each concurrency level runs `concurrency` workers, each with its own keep-alive
connection, that send requests back to back until the level's `requests` are
sent (a closed loop: `concurrency` requests in flight until the last ones). Each worker
first sends `warmup` requests, which are not measured; the measured requests
start together once every worker has finished its warm-up.

Workers are threads with the standard library's http.client: against the trivial
endpoint of scripts/bench-overhead.py, httpx in threads cost 2.5 to 4 times more
CPU per request, and httpx.AsyncClient under asyncio 4 to 9 times more (numbers
in the README's "Benchmark" section).

Protocols, chosen by the deployment's engine:
- `openai` (vLLM): POST /v1/chat/completions with `stream: true`, server-sent
  events, `stream_options.include_usage` for the server's token count, and vLLM's
  `ignore_eos` and `min_tokens` so that every answer is `output_tokens` long.
- `ollama`: POST /api/chat streaming NDJSON; `options.num_predict` caps the
  answer, which may end earlier (Ollama has no ignore-EOS option): token counts
  come from its `eval_count`, so throughput stays right.

Both get the same deterministic prompts, so an Ollama and a vLLM deployment of
one model can be compared on equal terms. Deployments are benchmarked one after
another: two engines on one host share its GPU, and must not be measured at once.

A deployment that answers as a stand-in (its Server header says so, as the sandbox's
Ollama does) is benchmarked like any other and marked `standin`: its numbers measure the
stand-in's HTTP, not a model, and the report leaves it out of the engine comparison.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import ConfigError
from orchestrator.plan.planner import Plan, ProbeTarget
from orchestrator.verify.benchstats import LevelStats, RequestSample, summarize
from orchestrator.verify.httpprobe import ProbeReport, is_standin

Protocol = Literal["openai", "ollama"]
ENGINE_PROTOCOL: dict[str, Protocol] = {"vllm": "openai", "ollama": "ollama"}
MAX_CONCURRENCY = 1024  # one thread and one connection per request in flight

# Common English words: most are one token each (with the leading space) in large BPE
# vocabularies such as Qwen's; the server's own prompt_tokens count is reported beside.
_WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world",
    "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place",
    "case", "week", "company", "system", "program", "question", "work", "government", "number",
    "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month",
    "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind",
    "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end",
    "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea",
    "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door",
    "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason",
    "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "foot", "boy",
    "age", "policy", "music", "market", "sense", "nation", "plan", "college", "interest", "death",
    "experience", "effect", "use", "class", "control", "care", "field", "development", "role",
    "effort", "rate", "heart", "drug", "show", "leader", "light", "voice", "wife", "police",
    "mind", "price", "report", "decision", "son", "view", "relationship", "town",
)
_INSTRUCTION = "Write a long story that uses these words:"


class Workload(BaseModel):
    """What every deployment is asked, identically."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: list[int] = Field(description="the levels, in the order run")
    requests: int = Field(description="measured requests per level")
    warmup: int = Field(description="unmeasured requests per worker before each level")
    input_tokens: int = Field(description="words in each prompt (about one token each with "
                                          "Qwen's tokenizer; the chat template adds more)")
    output_tokens: int = Field(description="max_tokens (vLLM: exactly, with ignore_eos and "
                                           "min_tokens) / num_predict (Ollama: at most)")
    timeout_s: float = Field(description="longest wait for any read from the server, s")


class DeploymentBench(BaseModel):
    """One deployment's sweep over the levels, or why it was not run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    deployment: str
    engine: str
    protocol: Protocol | None = Field(description="null when the engine has none")
    base_url: str
    model: str = Field(description="the served model name requests ask for")
    skipped: str | None = Field(description="why it was not benchmarked, else null")
    standin: bool = Field(description="a stand-in engine answered (the Server header of its "
                                      "probes' or benchmark's answers says so): not a "
                                      "measurement of the real engine")
    levels: list[LevelStats]

    @property
    def errors(self) -> int:
        return sum(level.errors for level in self.levels)


class BenchReport(BaseModel):
    """`orchestrate bench`: the workload and one entry per deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    workload: Workload
    deployments: list[DeploymentBench]

    @property
    def passed(self) -> bool:
        """Every deployment ran and served every measured request."""
        return all(d.skipped is None and d.errors == 0 for d in self.deployments)


def synthetic_prompt(index: int, words: int) -> str:
    """Prompt `index` of `words` words: deterministic, and different for every index so
    that a server's prefix cache cannot answer it from an earlier request."""
    rng = random.Random(index)
    count = max(1, words - len(_INSTRUCTION.split()))
    return " ".join([_INSTRUCTION, *(rng.choice(_WORDS) for _ in range(count))])


def request_for(protocol: Protocol, model: str, prompt: str,
                output_tokens: int) -> tuple[str, dict[str, object]]:
    """The path and JSON body of one streamed chat request."""
    messages = [{"role": "user", "content": prompt}]
    if protocol == "ollama":
        return "/api/chat", {"model": model, "messages": messages, "stream": True,
                             "options": {"num_predict": output_tokens, "temperature": 0}}
    return "/v1/chat/completions", {
        "model": model, "messages": messages, "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": output_tokens,
        "temperature": 0, "ignore_eos": True, "min_tokens": output_tokens}


class StreamParser(ABC):
    """Reads one streamed answer line by line; records when text arrived and the counts."""

    end_marker = ""

    def __init__(self) -> None:
        self.chunk_times: list[float] = []
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.done = False
        self.error: str | None = None

    @abstractmethod
    def feed(self, line: bytes, now: float) -> None:
        """Take one line of the stream, received at `now`."""

    def _error(self, obj: dict[str, object]) -> bool:
        error = obj.get("error")
        if error is None:
            return False
        message = error.get("message") if isinstance(error, dict) else error
        self.error = f"error in stream: {_short(str(message))}"
        return True


class SseParser(StreamParser):
    """OpenAI-style server-sent events, as vLLM sends them."""

    end_marker = "data: [DONE]"

    def feed(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, event names
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        obj = json.loads(data)
        if self._error(obj):
            return
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                self.chunk_times.append(now)
        usage = obj.get("usage")
        if usage:
            self.output_tokens = usage.get("completion_tokens")
            self.prompt_tokens = usage.get("prompt_tokens")


class NdjsonParser(StreamParser):
    """Ollama's /api/chat stream: one JSON object a line, the last with `done: true`."""

    end_marker = '"done": true'

    def feed(self, line: bytes, now: float) -> None:
        if not line.strip():
            return
        obj = json.loads(line)
        if self._error(obj):
            return
        if (obj.get("message") or {}).get("content"):
            self.chunk_times.append(now)
        if obj.get("done"):
            self.done = True
            self.output_tokens = obj.get("eval_count")
            self.prompt_tokens = obj.get("prompt_eval_count")


PARSERS: dict[Protocol, type[StreamParser]] = {"openai": SseParser, "ollama": NdjsonParser}


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Client:
    """One worker's keep-alive connection; reconnects after any failure."""

    def __init__(self, base_url: str, timeout: float, api_key: str | None) -> None:
        url = urlsplit(base_url)
        self.https = url.scheme == "https"
        self.host = url.hostname or "localhost"
        self.port = url.port
        self.prefix = url.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "orchestrate-bench"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn:
            self.conn.close()
            self.conn = None

    def send(self, path: str, payload: bytes, parser: StreamParser) -> RequestSample:
        if self.conn is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self.conn = kind(self.host, self.port, timeout=self.timeout)
        start = time.perf_counter()
        try:
            self.conn.request("POST", self.prefix + path, body=payload, headers=self.headers)
            response = self.conn.getresponse()
            server = response.getheader("Server")
            if response.status != 200:
                body = response.read(4096).decode("utf-8", "replace")
                self.close()
                return RequestSample(start=start, end=time.perf_counter(),
                                     error=f"HTTP {response.status}: {_short(body)}",
                                     server=server)
            rest = b""
            # One timestamp per read: chunks that arrived together arrived at once.
            while (data := response.read1(65536)) and parser.error is None:
                now = time.perf_counter()
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    parser.feed(line.rstrip(b"\r"), now)
            if rest.strip() and parser.error is None:
                parser.feed(rest.rstrip(b"\r"), time.perf_counter())
            end = time.perf_counter()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return RequestSample(start=start, end=time.perf_counter(),
                                 error=_short(f"{type(exc).__name__}: {exc}"))
        except (ValueError, AttributeError, TypeError) as exc:
            # Not JSON, or JSON of another shape: not the protocol this engine speaks.
            self.close()
            return RequestSample(start=start, end=time.perf_counter(),
                                 error=_short(f"malformed stream: {exc}"))
        error = parser.error or (None if parser.done else
                                 f"stream ended without its final `{parser.end_marker}`")
        if error:
            self.close()
        return RequestSample(start=start, end=end, chunk_times=parser.chunk_times,
                             output_tokens=parser.output_tokens,
                             prompt_tokens=parser.prompt_tokens, error=error, server=server)


def run_level(base_url: str, protocol: Protocol, model: str, workload: Workload,
              concurrency: int, first_prompt: int = 0, api_key: str | None = None) -> LevelStats:
    """One closed-loop level: `concurrency` workers, warm-up first, then the measured requests.
    Prompts are numbered from `first_prompt`, so that no two requests share one."""
    def payload(index: int) -> bytes:
        path_and_body = request_for(protocol, model,
                                    synthetic_prompt(index, workload.input_tokens),
                                    workload.output_tokens)
        return json.dumps(path_and_body[1]).encode()

    path = request_for(protocol, model, "", 1)[0]
    parser = PARSERS[protocol]
    # Encoded before the clock starts, so that the measured loop does no JSON encoding.
    warmups = [payload(first_prompt + i) for i in range(concurrency * workload.warmup)]
    measured = [payload(first_prompt + len(warmups) + i) for i in range(workload.requests)]
    samples: list[RequestSample] = []
    started: list[float] = []
    lock = threading.Lock()
    next_index = iter(range(workload.requests))
    barrier = threading.Barrier(concurrency, action=lambda: started.append(time.perf_counter()))

    # Made here, not in the threads: nothing a worker runs before the barrier may raise.
    clients = [_Client(base_url, workload.timeout_s, api_key) for _ in range(concurrency)]

    def worker(number: int) -> None:
        client = clients[number]
        try:
            for i in range(workload.warmup):
                client.send(path, warmups[number * workload.warmup + i], parser())
            barrier.wait()
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                sample = client.send(path, measured[index], parser())
                with lock:
                    samples.append(sample)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,), name=f"bench-{n}", daemon=True)
               for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(concurrency, samples, started[0])


def _skipped(host: str, target: ProbeTarget, why: str, standin: bool) -> DeploymentBench:
    return DeploymentBench(host=host, deployment=target.deployment, engine=target.engine,
                           protocol=ENGINE_PROTOCOL.get(target.engine),
                           base_url=target.base_url, model=target.served_model_name,
                           skipped=why, standin=standin, levels=[])


def bench_target(host: str, target: ProbeTarget, workload: Workload,
                 log: Callable[[str], None] = lambda _: None,
                 api_key: str | None = None, standin: bool = False) -> DeploymentBench:
    """Every level of `workload` against one deployment. `standin`: its probes saw a
    stand-in; the benchmark's own answers can say so too."""
    protocol = ENGINE_PROTOCOL.get(target.engine)
    if protocol is None:
        return _skipped(host, target, f"no benchmark protocol for engine '{target.engine}'",
                        standin)
    levels = []
    first_prompt = 0
    for concurrency in workload.concurrency:
        level = run_level(target.base_url, protocol, target.served_model_name, workload,
                          concurrency, first_prompt, api_key)
        first_prompt += concurrency * workload.warmup + workload.requests
        standin = standin or any(is_standin(server) for server in level.servers)
        log(f"{host}/{target.deployment} concurrency {concurrency}: "
            f"{level.output_tokens_per_s:.1f} output tokens/s, {level.errors} errors"
            + (" (a STAND-IN answered, not the real engine)" if standin else ""))
        levels.append(level)
    return DeploymentBench(host=host, deployment=target.deployment, engine=target.engine,
                           protocol=protocol, base_url=target.base_url,
                           model=target.served_model_name, skipped=None, standin=standin,
                           levels=levels)


def make_workload(concurrency: str, requests: int, input_tokens: int, output_tokens: int,
                  *, warmup: int = 1, timeout_s: float = 120.0) -> Workload:
    """The workload from the command line's values; ConfigError naming the option if bad."""
    try:
        levels = [int(part) for part in concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or not all(1 <= c <= MAX_CONCURRENCY for c in levels):
        raise ConfigError(f"expected comma-separated integers from 1 to {MAX_CONCURRENCY}, "
                          f"like 1,4,16; got '{concurrency}'", key="--concurrency")
    for key, value in (("--input-tokens", input_tokens), ("--output-tokens", output_tokens)):
        if value < 1:
            raise ConfigError(f"expected a positive integer, got {value}", key=key)
    if requests < max(levels):
        raise ConfigError(f"{requests} is fewer than the highest concurrency {max(levels)}: "
                          "that level would never have all its requests in flight; give at "
                          f"least {max(levels)}", key="--requests")
    return Workload(concurrency=sorted(set(levels)), requests=requests, warmup=warmup,
                    input_tokens=input_tokens, output_tokens=output_tokens,
                    timeout_s=timeout_s)


def only_deployments(plan: Plan, names: list[str] | None) -> Plan:
    """`plan` with only the named deployments' probe targets (all when `names` is empty)."""
    known = {t.deployment for h in plan.hosts for t in h.probes}
    if not known:
        raise ConfigError(f"no deployment runs on the hosts of '{plan.group}': nothing to "
                          "benchmark", key="--hosts")
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise ConfigError(f"no deployment '{unknown[0]}' on the hosts of '{plan.group}' "
                          f"(deployments: {', '.join(sorted(known))})", key="--deployment")
    if not names:
        return plan
    return plan.model_copy(update={"hosts": [
        h.model_copy(update={"probes": [t for t in h.probes if t.deployment in names]})
        for h in plan.hosts if any(t.deployment in names for t in h.probes)]})


def bench_plan(plan: Plan, workload: Workload, probes: ProbeReport,
               log: Callable[[str], None] = lambda _: None,
               secrets: Mapping[str, str] | None = None) -> BenchReport:
    """Benchmark every deployment of `plan` whose probes passed, one after another;
    `secrets` holds the API keys by their api_key_var names, as for probe_plan."""
    entries = []
    for host in plan.hosts:
        for target in host.probes:
            own = [r for r in probes.results
                   if (r.host, r.deployment) == (host.name, target.deployment)]
            failed = [r.probe for r in own if not r.passed]
            standin = any(r.standin for r in own)
            if failed:
                entries.append(_skipped(host.name, target,
                                        f"its probes failed ({', '.join(failed)})", standin))
            else:
                key = (secrets or {}).get(target.api_key_var) if target.api_key_var else None
                entries.append(bench_target(host.name, target, workload, log, key, standin))
    return BenchReport(group=plan.group, workload=workload, deployments=entries)
