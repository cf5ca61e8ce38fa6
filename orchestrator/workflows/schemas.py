"""One JSON schema per command, from the result model its `--json` prints, and docs/json.md
made from them (`orchestrate schema --markdown > docs/json.md`; a unit test fails while
the file differs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from orchestrator.errors import ConfigError
from orchestrator.workflows.bench import BenchRun
from orchestrator.workflows.compat import CompatResult
from orchestrator.workflows.down import DownResult
from orchestrator.workflows.facts import FactsReport, FactsResult
from orchestrator.workflows.fit import FitAnswer, FitRefusal
from orchestrator.workflows.history import HistoryResult, NothingToRetry
from orchestrator.workflows.init import InitResult
from orchestrator.workflows.logs import LogsResult
from orchestrator.workflows.mirror import MirrorResult
from orchestrator.workflows.monitoring import MonitoringResult
from orchestrator.workflows.plan import PlanResult
from orchestrator.workflows.probe import ProbeRun
from orchestrator.workflows.runs import RunRecord
from orchestrator.workflows.status import StatusResult
from orchestrator.workflows.up import UpResult


@dataclass(frozen=True)
class Command:
    name: str
    # What `--json` prints: a model, or a union of models.
    output: Any
    summary: str
    exits: str

    def schema(self) -> dict[str, Any]:
        found: dict[str, Any] = TypeAdapter(self.output).json_schema(mode="serialization")
        return {"$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"orchestrate {self.name} --json", **_every_key_present(found)}


def _every_key_present(schema: Any) -> Any:
    """`--json` prints every field, those with defaults too (nothing is excluded), which the
    schema says by requiring them all."""
    if isinstance(schema, list):
        return [_every_key_present(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({name: _every_key_present(sub) for name, sub in v.items()}
               if k in ("properties", "$defs") and isinstance(v, dict)
               else _every_key_present(v))
           for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["required"] = list(schema["properties"])
    return out


COMMANDS = {c.name: c for c in [
    Command("init", InitResult, "the fleet file written",
            "0 written; 2 the file exists (without --force), or no checkout to copy it from"),
    Command("plan", PlanResult, "the plan: per host its role variables, probes and reasons, "
                                "and where its facts came from",
            "0 (a host not reached is planned from fleet.yml, `facts` says so); 2 bad input "
            "(fleet, group, stage, facts directory) or a host that differs from its "
            "declaration"),
    Command("up", UpResult | NothingToRetry, "the facts used, the Ansible run(s), the "
                                             "mirror's work and the probes; with "
                                             "--retry-failed and no failed host: "
                                             "NothingToRetry",
            "0 all passed (or nothing to retry); 1 a playbook or a probe failed; 2 bad input "
            "or a host that differs from its declaration, another run holds the group's "
            "lock, or --retry-failed without a recorded up; nothing run"),
    Command("probe", ProbeRun, "every probe's result, with evidence and next step",
            "0 all passed; 1 a probe failed; 2 bad input"),
    Command("bench", BenchRun, "the probes and each deployment's measurements",
            "0 all passed; 1 a probe or a request failed; 2 bad input"),
    Command("mirror", MirrorResult, "what is staged in the mirror and what was downloaded",
            "0 staged; 1 a download or check failed; 2 bad input"),
    Command("facts", FactsReport, "each host's facts (GPUs, driver, OS, disk), gathered now "
                                  "or from the cache",
            "0 every host was reached; 1 a host was not (`unreachable`; the others are "
            "reported); 2 bad input"),
    Command("facts parse", FactsResult, "the GPU facts of saved nvidia-smi output",
            "0 healthy; 1 it shows a broken driver or tool (see `error`); 2 unreadable"),
    Command("compat", CompatResult, "the torch build and vLLM release, or why none",
            "0 answered; 2 refused (`refused` says why; the JSON is printed too)"),
    Command("fit", FitAnswer | FitRefusal, "whether the model fits, how, or what would",
            "0 fits; 2 does not fit, or the question is refused (`refused`); the JSON is "
            "printed in both cases"),
    Command("status", StatusResult, "each deployment's unit, HTTP answer and release (weights' "
                                    "revision, vLLM, torch, driver) now, where hosts differ, "
                                    "and the group's last run",
            "0 every deployment is up and no skew; 1 one is down or hosts differ (skew); "
            "2 bad input"),
    Command("logs", LogsResult, "the journal entries of the deployments' units per host, "
                                "oldest first (--follow: one LogRecord or Unreached object "
                                "per line, as they come)",
            "0 every host's journal was read; 1 a host's was not (`unreachable`); 2 bad "
            "input; 130 --follow ended by Ctrl-C"),
    Command("monitoring", MonitoringResult, "the scrape targets (node_exporter per host, each "
                                            "vLLM instance's /metrics), those not scrapeable "
                                            "and why, and the files written",
            "0 written; 2 bad input"),
    Command("history", HistoryResult, "past runs of .orchestrate/runs, newest first: "
                                      "command, group, hosts ok/failed/unreachable, changed, "
                                      "duration, who, the fleet file's hash",
            "0"),
    Command("history show", RunRecord, "one run in full: per host its outcome, failed tasks "
                                       "and probes, the release, the fleet file's copy",
            "0; 2 no such run"),
    Command("down", DownResult, "per host the units, users and files removed (with "
                                "--check: what would be); the sandbox: its hosts removed",
            "0 torn down, shown (--check) or nothing left; 1 a host failed or was not "
            "reached (nothing removed when the check run failed), or the answer was no; "
            "2 bad input, no terminal to ask on and no --yes, or another run holds the "
            "group's lock"),
]}


def command(name: str) -> Command:
    try:
        return COMMANDS[name]
    except KeyError:
        raise ConfigError(f"no command '{name}' (commands: {', '.join(COMMANDS)})",
                          key="COMMAND") from None


def _type(schema: dict[str, Any]) -> str:
    """A short type name for a property's schema, for the tables of docs/json.md."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " or ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {_type(schema['additionalProperties'])}"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return str(kind or "any")


def _fields(schema: dict[str, Any]) -> list[str]:
    rows = []
    for name, spec in schema.get("properties", {}).items():
        what = " ".join(str(spec.get("description", "")).split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(spec)} | {what} |")
    return ["| field | type | meaning |", "|---|---|---|", *rows]


def _about(schema: dict[str, Any]) -> list[str]:
    text = " ".join(str(schema.get("description", "")).split())
    return [text, ""] if text else []


def markdown() -> str:
    """docs/json.md: every command's JSON output and every object in it, field by field."""
    out = [
        "# JSON output",
        "",
        "<!-- Generated by `orchestrate schema --markdown > docs/json.md` from the result",
        "     models in orchestrator/workflows/; tests/unit/test_workflows.py fails while it",
        "     differs. Edit the models' field descriptions, not this file. -->",
        "",
        "Every command takes `--json`: standard output then holds one JSON document and",
        "nothing else (tables, progress and the report's path go to standard error). Bad",
        "input that stops a command before it starts (exit 2) prints one `error:` line on",
        "standard error and no JSON, except `compat` and `fit`, which answer a question and",
        "print their JSON with `refused` set. `orchestrate schema COMMAND` prints the JSON",
        "Schema (draft 2020-12) of a command's output, `orchestrate schema --list` names the",
        "commands. Keys are added over time; none is renamed or removed without a note here.",
        "",
    ]
    objects: dict[str, dict[str, Any]] = {}
    for c in COMMANDS.values():
        schema = c.schema()
        for name, found in schema.get("$defs", {}).items():
            if objects.setdefault(name, found) != found:
                raise ValueError(f"two different objects named {name} (in {c.name})")
        out += [f"## `orchestrate {c.name} --json`", "",
                f"{c.summary[0].upper()}{c.summary[1:]}.", "", f"Exit codes: {c.exits}.", ""]
        if "anyOf" in schema:
            out += ["One of: " + ", ".join(f"`{_type(v)}`" for v in schema["anyOf"])
                    + " (see Objects).", ""]
        else:
            out += [*_fields(schema), ""]
    out += ["## Objects", "", "The objects the outputs above contain, by name.", ""]
    for name, found in sorted(objects.items()):
        out += [f"### {name}", "", *_about(found), *_fields(found), ""]
    return "\n".join(out)
