"""Running playbooks through ansible-runner: the only module that imports it.

ansible-runner's events are translated into a few typed events for live
progress, and the outcome into per-host counts and, for each failure, the host,
task and the message that explains it: not the whole result JSON.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import ansible_runner
import ansible_runner.exceptions
import ansible_runner.interface

from orchestrator.errors import OrchestrateError
from orchestrator.run.render import ROOT, RunDir, ansible_yaml, write_private

MESSAGE_LINES = 14

# ssh never waits for an answer nobody gives: no password or host key prompt (BatchMode),
# and a connection whose peer went silent ends after ServerAliveInterval x CountMax.
SSH_OPTIONS = "-o BatchMode=yes -o ServerAliveCountMax=4"
# What ansible-playbook gets of this process's environment (which ansible-runner also saves
# beside the artifacts): where things are, the locale, the ssh agent and Ansible's own
# settings; never the rest, which may hold credentials.
_KEPT_ENVIRONMENT = re.compile(r"PATH|HOME|USER|LOGNAME|SHELL|TERM|TZ|TMPDIR|LANG|LANGUAGE"
                               r"|LC_[A-Z_]+|SSH_AUTH_SOCK|XDG_RUNTIME_DIR|VIRTUAL_ENV"
                               r"|ANSIBLE_[A-Z0-9_]+")
HOST_KEY_FIX = ("the host's SSH key is not in known_hosts: check its fingerprint, then add it "
                "(ssh-keyscan -p PORT ADDRESS >> ~/.ssh/known_hosts, or ssh to it once)")


class Interrupted(OrchestrateError):
    """Ctrl-C during a run: Ansible was cancelled, nothing after it runs."""

    exit_code = 130


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
    text = _tail("\n".join(parts)) or "failed without a message (see the run's artifacts)"
    return f"{text}\n{HOST_KEY_FIX}" if "Host key verification failed" in text else text


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
                             args=run.ansible_args(), forks=forks, env=env)
    return interpreter.result(status, rc)


def _ssh_args() -> str:
    """ansible.cfg's ssh_args with SSH_OPTIONS added (ANSIBLE_SSH_ARGS replaces them)."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "ansible.cfg", encoding="utf-8")
    return " ".join(filter(None, [config.get("ssh_connection", "ssh_args", fallback=""),
                                  SSH_OPTIONS]))


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ansible-playbook: the kept part of this process's, then ours."""
    kept = {k: v for k, v in os.environ.items() if _KEPT_ENVIRONMENT.fullmatch(k)}
    return {**kept,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_FORCE_COLOR": "0",
            # ansible-runner turns host key checking off unless told otherwise;
            # real fleets keep it on (the sandbox opts out in its inventory).
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_SSH_ARGS": _ssh_args(),
            # The ansible-playbook installed beside this Python, even when the
            # virtual environment is not activated.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                     os.environ.get("PATH", "")]),
            **(extra or {})}


@contextmanager
def cancel_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """A cancel callback for ansible-runner: true after the first Ctrl-C. That first one
    gives SIGINT back to its previous handler, so that a second is not swallowed; the
    handler is restored after the run whatever happens."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def first(signum: int, frame: FrameType | None) -> None:
        pressed.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, first)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def run_ansible(path: Path, playbook: str, inventories: list[str],
                event_handler: Callable[[Mapping[str, Any]], bool], *,
                args: Sequence[str] = (), forks: int = 25,
                env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Run `playbook` (relative to the checkout) with ansible-runner in the run directory
    `path` (artifacts under path/artifacts), feeding every event to `event_handler`; the
    one way this project starts Ansible. `args` are ansible-playbook's options, each one
    word whatever it holds. Returns runner's status and rc; Ctrl-C cancels the run and
    raises Interrupted."""
    command = path / "artifacts" / "ansible" / "command"
    try:
        with cancel_on_ctrl_c() as cancelled:
            runner = ansible_runner.interface.init_runner(
                private_data_dir=str(path),
                project_dir=str(ROOT),
                playbook=playbook,
                inventory=inventories,
                # runner splits this string again: joined quoted, it splits back into args.
                cmdline=shlex.join(args) or None,
                forks=forks,
                ident="ansible",
                artifact_dir=str(path / "artifacts"),
                event_handler=event_handler,
                cancel_callback=cancelled,
                quiet=True,
                envvars=environment(env),
                # No env/ files: the run's environment is not written beside the artifacts.
                suppress_env_files=True,
            )
            # runner starts from this process's whole environment, and saves what it
            # starts with in artifacts/ansible/command before the run: keep only ours and
            # what runner adds, so that nothing else is ever written, even if killed.
            runner.config.env = _without_inherited(runner.config.env, environment(env))
            runner.run()
            pressed = cancelled()
    except ansible_runner.exceptions.AnsibleRunnerException as exc:
        raise OrchestrateError(f"ansible-runner could not start the run in {path}: "
                               f"{exc}") from None
    finally:
        _drop_saved_environment(command)
        _owner_only(path / "artifacts")
    # Pressed while the run was ending: runner may not have asked, the operator still did.
    if runner.canceled or pressed:
        raise Interrupted(f"interrupted (Ctrl-C): Ansible was stopped; what it did is in "
                          f"{path / 'artifacts'}")
    return runner.status, runner.rc


HostAnswer = tuple[str, dict[str, Any]]


class HostAnswers:
    """The one task's outcome on each host of a run, from the run's events (the event
    and the task's result)."""

    def __init__(self) -> None:
        self.found: dict[str, HostAnswer] = {}

    def __call__(self, event: Mapping[str, Any]) -> bool:
        name = str(event.get("event", ""))
        data = event.get("event_data") or {}
        if name in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable") \
                and data.get("host"):
            self.found[str(data["host"])] = (name, dict(data.get("res") or {}))
        return True


def run_on_each_host(path: Path, playbook: str, group: str,
                     entries: Mapping[str, Mapping[str, Any]], operator_inventory: Path | None,
                     *, connect_timeout_s: int, forks: int) -> dict[str, HostAnswer]:
    """One run of a one-task `playbook` (its hosts: `group`) over the hosts of `entries`
    (their inventory entries) at once, in the directory `path`; per host that answered, the
    task's last event and result. The operator's inventory is read first, so that its
    group_vars apply and ours win; the run is limited to `group`."""
    inventory = path / "inventory.yml"
    # The fleet's values as data (!unsafe), as every inventory of this project.
    write_private(inventory, ansible_yaml(
        {"all": {"children": {group: {"hosts": {k: dict(v) for k, v in entries.items()}}}}}))
    inventories = ([str(operator_inventory.resolve())] if operator_inventory else []) \
        + [str(inventory)]
    answers = HostAnswers()
    run_ansible(path, playbook, inventories, answers, args=["--limit", group],
                forks=max(1, min(forks, len(entries))),
                env={"ANSIBLE_TIMEOUT": str(max(1, connect_timeout_s))})
    return answers.found


def _without_inherited(started: Mapping[str, str], ours: Mapping[str, str]) -> dict[str, str]:
    """`started` less what came from os.environ unchanged and is not in `ours`."""
    return {k: v for k, v in started.items()
            if k in ours or os.environ.get(k) != v}


def _owner_only(artifacts: Path) -> None:
    """runner writes some artifacts (stderr, status, rc) group- and world-readable: they
    hold what the hosts answered; the run directory is the operator's alone."""
    for item in [artifacts, *artifacts.rglob("*")]:
        if not item.is_symlink():
            item.chmod(item.stat().st_mode & 0o700)


def _drop_saved_environment(command_file: Path) -> None:
    """ansible-runner saves the environment beside the command it ran (only the kept part
    of ours, see environment()); keep only the command."""
    if command_file.exists():
        saved = json.loads(command_file.read_text(encoding="utf-8"))
        saved.pop("env", None)
        command_file.write_text(json.dumps(saved), encoding="utf-8")
