"""An export's manifest: the size and SHA-256 of every file in it.

safetensors has no checksum, so a bit flip inside tensor data loads without complaint. Loading an
export compares file sizes with the manifest (a stat per file: truncation, a partial copy);
`vsurgery verify` and `--verify` hash the files as well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ModelLoadError
from .io import atomic_write_json

MANIFEST = "vsurgery_manifest.json"
_CHUNK = 1 << 24


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file under `folder` (paths relative to it) in folder/vsurgery_manifest.json."""
    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    return atomic_write_json(folder / MANIFEST, {"algorithm": "sha256", "files": files})


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def check_manifest(folder: Path, *, under: str = "", hashes: bool = False) -> int:
    """Check the files the manifest of `folder` lists (those inside `under`, if given): present, of the
    recorded size and, with `hashes`, of the recorded SHA-256. Returns how many files it checked."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        entries = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no {MANIFEST}: not an export, or one written without a manifest") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"cannot read {folder / MANIFEST}: {e}") from None
    prefix = f"{under.strip('/')}/" if under else ""
    checked = 0
    for name, (size, sha256) in entries.items():
        if not name.startswith(prefix):
            continue
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing (listed in {folder / MANIFEST})")
        if path.stat().st_size != size:
            raise ModelLoadError(f"{path} has {path.stat().st_size} bytes, the manifest says {size}: a damaged copy")
        if hashes and _sha256(path) != sha256:
            raise ModelLoadError(f"{path} does not match its SHA-256 in {folder / MANIFEST}: the file is corrupt")
        checked += 1
    return checked
