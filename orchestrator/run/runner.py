"""Running playbooks through ansible-runner: the only module that imports it.

ansible-runner's events are translated into a few typed events for live
progress, and the outcome into per-host counts and, for each failure, the host,
task and the message that explains it: not the whole result JSON.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner
import ansible_runner.exceptions

from orchestrator.errors import OrchestrateError
from orchestrator.run.render import ROOT, RunDir

MESSAGE_LINES = 14


@dataclass(frozen=True)
class Progress:
    """One step of a run, for the live display: a play or a task started, a host finished one."""

    kind: str  # play | task | ok | changed | failed | unreachable | skipped
    play: str = ""
    task: str = ""
    host: str | None = None


@dataclass(frozen=True)
class TaskFailure:
    host: str
    play: str
    task: str
    message: str
    unreachable: bool = False


@dataclass
class HostStats:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0


@dataclass
class RunResult:
    status: str
    rc: int
    stats: dict[str, HostStats] = field(default_factory=dict)
    failures: list[TaskFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.failures

    @property
    def changed_total(self) -> int:
        return sum(s.changed for s in self.stats.values())

    def failed_hosts(self) -> set[str]:
        return {f.host for f in self.failures}


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-MESSAGE_LINES:])


def failure_message(res: Mapping[str, Any]) -> str:
    """The part of a failed task's result that says why, in a few lines."""
    for item in res.get("results") or []:
        if isinstance(item, Mapping) and item.get("failed"):
            label = item.get("_ansible_item_label", item.get("item"))
            inner = failure_message(item)
            return f"item {label!r}: {inner}" if label is not None else inner
    parts = []
    if res.get("msg"):
        parts.append(str(res["msg"]).strip())
    for key in ("stderr", "module_stderr", "stdout", "module_stdout"):
        value = res.get(key)
        if value and str(value).strip() and (not parts or key.endswith("stderr")):
            parts.append(_tail(str(value)))
            break
    if res.get("rc") not in (None, 0) and "cmd" in res:
        cmd = res["cmd"]
        parts.append(f"(exit {res['rc']}: {cmd if isinstance(cmd, str) else ' '.join(cmd)})")
    return _tail("\n".join(parts)) or "failed without a message (see the run's artifacts)"


class EventInterpreter:
    """Folds ansible-runner events into progress callbacks and a RunResult."""

    def __init__(self, on_progress: Callable[[Progress], None]) -> None:
        self.on_progress = on_progress
        self.failures: list[TaskFailure] = []
        self.stats: dict[str, HostStats] = {}
        self.play = ""

    def __call__(self, event: Mapping[str, Any]) -> bool:
        name = event.get("event", "")
        data = event.get("event_data") or {}
        if name == "playbook_on_play_start":
            self.play = data.get("play", "")
            self.on_progress(Progress("play", play=self.play))
        elif name == "playbook_on_task_start":
            self.on_progress(Progress("task", play=self.play, task=data.get("task", "")))
        elif name in ("runner_on_ok", "runner_on_skipped"):
            res = data.get("res") or {}
            kind = ("skipped" if name == "runner_on_skipped"
                    else "changed" if res.get("changed") else "ok")
            self.on_progress(Progress(kind, self.play, data.get("task", ""), data.get("host")))
        elif name in ("runner_on_failed", "runner_on_unreachable"):
            unreachable = name == "runner_on_unreachable"
            if not data.get("ignore_errors"):
                self.failures.append(TaskFailure(
                    host=data.get("host", "?"), play=self.play, task=data.get("task", ""),
                    message=failure_message(data.get("res") or {}), unreachable=unreachable))
                self.on_progress(Progress("unreachable" if unreachable else "failed",
                                          self.play, data.get("task", ""), data.get("host")))
        elif name == "playbook_on_stats":
            self._stats(data)
        return True

    def _stats(self, data: Mapping[str, Any]) -> None:
        for key, attr in (("ok", "ok"), ("changed", "changed"), ("failures", "failed"),
                          ("dark", "unreachable"), ("skipped", "skipped")):
            for host, count in (data.get(key) or {}).items():
                setattr(self.stats.setdefault(host, HostStats()), attr, count)

    def result(self, status: str, rc: int) -> RunResult:
        return RunResult(status=status, rc=rc, stats=self.stats, failures=self.failures)


def run_playbook(run: RunDir, on_progress: Callable[[Progress], None], *,
                 forks: int = 25, env: Mapping[str, str] | None = None) -> RunResult:
    """Run site.yml for `run` and return what happened on each host."""
    interpreter = EventInterpreter(on_progress)
    status, rc = run_ansible(run.path, run.playbook, run.inventories(), interpreter,
                             cmdline=" ".join(run.ansible_args()) or None, forks=forks, env=env)
    return interpreter.result(status, rc)


def run_ansible(path: Path, playbook: str, inventories: list[str],
                event_handler: Callable[[Mapping[str, Any]], bool], *,
                cmdline: str | None = None, forks: int = 25,
                env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Run `playbook` (relative to the checkout) with ansible-runner in the run directory
    `path` (artifacts under path/artifacts), feeding every event to `event_handler`; the
    one way this project starts Ansible. Returns runner's status and rc."""
    envvars = {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
               "ANSIBLE_FORCE_COLOR": "0",
               # ansible-runner turns host key checking off unless told otherwise;
               # real fleets keep it on (the sandbox opts out in its inventory).
               "ANSIBLE_HOST_KEY_CHECKING": "True",
               # The ansible-playbook installed beside this Python, even when the
               # virtual environment is not activated.
               "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                        os.environ.get("PATH", "")]),
               **(env or {})}
    try:
        runner = ansible_runner.run(
            private_data_dir=str(path),
            project_dir=str(ROOT),
            playbook=playbook,
            inventory=inventories,
            cmdline=cmdline,
            forks=forks,
            ident="ansible",
            artifact_dir=str(path / "artifacts"),
            event_handler=event_handler,
            quiet=True,
            envvars=envvars,
            # Secrets reach Ansible through the process environment: never write
            # runner's env/ files, which would keep them beside the artifacts.
            suppress_env_files=True,
        )
    except ansible_runner.exceptions.AnsibleRunnerException as exc:
        raise OrchestrateError(f"ansible-runner could not start the run in {path}: "
                               f"{exc}") from None
    _drop_saved_environment(path / "artifacts" / "ansible" / "command")
    return runner.status, runner.rc


def _drop_saved_environment(command_file: Path) -> None:
    """ansible-runner saves the whole process environment beside the command it ran;
    the operator's environment may hold credentials, so keep only the command."""
    if command_file.exists():
        saved = json.loads(command_file.read_text(encoding="utf-8"))
        saved.pop("env", None)
        command_file.write_text(json.dumps(saved), encoding="utf-8")
