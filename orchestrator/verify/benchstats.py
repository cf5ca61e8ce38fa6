"""Benchmark statistics: pure functions from timed requests to the numbers a report shows.

Definitions (the README's "Benchmark" section repeats them):

- A request's clock starts when it is sent. TTFT (time to first token) is the time
  to its first chunk with generated text; ITL (inter-token latency) is each gap
  between two consecutive such chunks of one request, pooled over all requests of
  a level (as vLLM's own benchmark pools them); latency is the time to the end of
  the stream.
- Output tokens per request are the server's count (`usage.completion_tokens`,
  Ollama's `eval_count`) when it gives one, else the number of text chunks;
  `tokens_from` says which. vLLM sends one token per chunk unless told otherwise,
  so both agree there.
- Duration of a level: from the moment its measured requests start (after the
  warm-up) to the end of its last request. requests/s = successful requests /
  duration; output tokens/s = their output tokens / duration. Failed requests count
  as errors only: they add neither time samples nor tokens.
- Percentiles: linear interpolation between the closest ranks (Hyndman and Fan's
  type 7, the default of numpy.percentile and of Excel's PERCENTILE.INC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PERCENTILES = (50, 95, 99)
MAX_ERROR_MESSAGES = 3


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, type 7; ValueError when there are none."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class RequestSample:
    """One request as the load generator saw it; times in seconds on one monotonic clock."""

    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int | None = None  # the server's count, when it gave one
    prompt_tokens: int | None = None
    error: str | None = None
    server: str | None = None  # the answer's Server header, when it had one


class Distribution(BaseModel):
    """Percentiles and mean of one measure, in milliseconds; all null without samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(description="number of samples")
    mean: float | None = Field(description="arithmetic mean, ms")
    p50: float | None = Field(description="median, ms")
    p95: float | None = Field(description="95th percentile, ms")
    p99: float | None = Field(description="99th percentile, ms")


class LevelStats(BaseModel):
    """One concurrency level of one deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int = Field(description="requests in flight at all times")
    requests: int = Field(description="measured requests sent (warm-up excluded)")
    ok: int = Field(description="requests that streamed to their proper end")
    errors: int = Field(description="requests that failed")
    error_messages: list[str] = Field(description="the first distinct error messages "
                                                  f"(at most {MAX_ERROR_MESSAGES})")
    duration_s: float = Field(description="start of the measured requests to the end of "
                                          "the last one, s")
    requests_per_s: float = Field(description="successful requests / duration")
    output_tokens: int = Field(description="output tokens of the successful requests")
    output_tokens_per_s: float = Field(description="output_tokens / duration")
    tokens_from: Literal["usage", "chunks", "mixed", "none"] = Field(
        description="where output token counts came from: the server's usage report, "
                    "counted text chunks, both (some responses had usage), or none (no "
                    "successful request)")
    prompt_tokens_mean: float | None = Field(description="mean prompt tokens as the server "
                                                         "counted them (chat template "
                                                         "included); null if not reported")
    ttft_ms: Distribution = Field(description="time to first token")
    itl_ms: Distribution = Field(description="inter-token latency: gaps between text chunks")
    latency_ms: Distribution = Field(description="whole request, send to end of stream")
    servers: list[str] = Field(description="the distinct Server headers of the answers "
                                           "(failed ones included), sorted")


def distribution(seconds: Sequence[float]) -> Distribution:
    """`seconds` summarized in milliseconds."""
    if not seconds:
        return Distribution(count=0, mean=None, p50=None, p95=None, p99=None)
    ms = [s * 1000 for s in seconds]
    p50, p95, p99 = (percentile(ms, q) for q in PERCENTILES)
    return Distribution(count=len(ms), mean=sum(ms) / len(ms), p50=p50, p95=p95, p99=p99)


def summarize(concurrency: int, samples: Sequence[RequestSample], started: float) -> LevelStats:
    """The statistics of one level whose measured requests started at `started`."""
    ok = [s for s in samples if s.error is None]
    failed = [s for s in samples if s.error is not None]
    messages: list[str] = []
    for s in failed:
        if s.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
            messages.append(s.error or "")
    duration = max((s.end for s in samples), default=started) - started
    tokens = sum(s.output_tokens if s.output_tokens is not None else len(s.chunk_times)
                 for s in ok)
    with_usage = sum(s.output_tokens is not None for s in ok)
    tokens_from: Literal["usage", "chunks", "mixed", "none"] = (
        "none" if not ok else "usage" if with_usage == len(ok)
        else "chunks" if with_usage == 0 else "mixed")
    prompts = [s.prompt_tokens for s in ok if s.prompt_tokens is not None]
    return LevelStats(
        concurrency=concurrency, requests=len(samples), ok=len(ok), errors=len(failed),
        error_messages=messages, duration_s=duration,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
        tokens_from=tokens_from,
        prompt_tokens_mean=sum(prompts) / len(prompts) if prompts else None,
        ttft_ms=distribution([s.chunk_times[0] - s.start for s in ok if s.chunk_times]),
        itl_ms=distribution([b - a for s in ok
                             for a, b in pairwise(s.chunk_times)]),
        latency_ms=distribution([s.end - s.start for s in ok]),
        servers=sorted({s.server for s in samples if s.server is not None}))
