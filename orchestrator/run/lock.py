"""One run at a time per host group: a lock file under the state directory.

    .orchestrate/locks/<group>.lock   {"run_id", "pid", "host", "user", "command", "started"}

Taken by creating the file exclusively (O_EXCL): of two runs starting together, one
wins. A lock whose process is gone is stale: on this control host that is known (its pid
is not alive) and the lock is taken over with a warning; a lock taken on another control
host cannot be checked from here, so it is stale only when older than a bound, or when
the operator says so (--break-lock). The lock is removed on every way out of the run
(exceptions and Ctrl-C included), and only if it is still this run's.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.errors import OrchestrateError

LOCKS = "locks"
# A run longer than this is unusual even on a large fleet: a lock of another control
# host that old is taken to be left behind by a crash.
DEFAULT_STALE_AFTER = dt.timedelta(hours=24)
_SAFE = re.compile(r"[A-Za-z0-9_.-]+")


class LockHeld(OrchestrateError):
    """Another run holds the group's lock: nothing was done."""

    exit_code = 2


@dataclass(frozen=True)
class LockInfo:
    run_id: str
    pid: int
    host: str
    user: str
    command: str
    started: str  # ISO 8601, UTC

    def since(self) -> dt.datetime | None:
        try:
            return dt.datetime.fromisoformat(self.started)
        except ValueError:
            return None

    def describe(self) -> str:
        return (f"run {self.run_id} ({self.command}, pid {self.pid}, {self.user}@{self.host}, "
                f"since {self.started})")


def lock_path(state_root: Path, group: str) -> Path:
    """The group's lock file; a group name that is not a plain file name gets a digest."""
    name = group if _SAFE.fullmatch(group) and not group.startswith(".") else (
        re.sub(r"[^A-Za-z0-9_.-]", "_", group).lstrip(".") + "-"
        + hashlib.sha256(group.encode()).hexdigest()[:12])
    return state_root / LOCKS / f"{name}.lock"


def read_lock(path: Path) -> LockInfo | None:
    """The lock's content; None when absent or unreadable (half written, damaged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockInfo(run_id=str(data["run_id"]), pid=int(data["pid"]),
                        host=str(data["host"]), user=str(data["user"]),
                        command=str(data["command"]), started=str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create(path: Path, info: LockInfo) -> bool:
    """Create the lock file holding `info`; False when it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(asdict(info)) + "\n")
    return True


def _stale_reason(held: LockInfo | None, path: Path, now: dt.datetime, here: str,
                  stale_after: dt.timedelta, break_lock: bool) -> str | None:
    """Why the existing lock may be taken over, or None when it holds."""
    if held is None:
        # Unreadable: a crash between creating and writing it, or damage. A run writes its
        # lock at once, so one that is not readable a minute later is left behind.
        age = now - dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
        if age > dt.timedelta(minutes=1) or break_lock:
            return f"unreadable lock {path} (age {int(age.total_seconds())} s)"
        return None
    if held.host == here:
        if not pid_alive(held.pid):
            return f"stale lock of {held.describe()}: pid {held.pid} no longer runs here"
        if break_lock:
            return (f"lock of {held.describe()} broken by --break-lock although pid "
                    f"{held.pid} runs")
        return None
    since = held.since()
    if since is not None and now - since > stale_after:
        return (f"stale lock of {held.describe()}: taken on another control host more than "
                f"{stale_after} ago")
    if break_lock:
        return f"lock of {held.describe()} broken by --break-lock"
    return None


def _refusal(held: LockInfo | None, path: Path, group: str, here: str) -> str:
    if held is None:
        return (f"group '{group}' is being locked by another run ({path} is being written): "
                "try again in a moment")
    where = ("it still runs on this host" if held.host == here
             else f"it was taken on {held.host}, whose processes cannot be checked from here")
    return (f"group '{group}' is busy: {held.describe()}; {where}. Wait for it, or if that "
            f"run is gone, pass --break-lock (lock file {path})")


def acquire(state_root: Path, group: str, run_id: str, command: str, *,
            break_lock: bool = False, stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
            log: Callable[[str], None] = lambda _: None) -> LockInfo:
    """Take the group's lock for `run_id`, or raise LockHeld naming the run that holds it."""
    path = lock_path(state_root, group)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    here = socket.gethostname()
    now = dt.datetime.now(dt.UTC)
    mine = LockInfo(run_id=run_id, pid=os.getpid(), host=here, user=getpass.getuser(),
                    command=command, started=now.isoformat(timespec="seconds"))
    # Twice at most: once, and once more after moving a stale lock aside.
    for _ in range(2):
        if _create(path, mine):
            return mine
        held = read_lock(path)
        try:
            reason = _stale_reason(held, path, now, here, stale_after, break_lock)
        except FileNotFoundError:
            # Released between our attempt and the look: try again.
            continue
        if reason is None:
            raise LockHeld(_refusal(held, path, group, here))
        # Renamed aside, not removed: of two runs taking over the same stale lock, only
        # one rename succeeds; the other finds the new lock on its next attempt.
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            path.rename(aside)
        except FileNotFoundError:
            continue
        if read_lock(aside) != held:
            # Another run took the stale lock over between our look and the rename: what
            # was moved is its fresh lock; put it back (link: never over a newer one).
            with suppress(FileExistsError):
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        log(f"warning: {reason}: taken over by run {run_id}")
    held = read_lock(path)
    raise LockHeld(_refusal(held, path, group, here))


def release(state_root: Path, group: str, run_id: str) -> None:
    """Remove the group's lock if it is still `run_id`'s (--break-lock may have taken it)."""
    path = lock_path(state_root, group)
    held = read_lock(path)
    if held is not None and held.run_id == run_id and held.pid == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def group_lock(state_root: Path, group: str, run_id: str, command: str, *,
               break_lock: bool = False, stale_after: dt.timedelta = DEFAULT_STALE_AFTER,
               log: Callable[[str], None] = lambda _: None) -> Iterator[LockInfo]:
    """Hold `group`'s lock while the block runs (up, down); LockHeld (exit 2) if another run
    holds it. Released however the block ends."""
    info = acquire(state_root, group, run_id, command, break_lock=break_lock,
                   stale_after=stale_after, log=log)
    try:
        yield info
    finally:
        release(state_root, group, run_id)
