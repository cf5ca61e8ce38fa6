"""The HTML report of a run: per host the plan, the probe results and the benchmark's plots.

One self-contained file (`report.html` in the run directory): no script, no
external style sheet or font, plots drawn as inline SVG by the template, so that
it opens anywhere, offline, and can be attached to a ticket as it is.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from orchestrator.plan.planner import Plan, command_line
from orchestrator.verify.bench import BenchReport, DeploymentBench
from orchestrator.verify.httpprobe import ProbeReport

_jinja = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                     undefined=StrictUndefined, autoescape=select_autoescape(["j2"]),
                     trim_blocks=True, lstrip_blocks=True)

# Plot area inside each SVG, in its own units (the SVG scales to the page); the legend
# goes below it, one line per series, so that long deployment names fit.
WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 28, 40
PAD = 16  # between the axes and the first and last points
LEGEND_LINE = 18
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    dashed: bool
    points: list[tuple[float, float, float]]  # x, y in SVG units; the value
    legend_y: int


@dataclass(frozen=True)
class Chart:
    """A line chart laid out for the template: everything already in SVG coordinates."""

    title: str
    unit: str
    width: int
    height: int
    plot: tuple[int, int, int, int]  # left, top, right, bottom edges
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    series: list[Series]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= value (1 for <= 0)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= value * (1 - 1e-12))


def _label(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:g}"


def line_chart(title: str, unit: str, x_values: list[int],
               lines: list[tuple[str, list[float | None]]],
               dashed: tuple[str, ...] = ()) -> Chart:
    """One line per (name, y values), x values evenly spaced (concurrency levels are
    usually powers of two or four, which a linear axis would crowd at the left)."""
    left, top, right, bottom = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    top_value = nice_ceiling(max((y for _, ys in lines for y in ys if y is not None),
                                 default=0.0))
    step = (right - left - 2 * PAD) / max(1, len(x_values) - 1)
    xs = [left + PAD + i * step if len(x_values) > 1 else (left + right) / 2
          for i in range(len(x_values))]

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / top_value

    series = [Series(name=name, color=COLORS[i % len(COLORS)],
                     dashed=any(d in name for d in dashed),
                     points=[(x, y_of(y), y) for x, y in zip(xs, ys, strict=True)
                             if y is not None],
                     legend_y=HEIGHT + 4 + i * LEGEND_LINE)
              for i, (name, ys) in enumerate(lines)]
    return Chart(title=title, unit=unit, width=WIDTH,
                 height=HEIGHT + 8 + len(lines) * LEGEND_LINE,
                 plot=(left, top, right, bottom),
                 x_ticks=[(x, str(v)) for x, v in zip(xs, x_values, strict=True)],
                 y_ticks=[(y_of(top_value * k / 4), _label(top_value * k / 4))
                          for k in range(5)],
                 series=series)


def deployment_charts(bench: DeploymentBench) -> list[Chart]:
    """Throughput, TTFT and ITL against concurrency for one deployment."""
    x = [level.concurrency for level in bench.levels]
    return [
        line_chart("Output throughput", "tokens/s", x,
                   [("output tokens/s", [lv.output_tokens_per_s for lv in bench.levels])]),
        line_chart("Time to first token", "ms", x,
                   [(f"TTFT p{q}", [getattr(lv.ttft_ms, f"p{q}") for lv in bench.levels])
                    for q in (50, 95)], dashed=("p95",)),
        line_chart("Inter-token latency", "ms", x,
                   [(f"ITL p{q}", [getattr(lv.itl_ms, f"p{q}") for lv in bench.levels])
                    for q in (50, 95)], dashed=("p95",)),
    ]


@dataclass(frozen=True)
class Comparison:
    """The throughput comparison across deployments, real engines only."""

    chart: Chart | None  # None with fewer than two real deployments benchmarked
    engines: list[str]  # the real engines on the chart
    standins: list[str]  # "host/deployment (engine)" left out: a stand-in answered them
    note: str | None  # what the reader must know to read the chart (or its absence)


def comparison(bench: BenchReport) -> Comparison:
    """Output tokens/s of every benchmarked deployment on one chart (vLLM against Ollama,
    host against host), leaving out those a stand-in engine answered: a stand-in runs no
    model, so its numbers set beside a real engine's would compare nothing."""
    ran = [d for d in bench.deployments if d.levels]
    real = [d for d in ran if not d.standin]
    engines = sorted({d.engine for d in real})
    standins = [f"{d.host}/{d.deployment} ({d.engine})" for d in ran if d.standin]
    notes = []
    if standins:
        notes.append(f"Left out of the comparison: {', '.join(standins)}, answered by a "
                     "stand-in engine (its Server header says so), which runs no model.")
    if len(engines) == 1 and len({d.engine for d in ran}) > 1:
        notes.append(f"No engine comparison: {engines[0]} is the only real engine "
                     "benchmarked" + ("; the chart compares its deployments." if len(real) > 1
                                      else "."))
    elif not real and standins:
        notes.append("No real engine was benchmarked.")
    chart = None
    if len(real) >= 2:
        x = sorted({level.concurrency for d in real for level in d.levels})
        lines: list[tuple[str, list[float | None]]] = []
        for d in real:
            by_level = {level.concurrency: level.output_tokens_per_s for level in d.levels}
            lines.append((f"{d.host}/{d.deployment} ({d.engine})", [by_level.get(c) for c in x]))
        title = "Output throughput by deployment" + (f", {engines[0]} only"
                                                     if len(engines) == 1 else "")
        chart = line_chart(title, "tokens/s", x, lines)
    return Comparison(chart=chart, engines=engines, standins=standins,
                      note=" ".join(notes) or None)


def render_report(*, command: str, run_id: str, plan: Plan, probes: ProbeReport | None,
                  bench: BenchReport | None, now: dt.datetime) -> str:
    hosts = []
    for host in plan.hosts:
        conn = host.connection
        hosts.append({
            "plan": host,
            "address": f"{conn.get('ansible_user', '?')}@{conn.get('ansible_host', '?')}:"
                       f"{conn.get('ansible_port', '?')}",
            "deployments": [(d["name"], command_line(d["args"]))
                            for d in host.vars.get("vllm_deployments", [])],
            # Served beyond loopback without an API key by the operator's choice.
            "open": [t.deployment for t in host.probes if t.open],
            "probes": [r for r in probes.results if r.host == host.name] if probes else [],
            "bench": [(d, deployment_charts(d),
                       sorted({server for level in d.levels for server in level.servers}))
                      for d in bench.deployments if d.host == host.name] if bench else [],
        })
    return _jinja.get_template("report.html.j2").render(
        command=command, run_id=run_id, group=plan.group, stages=plan.stages,
        generated=now.isoformat(timespec="seconds"), hosts=hosts, probes=probes, bench=bench,
        comparison=comparison(bench) if bench else None)


def write_report(run_dir: Path, *, command: str, plan: Plan, probes: ProbeReport | None,
                 bench: BenchReport | None = None) -> Path:
    """Write `report.html` into the run directory and return its path."""
    path = run_dir / "report.html"
    path.write_text(render_report(command=command, run_id=run_dir.name, plan=plan,
                                  probes=probes, bench=bench, now=dt.datetime.now(dt.UTC)),
                    encoding="utf-8")
    return path
