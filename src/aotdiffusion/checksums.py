"""sha256 of exported files, checked on a file's first load and remembered, so later loads stay fast.

Hashing a full-size UNet's weights reads gigabytes; doing it on every load would undo fast loading.
A file whose sha256 matched once is remembered by its resolved path, size and modification time (in
nanoseconds): while all three are unchanged the file is not read again. Rewriting, truncating or
replacing a file changes its size or mtime, so it is hashed again on the next load. The record lives
in ``$AOTDIFFUSION_CACHE_DIR`` (default ``$XDG_CACHE_HOME/aotdiffusion`` or ``~/.cache/aotdiffusion``);
where it cannot be written, every load hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

RECORD_FILE = "verified-files.json"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What a manifest records of one file: its sha256 and size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def cache_dir() -> Path:
    explicit = os.environ.get("AOTDIFFUSION_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aotdiffusion"


def _key(path: Path) -> tuple[str, dict[str, int]]:
    stat = path.stat()
    return str(path.resolve()), {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_cache_file(name: str) -> dict[str, Any]:
    """A JSON object kept in the cache folder; empty when absent or unreadable (a cache is never required)."""
    try:
        with open(cache_dir() / name) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache_file(name: str, data: dict[str, Any]) -> None:
    """Replaces a cache file atomically, or not at all where the cache cannot be written. Processes writing
    at once may drop each other's entries, which costs a re-measurement, never a wrong answer."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}-")
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(temporary, folder / name)
    except OSError:
        pass


def _read_records() -> dict[str, Any]:
    return read_cache_file(RECORD_FILE)


def _write_records(records: dict[str, Any]) -> None:
    # forget the files of deleted exports
    write_cache_file(RECORD_FILE, {key: value for key, value in records.items() if os.path.exists(key)})


def unverified(files: dict[Path, str], *, always: bool = False) -> list[Path]:
    """Checks each file's sha256 against ``files`` (path -> expected hex digest); returns those that differ.

    Files remembered as matching (same path, size and mtime) are not read unless ``always``. Matches
    are remembered for the next load.
    """
    records = _read_records()
    bad, changed = [], False
    for path, expected in files.items():
        key, stat = _key(path)
        known = records.get(key)
        if not always and known == {**stat, "sha256": expected}:
            continue
        if sha256_file(path) != expected:
            bad.append(path)
            records.pop(key, None)
            continue
        records[key] = {**stat, "sha256": expected}
        changed = True
    if changed:
        _write_records(records)
    return bad


def remember(files: dict[Path, str]) -> None:
    """Records files this process has just written and hashed (an export), so their first load is fast."""
    records = _read_records()
    for path, digest in files.items():
        key, stat = _key(path)
        records[key] = {**stat, "sha256": digest}
    _write_records(records)
