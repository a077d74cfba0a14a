"""Where outputs go: destinations checked before any work, then atomic writes — a file or folder appears
whole under its final name, or not at all, with the permissions the user's umask gives any new file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import SurgeryError


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask can only swap it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_usual_modes(path: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as any tool creates them: tempfile makes 0600/0700
    (it is for secrets) and safetensors writes 0600, which would hide outputs from the user's group."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in paths:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, path: Path, option: str) -> None:
    """Entries can be created in `folder`, the first existing folder on the way to output `path`."""
    if not folder.is_dir():
        raise SurgeryError(f"{option} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        reason = "a read-only filesystem" if read_only else "no write permission"
        raise SurgeryError(f"{option} {path}: cannot write in {folder} ({reason})")


def check_output_file(path: str | os.PathLike, *, force: bool = False, option: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder in its place, a folder
    without write access, or an existing file unless `force`."""
    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise SurgeryError(f"{option} {path} already exists; pass --force to overwrite it")
    _check_writable(_nearest_existing(path.parent), path, option)
    return path


def check_output_folder(
    path: str | os.PathLike,
    *,
    force: bool = False,
    option: str = "--out",
    replaceable: Callable[[Path], bool] = lambda folder: True,
    what: str = "an output folder",
    ignore: tuple[str, ...] = (),
    alternative: str = "",
) -> Path:
    """Refuse, before any work, an output folder that cannot be written: a file in its place, a folder
    without write access, or a non-empty folder unless `force` — and even then only one that
    `replaceable` recognises as `what`, so --force never empties an unrelated folder. An empty folder
    counts as new; entries named in `ignore` do not count. `alternative` ends the message for a
    non-empty folder (", or --resume to continue it")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"{option} {path} is a file, not a folder")
    if path.is_dir():
        if any(entry.name not in ignore for entry in path.iterdir()):
            if not force:
                raise SurgeryError(
                    f"{option} {path} already exists and is not empty; pass --force to replace it{alternative}")
            if not replaceable(path):
                raise SurgeryError(f"{option} {path} is not {what}; --force replaces only {what}")
        _check_writable(Path(os.path.abspath(path)), path, option)
    _check_writable(_nearest_existing(path.parent), path, option)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _give_usual_modes(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, for writers that go by it) for the caller to
    write; on success it is renamed to `path`, on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        _give_usual_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike) -> Path:
    """Tensors (moved to CPU, made contiguous) to a safetensors file, appearing whole or not at all."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it is renamed to `path`, on error removed.

    An existing empty folder at `path` is replaced like a missing one; a non-empty one only if `overwrite`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _give_usual_modes(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
