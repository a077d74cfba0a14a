"""One process at a time per run folder: a lock file created with O_EXCL, naming its owner.

A lock whose owner is gone (killed, crashed: its pid no longer runs, or runs another program) is
stale and taken over, so a run killed with SIGKILL resumes without manual cleanup. The lock is
re-entrant within a process (`run` holds it while `distill` takes it again). In a multi-process
launch only the main process takes and checks it; the others work under its lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import SurgeryError

LOCK_NAME = ".vsurgery.lock"

_held: dict[str, int] = {}  # real path of a locked folder → nesting depth in this process


class FolderBusy(SurgeryError):
    """Another live process holds the run folder's lock."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: only its exit status is left


def _alive(owner: dict) -> bool:
    """Whether the lock's owner may still run. Another host's process cannot be checked: assume it does."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    if not Path("/proc/self/stat").exists():  # no /proc: the pid is all there is to go by
        return True
    started = _start_time(pid)
    return started is not None and owner.get("started") in (None, started)


def _owner(lock: Path) -> dict | None:
    """The lock's content; None when it is unreadable (being written, or torn by a kill)."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _take(lock: Path) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = _owner(lock)
            if owner is not None and _alive(owner):
                raise _busy(lock, owner) from None
            if owner is None and _recent(lock):
                raise FolderBusy(f"{lock.parent} is being opened by another vsurgery process; try again") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return
    raise FolderBusy(f"cannot lock {lock.parent}: its lock file keeps changing")


def _recent(lock: Path, seconds: float = 10.0) -> bool:
    with contextlib.suppress(OSError):
        return time.time() - lock.stat().st_mtime < seconds
    return False


def _main_process() -> bool:
    """Whether this is the main process of a (possibly multi-process) launch: torchrun and
    `accelerate launch` give every process its RANK."""
    return int(os.environ.get("RANK", "0")) == 0


def check_not_busy(folder: Path) -> None:
    """Refuse a folder whose lock a live process holds (a lock of this process's own is no obstacle)."""
    if not _main_process():
        return
    lock = Path(folder) / LOCK_NAME
    owner = _owner(lock) if os.path.realpath(folder) not in _held else None
    if owner is not None and _alive(owner):
        raise _busy(lock, owner)


def _busy(lock: Path, owner: dict) -> FolderBusy:
    return FolderBusy(
        f"{lock.parent} is in use by another vsurgery process (pid {owner.get('pid')} on {owner.get('host')}); "
        f"wait for it to finish, or remove {lock} if it has stopped"
    )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`'s lock for the block, creating the folder (and missing parents) if needed.

    On exit the lock is removed, and so is every folder created here that is still empty — a run
    rejected before writing leaves nothing behind. Processes other than the main one of a
    multi-process launch only get the folder.
    """
    folder = Path(folder)
    if not _main_process():
        yield folder
        return
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    lock = folder / LOCK_NAME
    try:
        if key not in _held:
            _take(lock)
        _held[key] = _held.get(key, 0) + 1
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield folder
    finally:
        _held[key] -= 1
        if not _held[key]:
            del _held[key]
            owner = _owner(lock)
            if owner is not None and owner.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): leave it and its parents
            return
